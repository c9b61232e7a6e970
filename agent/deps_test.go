package agent

import (
	"os"
	"os/exec"
	"path/filepath"
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
	domain := []string{"identify", "queue", "cloud", "upload", "reputation", "execwatch", "consent", "protect"}
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

// The agent never starts a program. While it holds executions in a
// fanotify permission group, a program it started would be held too; and
// while a Go thread is inside vfork, a garbage collection cannot stop the
// world, so the agent could not even run the timer that allows it: every
// execution on the machine would wait forever. Neither os/exec nor a
// direct fork or exec may appear in cloudprotectd.
func TestAgentStartsNoProgram(t *testing.T) {
	for _, dep := range goDeps(t, false, "../cmd/cloudprotectd") {
		if dep == "os/exec" {
			t.Errorf("cloudprotectd depends on os/exec")
		}
	}
	forbidden := []string{"ForkExec(", "StartProcess(", "syscall.Exec(", "unix.Exec(", "SYS_FORK", "SYS_VFORK", "SYS_CLONE", "SYS_EXECVE"}
	for _, dep := range goDeps(t, false, "../cmd/cloudprotectd") {
		if !within(dep, module) {
			continue
		}
		out, err := exec.Command("go", "list", "-f", "{{.Dir}}\n{{range .GoFiles}}{{.}}\n{{end}}", dep).Output()
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		for _, f := range lines[1:] {
			b, err := os.ReadFile(filepath.Join(lines[0], f))
			if err != nil {
				t.Fatal(err)
			}
			for _, bad := range forbidden {
				if strings.Contains(string(b), bad) {
					t.Errorf("%s/%s uses %s: the agent must not start programs", dep, f, bad)
				}
			}
		}
	}
}
