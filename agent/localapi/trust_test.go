package localapi

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/cloudprotect/cloudprotect/agent/testenv"
)

// serveWorld runs a server like the system agent's: its socket open to
// every local user, privileged deciding who is an administrator.
func serveWorld(t *testing.T, b *fakeBackend, privileged Authorizer) (string, *Server) {
	t.Helper()
	dir, err := os.MkdirTemp("", "cloudprotect-localapi-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "run", "api.sock")
	ln, err := Listen(sock, true)
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(ln, b, privileged, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Serve: %v", err)
		}
	})
	return sock, s
}

// childOut runs a child operation and returns its output's first line.
func childOut(t *testing.T, cmd *exec.Cmd) string {
	t.Helper()
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("child %v: %v\n%s", cmd.Env, err, out)
	}
	line, _, _ := strings.Cut(string(out), "\n")
	return line
}

// A caller is who it was when it connected. An unprivileged user
// connects from a process that exits while the connection lives on in
// another of its processes; the freed PID is then given to a process of
// an administrator (forced through /proc/sys/kernel/ns_last_pid). The
// change of participation sent afterwards on the first connection is
// still refused: nothing is looked up by PID when the request arrives.
func TestIdentityFixedAtConnect(t *testing.T) {
	testenv.NeedRoot(t)
	group, _ := testenv.AddGroup(t, "cpadm")
	admin := testenv.AddUser(t, "cpa", "", group)
	attacker := testenv.AddUser(t, "cpx", "")
	b := newFakeBackend()
	sock, _ := serveWorld(t, b, RootOrGroup(func() string { return group }))
	env := func(op string) []string { return []string{childEnv + "=" + op, "CLOUDPROTECT_SOCKET=" + sock} }

	// The administrator may change participation: the rule works.
	if got := childOut(t, testenv.As(t, admin.UID, admin.GID, admin.Groups(t), env("put")...)); got != "code=200" {
		t.Fatalf("the administrator's change: %q, want code=200", got)
	}
	calls := b.nCalls()

	// The attacker's connection, handed from process A to process B.
	// Plain pipes, not the command's: they outlive process A.
	a := testenv.As(t, attacker.UID, attacker.GID, nil, env("connect-pass")...)
	inR, stdin, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	stdout, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdout.Close()
	a.Stdin, a.Stdout, a.Stderr = inR, outW, os.Stderr
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	inR.Close()
	outW.Close()
	out := bufio.NewReader(stdout)
	line, err := out.ReadString('\n')
	if err != nil {
		t.Fatalf("attacker's first process: %q %v", line, err)
	}
	if err := a.Wait(); err != nil {
		t.Fatalf("attacker's first process: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(line, "pid ")))
	if err != nil {
		t.Fatalf("attacker's first process said %q", line)
	}

	// Its PID goes to a process of the administrator.
	reusePID(t, pid, func() *exec.Cmd {
		return testenv.As(t, admin.UID, admin.GID, admin.Groups(t), env("wait")...)
	})
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil || !strings.Contains(string(status), fmt.Sprintf("\t%d", admin.UID)) {
		t.Fatalf("process %d is not the administrator's: %v\n%s", pid, err, status)
	}

	// The attacker's request on the old connection.
	if _, err := fmt.Fprintln(stdin, "go"); err != nil {
		t.Fatal(err)
	}
	got, err := out.ReadString('\n')
	if err != nil {
		t.Fatalf("attacker's second process: %q %v", got, err)
	}
	io.Copy(io.Discard, out) // until the process exits
	if strings.TrimSpace(got) != "code=403" {
		t.Errorf("change sent on a connection whose PID now belongs to an administrator: %q, want code=403", strings.TrimSpace(got))
	}
	if n := b.nCalls(); n != calls {
		t.Errorf("the backend was asked to change participation %d more times", n-calls)
	}
}

// reusePID starts the command start makes until it runs with the given
// PID, which is free, by setting the PID namespace's last PID just below
// it; it returns the running command, stopped when the test ends.
func reusePID(t *testing.T, pid int, start func() *exec.Cmd) *exec.Cmd {
	t.Helper()
	const lastPID = "/proc/sys/kernel/ns_last_pid"
	for attempt := range 200 {
		if err := os.WriteFile(lastPID, []byte(strconv.Itoa(pid-1)), 0); err != nil {
			testenv.Unavailable(t, "cannot set %s: %v", lastPID, err)
		}
		cmd := start()
		in, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if cmd.Process.Pid == pid {
			t.Logf("PID %d reused after %d attempts", pid, attempt+1)
			t.Cleanup(func() { in.Close(); cmd.Wait() })
			return cmd
		}
		in.Close()
		cmd.Wait()
	}
	t.Fatalf("could not get PID %d for another process in 200 attempts", pid)
	return nil
}

// One person acting as many uids (the subordinate uids of their user
// namespaces have no account) cannot take the connections every account
// needs: uids without an account share a small pool, and a real account
// still gets in when every other place is taken.
func TestConnectionsReservedForAccounts(t *testing.T) {
	testenv.NeedRoot(t)
	attacker := testenv.AddUser(t, "cpx", "")
	victim := testenv.AddUser(t, "cpv", "")
	sock, s := serveWorld(t, newFakeBackend(), func(c Cred) bool { return c.UID == 0 })
	env := func(op string) []string { return []string{childEnv + "=" + op, "CLOUDPROTECT_SOCKET=" + sock} }

	// The attacker's account and 20 uids without account (as an
	// unprivileged user gets with newuidmap), each holding all it may.
	type holder struct {
		cmd *exec.Cmd
		in  interface{ Close() error }
	}
	var holders []holder
	defer func() {
		for _, h := range holders {
			h.in.Close()
			h.cmd.Wait()
		}
	}()
	var outs []*bufio.Reader
	for i := range 21 {
		uid, gid := attacker.UID, attacker.GID
		if i > 0 {
			uid, gid = 3_000_000+uint32(os.Getpid()%1000)*100+uint32(i), 3_000_000
		}
		cmd := testenv.As(t, uid, gid, nil, env(fmt.Sprintf("hold:%d", MaxConnsPerUser))...)
		in, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		holders = append(holders, holder{cmd, in})
		outs = append(outs, bufio.NewReader(out))
	}
	answered, noAccount := 0, 0
	for i, out := range outs {
		line, err := out.ReadString('\n')
		var n int
		if _, serr := fmt.Sscanf(line, "answered %d", &n); err != nil || serr != nil {
			t.Fatalf("holder %d: %q %v", i, line, err)
		}
		answered += n
		if i > 0 {
			noAccount += n
		}
	}
	if noAccount > MaxConnsNoAccount {
		t.Errorf("uids without an account hold %d connections, want at most %d", noAccount, MaxConnsNoAccount)
	}
	if got := childOut(t, testenv.As(t, victim.UID, victim.GID, nil, env("hold:1")...)); got != "answered 1" {
		t.Errorf("a real account after the attacker's %d connections: %q, want answered 1", answered, got)
	}
	t.Logf("the attacker holds %d connections (%d from uids without account); %d refused", answered, noAccount, s.lim.Refused())
}

// A user-mode agent's socket folder under /tmp is a name anyone can take
// first. When another user made it (or a folder above it), the agent
// refuses to listen there: they could replace its socket and answer its
// clients in its place.
func TestSocketFolderOfAnotherUserRefused(t *testing.T) {
	testenv.NeedRoot(t)
	attacker := testenv.AddUser(t, "cpx", "")
	taken, err := os.MkdirTemp("", "cloudprotect-taken-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(taken)
	os.Chmod(taken, 0o777)
	if err := os.Chown(taken, int(attacker.UID), int(attacker.GID)); err != nil {
		t.Fatal(err)
	}
	for _, sock := range []string{
		filepath.Join(taken, "cloudprotectd.sock"),
		filepath.Join(taken, "cloudprotect", "cloudprotectd.sock"),
	} {
		ln, err := Listen(sock, false)
		if err == nil {
			ln.Close()
			t.Errorf("Listen(%s) in a folder of uid %d succeeded; want it refused", sock, attacker.UID)
		} else if !strings.Contains(err.Error(), fmt.Sprint(attacker.UID)) {
			t.Errorf("Listen(%s) = %v; want the error to name the folder's owner", sock, err)
		}
	}
	// The agent's own folder of wider mode is repaired.
	mine, err := os.MkdirTemp("", "cloudprotect-mine-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(mine)
	os.Chmod(mine, 0o777)
	ln, err := Listen(filepath.Join(mine, "cloudprotectd.sock"), false)
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	if fi, err := os.Stat(mine); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("the socket's folder after Listen: %v %v; want mode 0700", fi.Mode(), err)
	}
}

// A client talks only to an agent of root's or its own user's: another
// user listening where the agent should be is refused, however it
// answers (root may talk to any user's agent).
func TestClientRefusesAnotherUsersAgent(t *testing.T) {
	testenv.NeedRoot(t)
	attacker := testenv.AddUser(t, "cpx", "")
	dir, err := os.MkdirTemp("", "cloudprotect-fake-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o777)
	sock := filepath.Join(dir, "cloudprotectd.sock")
	cmd := testenv.As(t, attacker.UID, attacker.GID, nil, childEnv+"=fake-agent", "CLOUDPROTECT_SOCKET="+sock)
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { in.Close(); cmd.Wait() }()
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("fake agent: %q %v", line, err)
	}
	victim := testenv.AddUser(t, "cpv", "")
	env := []string{childEnv + "=status", "CLOUDPROTECT_SOCKET=" + sock}
	if got := childOut(t, testenv.As(t, victim.UID, victim.GID, nil, env...)); got != "not-an-agent" {
		t.Errorf("another user's client asking the fake agent: %q; want not-an-agent", got)
	}
	// The attacker's own client may talk to it: it is theirs.
	if got := childOut(t, testenv.As(t, attacker.UID, attacker.GID, nil, env...)); got != "ok" {
		t.Errorf("the fake agent's own user asking it: %q; want ok", got)
	}
}
