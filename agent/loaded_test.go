package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/testenv"
	"github.com/cloudprotect/cloudprotect/wire"
)

// writeProgram writes an executable "program" (a script) with unique
// content and returns its SHA-256.
func writeProgram(t *testing.T, path string, uid, gid int, mode os.FileMode) string {
	t.Helper()
	b := []byte("#!/bin/sh\necho " + filepath.Base(path) + " " + t.Name() + "\n")
	if err := os.WriteFile(path, b, mode); err != nil {
		t.Fatal(err)
	}
	os.Chmod(path, mode)
	if err := os.Lchown(path, uid, gid); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// The system agent reads in a person's download folders only what that
// person could read. One person (a real account) points ~/Downloads at a
// folder only root may read; another names such a folder in
// user-dirs.dirs and finds in ~/.local/bin a file they may not read and
// one an ACL keeps from them. None of these is hashed or queued, while
// the person's own new program is.
func TestLoadedFoldersReadWithTheirOwnersRights(t *testing.T) {
	testenv.NeedRoot(t)
	alice := testenv.AddUser(t, "cplo", filepath.Join("/home", "cplo"+rand4()))
	bob := testenv.AddUser(t, "cplb", filepath.Join("/home", "cplb"+rand4()))
	uid, gid := int(alice.UID), int(alice.GID)

	private, err := os.MkdirTemp("", "cloudprotect-private-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(private)
	os.Chmod(private, 0o700)
	secrets := map[string]string{} // SHA-256 → what it is
	secrets[writeProgram(t, filepath.Join(private, "secret-tool"), 0, 0, 0o700)] = "a program in root's private folder"
	private2, err := os.MkdirTemp("", "cloudprotect-private-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(private2)
	os.Chmod(private2, 0o700)
	secrets[writeProgram(t, filepath.Join(private2, "other-secret"), 0, 0, 0o700)] = "a program in the folder user-dirs.dirs names"

	// bob's ~/Downloads → root's folder; alice's user-dirs.dirs → another
	// of root's.
	if err := os.Symlink(private, filepath.Join(bob.Home, "Downloads")); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(alice.Home, ".config")
	os.MkdirAll(cfg, 0o755)
	os.WriteFile(filepath.Join(cfg, "user-dirs.dirs"), []byte(`XDG_DOWNLOAD_DIR="`+private2+`"`+"\n"), 0o644)
	os.Lchown(cfg, uid, gid)
	bin := filepath.Join(alice.Home, ".local", "bin")
	os.MkdirAll(bin, 0o755)
	for _, d := range []string{filepath.Dir(bin), bin} {
		os.Lchown(d, uid, gid)
	}

	a := startAgentWith(t, ModeSystem, "", nil)
	ctx := context.Background()
	if _, err := a.client.SetParticipation(ctx, api.ParticipationRequest{Participate: true, StatementVersion: consent.StatementVersion, Via: "cli"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "collection", func() bool {
		st, err := a.client.Status(ctx)
		return err == nil && st.Participation.Collecting && st.Agent.ExecSource != ""
	})

	// New files arrive in both of root's folders, and in ~/.local/bin a
	// root-only file and one an ACL denies to the person.
	secrets[writeProgram(t, filepath.Join(private, "new-secret"), 0, 0, 0o700)] = "a new program in root's folder behind ~/Downloads"
	secrets[writeProgram(t, filepath.Join(private2, "new-other"), 0, 0, 0o700)] = "a new program in the folder user-dirs.dirs names"
	secrets[writeProgram(t, filepath.Join(bin, "root-only"), 0, 0, 0o700)] = "a root-only file in ~/.local/bin"
	// The ACL is in place before the file becomes executable (the agent
	// looks at once when an execute bit appears).
	denied := filepath.Join(bin, "acl-denied")
	secrets[writeProgram(t, denied, 0, 0, 0o644)] = "a file an ACL denies to the person"
	if err := setACLDenyUser(denied, alice.UID); err != nil {
		testenv.Unavailable(t, "set an ACL on %s: %v", denied, err)
	}
	if err := os.Chmod(denied, 0o755); err != nil {
		t.Fatal(err)
	}
	// Then the person's own program: once it is queued, the files before
	// it have been looked at.
	own := writeProgram(t, filepath.Join(bin, "own-tool"), uid, gid, 0o755)
	waitRecord(t, a.client, "of the person's own program", func(r wire.Record) bool { return r.SHA256 == own && r.Loaded })
	q, err := a.client.Queue(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range q.Records {
		if what, ok := secrets[r.SHA256]; ok {
			t.Errorf("the agent hashed and queued %s: %s", what, r.Path)
		}
	}
}
