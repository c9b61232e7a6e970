package agent

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/internal/spawn"
	"github.com/cloudprotect/cloudprotect/agent/queue"
	"github.com/cloudprotect/cloudprotect/agent/testenv"
	"github.com/cloudprotect/cloudprotect/wire"
)

// sha256File returns the hex SHA-256 of a file.
func sha256File(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// tiny builds a small static program with a unique marker.
func tiny(t *testing.T, dir, name string, sleeper bool) (string, string) {
	t.Helper()
	build := spawn.BuildTiny
	if sleeper {
		build = spawn.BuildSleeper
	}
	p, err := build(context.Background(), dir, name, name+"-"+rand.Text())
	if err != nil {
		testenv.Unavailable(t, "cannot build the test program: %v", err)
	}
	return p, sha256File(t, p)
}

// participateAndWatch makes the agent participate and waits until a probe
// program is counted: the exec source's marks are in place.
func participateAndWatch(t *testing.T, a *testAgent) {
	t.Helper()
	ctx := context.Background()
	if _, err := a.client.SetParticipation(ctx, api.ParticipationRequest{Participate: true, StatementVersion: consent.StatementVersion, Via: "cli"}); err != nil {
		t.Fatal(err)
	}
	probe, sum := tiny(t, t.TempDir(), "probe", false)
	deadline := time.Now().Add(20 * time.Second)
	for {
		runN(t, probe, 1)
		if storedExecs(t, a.queue)[sum] > 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("executions not seen 20s after participating")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// storedExecs commits the queue and returns the executions per SHA-256.
func storedExecs(t *testing.T, q *queue.Queue) map[string]uint64 {
	t.Helper()
	if err := q.Flush(); err != nil {
		t.Fatalf("commit queue: %v", err)
	}
	recs, err := q.Records()
	if err != nil {
		t.Fatalf("read queue: %v", err)
	}
	m := make(map[string]uint64, len(recs))
	for _, r := range recs {
		m[r.SHA256] = r.ExecCount
	}
	return m
}

// waitExecs waits until the queue counts want executions of sum.
func waitExecs(t *testing.T, q *queue.Queue, sum string, want uint64, what string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		got := storedExecs(t, q)[sum]
		if got == want {
			return
		}
		if got > want || time.Now().After(deadline) {
			t.Fatalf("%s: %d executions counted, want %d", what, got, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stopping the agent the moment an exec storm ends loses nothing: the
// source reads what the kernel queued, the pipeline identifies and
// commits it before the agent exits.
func TestStopAfterStormLosesNothing(t *testing.T) {
	testenv.NeedRoot(t)
	a := startAgent(t, ModeUser, "")
	participateAndWatch(t, a)
	prog, sum := tiny(t, t.TempDir(), "storm", false)
	res, _, err := spawn.RunChild(context.Background(), spawn.Config{Path: prog, Workers: 2, Duration: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	a.stop() // at once
	a.stop = nil
	q, err := queue.Open(filepath.Join(a.dir, "state", "queue.db"), queue.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	got := storedExecs(t, q)[sum]
	t.Logf("%d executions at %.0f/s, %d counted", res.Execs, res.PerSecond(), got)
	if got != uint64(res.Execs) {
		t.Fatalf("%d executions counted after the stop, %d ran", got, res.Execs)
	}
}

// deepDir makes a folder whose path is longer than PATH_MAX under dir, so
// that the kernel cannot give the path of a file in it, and returns a
// descriptor of it and the relative steps to reach it.
func deepDir(t *testing.T, dir string) (int, []string) {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	step := strings.Repeat("d", 200)
	var steps []string
	for len(dir)+len(steps)*(len(step)+1) <= unix.PathMax {
		if err := unix.Mkdirat(fd, step, 0o755); err != nil {
			t.Fatal(err)
		}
		next, err := unix.Openat(fd, step, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		unix.Close(fd)
		if err != nil {
			t.Fatal(err)
		}
		fd, steps = next, append(steps, step)
	}
	t.Cleanup(func() { exec.Command("rm", "-rf", filepath.Join(dir, step)).Run() })
	return fd, steps
}

// A large program (hashed in the background) run under two hard-linked
// paths and under a path the kernel cannot give is counted at every
// execution.
func TestLargeProgramEveryExecutionCounted(t *testing.T) {
	testenv.NeedRoot(t)
	work := t.TempDir()
	small, _ := tiny(t, work, "base", false)
	b, err := os.ReadFile(small)
	if err != nil {
		t.Fatal(err)
	}
	big := filepath.Join(work, "big")
	padded := append(b, make([]byte, 100<<20-len(b))...)
	if err := os.WriteFile(big, padded, 0o755); err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(padded)
	sum := hex.EncodeToString(s[:])
	link := filepath.Join(work, "link")
	if err := os.Link(big, link); err != nil {
		t.Fatal(err)
	}
	dfd, steps := deepDir(t, work)
	defer unix.Close(dfd)
	if err := unix.Linkat(unix.AT_FDCWD, big, dfd, "deep", 0); err != nil {
		t.Fatal(err)
	}
	a := startAgent(t, ModeUser, "")
	participateAndWatch(t, a)

	// The unresolvable path first: the file is new then, so its path is
	// asked for, and the kernel cannot give it. The folder is reached
	// through its descriptor, handed to the child as descriptor 3.
	for range 3 {
		pid, err := syscall.ForkExec("/proc/self/fd/3/deep", []string{"deep"}, &syscall.ProcAttr{Files: []uintptr{0, 1, 2, uintptr(dfd)}})
		if err != nil {
			t.Fatalf("run under the long path: %v", err)
		}
		var ws syscall.WaitStatus
		if _, err := syscall.Wait4(pid, &ws, 0, nil); err != nil || ws.ExitStatus() != 0 {
			t.Fatalf("program under the long path: %v, status %v", err, ws)
		}
	}
	if p := filepath.Join(append([]string{work}, append(steps, "deep")...)...); len(p) <= unix.PathMax {
		t.Fatalf("the long path is only %d bytes", len(p))
	}
	runN(t, big, 3)
	runN(t, link, 3)
	waitExecs(t, a.queue, sum, 9, "the large program under three paths")
	recs, err := a.queue.Records()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		if r.SHA256 == sum && r.Path != wire.UnknownPath {
			t.Errorf("path %q: the first execution's path should have been unknown", r.Path)
		}
	}
	st := a.Status()
	if st.Agent.EventsUnidentified != 0 {
		t.Errorf("unidentified executions: %d", st.Agent.EventsUnidentified)
	}
}

// memfdExec runs the program at path from a memory file descriptor and
// waits for it.
func memfdExec(t *testing.T, path string) int {
	t.Helper()
	pid, err := spawn.FromMemory(path)
	if errors.Is(err, spawn.ErrNoMemfd) {
		testenv.Unavailable(t, "%v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// Programs fanotify cannot see are found through the process events
// connector: one run from memory, and one on a tmpfs mounted in another
// mount namespace, whose filesystem the agent then watches, so a short
// program run there next is seen by fanotify itself. A short program run
// from memory is recorded or counted as missed, and then the status says
// the agent is limited.
func TestProgramsFanotifyCannotSee(t *testing.T) {
	testenv.NeedRoot(t)
	unshare := testenv.NeedCommand(t, "unshare", "util-linux")
	work := t.TempDir()
	os.Chmod(work, 0o755)
	sleeper, sleeperSum := tiny(t, work, "sleeper", true)
	quick, quickSum := tiny(t, work, "quick", false)
	nsSleeper, nsSleeperSum := tiny(t, work, "ns-sleeper", true)
	nsQuick, nsQuickSum := tiny(t, work, "ns-quick", false)
	a := startAgent(t, ModeUser, "")
	participateAndWatch(t, a)
	// Other programs on this machine may have been missed already (the
	// agent watches them all); the connector must be there.
	if st := a.Status(); st.Agent.ExecSource != "fanotify" || strings.Contains(st.Agent.LimitedReason, "are not seen") {
		t.Fatalf("status = %+v, want fanotify with the process events connector", st.Agent)
	}

	memfdExec(t, sleeper)
	waitExecs(t, a.queue, sleeperSum, 1, "the program run from memory")

	mnt := filepath.Join(work, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	script := "mount -t tmpfs cloudprotect-test " + mnt + " && cp " + nsSleeper + " " + nsQuick + " " + mnt + "/ && " +
		mnt + "/ns-sleeper && sleep 0.5 && " + mnt + "/ns-quick"
	if out, err := exec.Command(unshare, "-rm", "/bin/sh", "-c", script).CombinedOutput(); err != nil {
		t.Fatalf("run in another mount namespace: %v %s", err, out)
	}
	waitExecs(t, a.queue, nsSleeperSum, 1, "the program in another mount namespace")
	waitExecs(t, a.queue, nsQuickSum, 1, "the next program on that filesystem, seen by fanotify")

	missedBefore := a.Status().Agent.EventsMissed
	memfdExec(t, quick)
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := a.Status()
		recorded := storedExecs(t, a.queue)[quickSum]
		if recorded == 1 {
			t.Log("the short program run from memory was recorded")
			break
		}
		if st.Agent.EventsMissed > missedBefore {
			if !st.Agent.Limited || !strings.Contains(st.Agent.LimitedReason, "executions were seen but not identified") {
				t.Errorf("a missed execution, but status %+v", st.Agent)
			}
			t.Log("the short program run from memory was counted as missed")
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the short program run from memory: %d recorded, status %+v", recorded, st.Agent)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Identifications are kept across a restart in the state folder, and
// deleted with everything else when the person leaves.
func TestIdentificationCacheAcrossRestarts(t *testing.T) {
	testenv.NeedRoot(t)
	dir := t.TempDir()
	keepState := func(c *Config) { c.StateDir = filepath.Join(dir, "state") }
	a := startAgentWith(t, ModeUser, "", keepState)
	participateAndWatch(t, a)
	prog, sum := tiny(t, t.TempDir(), "remembered", false)
	runN(t, prog, 2)
	waitExecs(t, a.queue, sum, 2, "the program before the restart")
	a.stop()
	a.stop = nil
	cacheFile := filepath.Join(dir, "state", IdentifyCacheFile)
	if b, err := os.ReadFile(cacheFile); err != nil || !strings.Contains(string(b), sum) {
		t.Fatalf("the cache file does not hold the program after a stop (%v)", err)
	}

	b := startAgentWith(t, ModeUser, "", keepState)
	deadline := time.Now().Add(20 * time.Second)
	for b.ident.Stats().Loaded == 0 || b.Status().Agent.ExecSource == "" {
		if time.Now().After(deadline) {
			t.Fatalf("after the restart: identify %+v, status %+v", b.ident.Stats(), b.Status().Agent)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := b.client.SetParticipation(context.Background(), api.ParticipationRequest{Participate: false, Via: "cli"}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(cacheFile); !os.IsNotExist(err) {
		t.Errorf("the cache file is still there after leaving: %v", err)
	}
	files, err := filepath.Glob(filepath.Join(dir, "state", "*"))
	if err != nil || len(files) == 0 {
		t.Fatalf("list the state folder: %v %v", files, err)
	}
	raw, err := hex.DecodeString(sum)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatalf("read %s: %v", f, err)
		}
		if strings.Contains(string(data), sum) || strings.Contains(string(data), string(raw)) {
			t.Errorf("%s still holds the hash of a program run before leaving", filepath.Base(f))
		}
	}
	if s := b.ident.Stats(); s.Cached != 0 {
		t.Errorf("identifications kept in memory after leaving: %+v", s)
	}
}
