package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Account is a real local account made for a test.
type Account struct {
	Name     string
	UID, GID uint32
	Home     string
}

// names makes account and group names unique to this process, so tests
// that run at the same time on one machine do not collide.
var (
	namesMu sync.Mutex
	names   int
)

func uniqueName(prefix string) string {
	namesMu.Lock()
	names++
	n := names
	namesMu.Unlock()
	name := fmt.Sprintf("%s%d-%d", prefix, os.Getpid(), n)
	if len(name) > 31 {
		name = name[len(name)-31:]
		name = "c" + name[1:]
	}
	return name
}

// shadowTool runs useradd, userdel, groupadd or groupdel, trying again
// while another process holds the account database's lock.
func shadowTool(args ...string) error {
	var out []byte
	var err error
	for range 50 {
		out, err = exec.Command(args[0], args[1:]...).CombinedOutput()
		if err == nil {
			return nil
		}
		if !strings.Contains(string(out), "lock") {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, out)
}

// AddGroup creates a local group for the test (groupadd) and removes it
// when the test ends. It needs root.
func AddGroup(t testing.TB, prefix string) (string, uint32) {
	t.Helper()
	NeedRoot(t)
	name := uniqueName(prefix)
	if err := shadowTool("groupadd", name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := shadowTool("groupdel", name); err != nil {
			t.Errorf("remove test group: %v", err)
		}
	})
	g, err := user.LookupGroup(name)
	if err != nil {
		t.Fatal(err)
	}
	gid, _ := strconv.ParseUint(g.Gid, 10, 32)
	return name, uint32(gid)
}

// AddUser creates a local account for the test (useradd, with a group of
// its own and the given supplementary groups) and removes it, with its
// home folder, when the test ends. home, when not empty, is its home
// folder (created, owned by the account); otherwise it has none. It needs
// root.
func AddUser(t testing.TB, prefix, home string, groups ...string) Account {
	t.Helper()
	NeedRoot(t)
	name := uniqueName(prefix)
	args := []string{"useradd", "--user-group", "--shell", "/usr/sbin/nologin"}
	if home != "" {
		args = append(args, "--home-dir", home, "--create-home")
	} else {
		args = append(args, "--no-create-home", "--home-dir", "/nonexistent")
	}
	if len(groups) > 0 {
		args = append(args, "--groups", strings.Join(groups, ","))
	}
	if err := shadowTool(append(args, name)...); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := shadowTool("userdel", name); err != nil {
			t.Errorf("remove test account: %v", err)
		}
		if home != "" {
			os.RemoveAll(home)
		}
	})
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	return Account{Name: name, UID: uint32(uid), GID: uint32(gid), Home: u.HomeDir}
}

// Groups returns the account's groups, its own first, as the kernel
// would give them to its login session.
func (a Account) Groups(t testing.TB) []uint32 {
	t.Helper()
	u, err := user.LookupId(strconv.FormatUint(uint64(a.UID), 10))
	if err != nil {
		t.Fatal(err)
	}
	ids, err := u.GroupIds()
	if err != nil {
		t.Fatal(err)
	}
	var out []uint32
	for _, id := range ids {
		g, _ := strconv.ParseUint(id, 10, 32)
		out = append(out, uint32(g))
	}
	return out
}

var (
	selfOnce sync.Once
	selfPath string
	selfErr  error
)

// SelfCopy returns a copy of the running test binary that every user can
// execute (the go tool's build folder is root's alone), for tests that
// run parts of themselves as other users. TestMain should call
// PrepareSelfCopy before the tests (a copy made while other goroutines
// fork can fail to execute with "text file busy") and RemoveSelfCopy
// after them.
func SelfCopy(t testing.TB) string {
	t.Helper()
	if err := PrepareSelfCopy(); err != nil {
		t.Fatalf("copy the test binary for other users: %v", err)
	}
	return selfPath
}

// PrepareSelfCopy makes the copy SelfCopy returns, once.
func PrepareSelfCopy() error {
	selfOnce.Do(func() {
		exe, err := os.Executable()
		if err != nil {
			selfErr = err
			return
		}
		dir, err := os.MkdirTemp("", "cloudprotect-test-bin-")
		if err != nil {
			selfErr = err
			return
		}
		os.Chmod(dir, 0o755)
		b, err := os.ReadFile(exe)
		if err != nil {
			selfErr = err
			return
		}
		p := filepath.Join(dir, filepath.Base(exe))
		if selfErr = os.WriteFile(p, b, 0o755); selfErr == nil {
			selfPath = p
		}
	})
	return selfErr
}

// RemoveSelfCopy removes what SelfCopy made.
func RemoveSelfCopy() {
	if selfPath != "" {
		os.RemoveAll(filepath.Dir(selfPath))
	}
}

// As returns a command that runs the test binary's copy as uid and gid
// with exactly the given supplementary groups. env is its environment
// (the test's TestMain reads it to know what to do); the race detector's
// pause at exit is turned off.
func As(t testing.TB, uid, gid uint32, groups []uint32, env ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(SelfCopy(t), "-test.run=^$")
	cmd.Env = append([]string{"GORACE=atexit_sleep_ms=0"}, env...)
	if groups == nil {
		groups = []uint32{}
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid, Groups: groups}}
	return cmd
}
