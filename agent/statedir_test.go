package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cloudprotect/cloudprotect/agent/testenv"
)

// At every start while the person does not participate, what a leave
// cut short left behind is gone: a damaged queue and alert history set
// aside (a SIGKILL during the purge leaves the set-aside queue with data
// in it), and temporary files of writes cut short (a half-written
// consent record); and a state folder others could enter is closed.
func TestStartCleansTheStateFolder(t *testing.T) {
	dir, err := os.MkdirTemp("", "cloudprotect-state-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	state := filepath.Join(dir, "state")
	if err := os.Mkdir(state, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod(state, 0o777)
	secret := strings.Repeat("ab12", 16) // a hash that was queued
	leftovers := []string{
		queueFile + ".corrupt-20260101T000000.000000000Z",
		"alerts.json.corrupt-20260101T000000Z",
		".consent.json.tmp-123456",
		".queue.db.tmp-654321",
	}
	for _, name := range leftovers {
		if err := os.WriteFile(filepath.Join(state, name), []byte(secret), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	a := startAgentWith(t, ModeUser, "", func(c *Config) { c.StateDir = state })
	a.stop()
	a.stop = nil
	for _, name := range leftovers {
		if _, err := os.Stat(filepath.Join(state, name)); err == nil {
			t.Errorf("%s is still in the state folder after a start without participation", name)
		}
	}
	err = filepath.Walk(state, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			if b, _ := os.ReadFile(p); strings.Contains(string(b), secret) {
				t.Errorf("%s still holds the queued hash", p)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(state)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o700 {
		t.Errorf("state folder mode %04o after the start, want 0700", perm)
	}
}

// A state folder that belongs to another user is refused: they could
// read or replace what the agent keeps.
func TestStateFolderOfAnotherUserRefused(t *testing.T) {
	testenv.NeedRoot(t)
	other := testenv.AddUser(t, "cpst", "")
	dir, err := os.MkdirTemp("", "cloudprotect-state-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	state := filepath.Join(dir, "state")
	os.Mkdir(state, 0o700)
	os.Chown(state, int(other.UID), int(other.GID))
	_, err = New(Config{Mode: ModeUser, StateDir: state, Socket: filepath.Join(dir, "run", "s.sock"), PolicyPath: filepath.Join(dir, "policy.json")})
	if err == nil || !strings.Contains(err.Error(), "belongs to uid") {
		t.Fatalf("New with another user's state folder = %v; want it refused", err)
	}
	// A link to a folder is refused too.
	link := filepath.Join(dir, "link")
	mine := filepath.Join(dir, "mine")
	os.Mkdir(mine, 0o700)
	os.Symlink(mine, link)
	_, err = New(Config{Mode: ModeUser, StateDir: link, Socket: filepath.Join(dir, "run", "s.sock"), PolicyPath: filepath.Join(dir, "policy.json")})
	if err == nil || !strings.Contains(err.Error(), "not a folder") {
		t.Fatalf("New with a state folder that is a link = %v; want it refused", err)
	}
}
