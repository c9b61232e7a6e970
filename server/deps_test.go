package server_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestServerImportsNoAgent keeps the cloud independent of the agent and
// the tray: they share only package wire.
func TestServerImportsNoAgent(t *testing.T) {
	t.Parallel()
	out, err := exec.Command("go", "list", "-deps", "./...", "../cmd/cloudprotect-server").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, pkg := range strings.Fields(string(out)) {
		for _, forbidden := range []string{"github.com/cloudprotect/cloudprotect/agent", "github.com/cloudprotect/cloudprotect/tray", "fyne.io/systray"} {
			if pkg == forbidden || strings.HasPrefix(pkg, forbidden+"/") {
				t.Errorf("the server depends on %s", pkg)
			}
		}
	}
}
