// Package testenv lets tests that need real parts of the machine (root for
// fanotify, a D-Bus daemon, PostgreSQL) skip with a message on a developer's
// laptop, and fail instead when CI=true, where .ci/run provides them.
package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"testing"
)

// InCI reports whether the tests run in CI.
func InCI() bool { return os.Getenv("CI") == "true" }

// Unavailable skips the test with why, or fails it under CI.
func Unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if InCI() {
		t.Fatalf("CI=true but %s", msg)
	}
	t.Skip(msg)
}

// NeedRoot skips (or fails in CI) unless the test runs as root.
func NeedRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, "this test needs root (run `sudo make test`)")
	}
}

// NeedCommand returns the path of the named program, skipping (or failing
// in CI) when it is not installed.
func NeedCommand(t testing.TB, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Unavailable(t, "%s is not installed (Debian package %s)", name, pkg)
	}
	return p
}
