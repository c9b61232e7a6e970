package agent

import (
	"os/exec"
	"strings"
	"testing"
)

// Nothing under agent/ may depend on the tray or on a desktop library: the
// agent runs as a system service without a session.
func TestNoDesktopImports(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-test", "./...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	forbidden := []string{
		"github.com/cloudprotect/cloudprotect/tray",
		"fyne.io/systray",
		"github.com/gen2brain/beeep",
		"github.com/esiqveland/notify",
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, f := range forbidden {
			if dep == f || strings.HasPrefix(dep, f+"/") {
				t.Errorf("a package under agent/ depends on %s", dep)
			}
		}
	}
}
