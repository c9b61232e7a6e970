package agent

import (
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/cloudprotect/cloudprotect"

// goDeps lists the packages pkgs depend on; with tests, their tests' too.
func goDeps(t *testing.T, tests bool, pkgs ...string) []string {
	t.Helper()
	args := []string{"list", "-deps"}
	if tests {
		args = append(args, "-test")
	}
	out, err := exec.Command("go", append(args, pkgs...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	return strings.Fields(string(out))
}

func within(dep, pkg string) bool { return dep == pkg || strings.HasPrefix(dep, pkg+"/") }

// Nothing under agent/ may depend on the tray or on a desktop library: the
// agent runs as a system service without a session.
func TestNoDesktopImports(t *testing.T) {
	forbidden := []string{
		module + "/tray",
		"fyne.io/systray",
		"github.com/gen2brain/beeep",
		"github.com/esiqveland/notify",
	}
	for _, dep := range goDeps(t, true, "./...") {
		for _, f := range forbidden {
			if within(dep, f) {
				t.Errorf("a package under agent/ depends on %s", dep)
			}
		}
	}
}

// The domain packages speak through the small shared packages (agent/api,
// wire), never through the transport that carries them, the server, the
// commands or the tray. (Their tests may start the real reference cloud.)
func TestDomainLayering(t *testing.T) {
	domain := []string{"identify", "queue", "upload", "reputation", "execwatch", "consent", "protect"}
	forbidden := []string{module + "/agent/localapi", module + "/server", module + "/cmd", module + "/tray"}
	for _, d := range domain {
		for _, dep := range goDeps(t, false, "./"+d) {
			for _, f := range forbidden {
				if within(dep, f) {
					t.Errorf("agent/%s depends on %s", d, dep)
				}
			}
		}
	}
}
