package protect

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/identify"
	"github.com/cloudprotect/cloudprotect/agent/internal/spawn"
	"github.com/cloudprotect/cloudprotect/agent/testenv"
	"github.com/cloudprotect/cloudprotect/wire"
)

// These tests use the kernel. A permission listener that stops answering
// freezes every exec on its filesystem, so:
//   - the listener never runs in the test process: it runs in a child
//     (this binary re-executed, see runChild), which the test kills with
//     SIGKILL at a hard deadline (the kernel then allows what it held);
//   - the child marks only a private tmpfs the test mounts for it;
//   - the child gives up by itself after childLimit too.
// Timing checks here are the product's deadlines, with bounds generous
// enough for a loaded 2-core machine.

const (
	childEnv   = "CLOUDPROTECT_PROTECT_CHILD"
	childLimit = 60 * time.Second
	// watchdog is when the test kills a child that is still running.
	watchdog = 45 * time.Second
)

// childConfig is what the child listener is told through childEnv.
type childConfig struct {
	Paths        []string          `json:"paths"`
	FirstSightMS int               `json:"first_sight_ms"`
	Cached       map[string]string `json:"cached"`
	Answer       string            `json:"answer"` // Ask's verdict on every hash
	AskDelayMS   int               `json:"ask_delay_ms"`
	AskStall     bool              `json:"ask_stall"`
	AskError     bool              `json:"ask_error"`
	CircuitMinMS int               `json:"circuit_min_ms"`
}

// runChild is the child listener: a Guard on cfg.Paths, driven by lines
// on stdin ("stats", "invalidate", "except SHA", "exec PATH"), answering
// on stdout; blocks are printed as "block JSON" lines. "stop" or the end
// of stdin stops the guard.
func runChild() int {
	var cfg childConfig
	if err := json.Unmarshal([]byte(os.Getenv(childEnv)), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "child: bad config:", err)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), childLimit)
	defer cancel()
	rep := &fakeRep{cached: cfg.Cached, answers: map[string]string{}, every: cfg.Answer,
		delay: time.Duration(cfg.AskDelayMS) * time.Millisecond, stall: cfg.AskStall}
	if rep.cached == nil {
		rep.cached = map[string]string{}
	}
	if cfg.AskError {
		rep.err = errors.New("connect: connection refused")
	}
	dir, err := os.MkdirTemp("", "protect-child-")
	if err != nil {
		return 2
	}
	defer os.RemoveAll(dir)
	x, err := OpenExceptions(filepath.Join(dir, ExceptionsFile))
	if err != nil {
		return 2
	}
	var outMu sync.Mutex // protects stdout
	say := func(format string, args ...any) {
		outMu.Lock()
		fmt.Printf(format+"\n", args...)
		outMu.Unlock()
	}
	g, err := New(Options{
		Identify:   identify.New(identify.Options{}),
		Reputation: rep,
		Exceptions: x,
		Report: func(al api.Alert, uid int) {
			b, _ := json.Marshal(blockLine{Alert: al, UID: uid})
			say("block %s", b)
		},
		FirstSight: time.Duration(cfg.FirstSightMS) * time.Millisecond,
		Paths:      cfg.Paths,
		UserDirs:   cfg.Paths,
		CircuitMin: time.Duration(cfg.CircuitMinMS) * time.Millisecond,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	errc := make(chan error, 1)
	go func() { errc <- g.Serve(ctx) }()
	for !g.Stats().Active {
		select {
		case err := <-errc:
			say("failed %v", err)
			return 1
		case <-time.After(5 * time.Millisecond):
		}
	}
	say("ready")
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		cmd, arg, _ := strings.Cut(sc.Text(), " ")
		switch cmd {
		case "stats":
			b, _ := json.Marshal(g.Stats())
			say("stats %s", b)
		case "invalidate":
			g.Invalidate()
			say("ok")
		case "except":
			if _, err := x.Add(arg, "test", 0, time.Now()); err != nil {
				say("error %v", err)
			} else {
				say("ok")
			}
		case "stop":
			cancel()
			say("stopped %v", <-errc)
			return 0
		case "exec":
			t0 := time.Now()
			err := exec.Command(arg).Run()
			say("exec %d %v", time.Since(t0).Milliseconds(), err)
		}
	}
	cancel()
	say("stopped %v", <-errc)
	return 0
}

// blockLine is a block as the child reports it.
type blockLine struct {
	api.Alert
	UID int `json:"uid"`
}

// child is a listener process under the test's watchdog.
type child struct {
	t      *testing.T
	cmd    *exec.Cmd
	in     io.WriteCloser
	lines  chan string
	blocks chan blockLine
	exited chan struct{}
}

// startChild starts a listener for cfg and waits until it is ready.
func startChild(t *testing.T, cfg childConfig) *child {
	t.Helper()
	raw, _ := json.Marshal(cfg)
	ctx, cancel := context.WithTimeout(context.Background(), watchdog)
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	// GOGC=off: one test has the listener start a program itself. While
	// a Go thread is inside vfork, a garbage collection cannot stop the
	// world; were one to start while the listener decides on its own
	// child, neither could go on (the product never starts programs; see
	// TestAgentStartsNoProgram).
	cmd.Env = append(os.Environ(), childEnv+"="+string(raw), "GOGC=off")
	cmd.Stderr = os.Stderr
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
	c := &child{t: t, cmd: cmd, in: in, lines: make(chan string, 16), blocks: make(chan blockLine, 16), exited: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if js, ok := strings.CutPrefix(sc.Text(), "block "); ok {
				var bl blockLine
				json.Unmarshal([]byte(js), &bl)
				c.blocks <- bl
				continue
			}
			c.lines <- sc.Text()
		}
		close(c.lines)
	}()
	go func() {
		cmd.Wait()
		close(c.exited)
	}()
	t.Cleanup(func() {
		in.Close()
		select {
		case <-c.exited:
		case <-time.After(10 * time.Second):
			t.Errorf("listener did not stop within 10s of its input closing; killed")
			cmd.Process.Kill()
			<-c.exited
		}
		cancel()
	})
	if l := c.next(); l != "ready" {
		t.Fatalf("listener: %q", l)
	}
	return c
}

// next returns the child's next line.
func (c *child) next() string {
	c.t.Helper()
	select {
	case l, ok := <-c.lines:
		if !ok {
			c.t.Fatal("listener exited")
		}
		return l
	case <-time.After(20 * time.Second):
		c.t.Fatal("listener silent for 20s")
	}
	return ""
}

func (c *child) send(cmd string) string {
	c.t.Helper()
	if _, err := fmt.Fprintln(c.in, cmd); err != nil {
		c.t.Fatal(err)
	}
	return c.next()
}

func (c *child) stats() Stats {
	c.t.Helper()
	l := c.send("stats")
	var s Stats
	js, ok := strings.CutPrefix(l, "stats ")
	if !ok || json.Unmarshal([]byte(js), &s) != nil {
		c.t.Fatalf("stats: %q", l)
	}
	return s
}

// waitHeld waits until the listener holds n executions.
func (c *child) waitHeld(n uint64) {
	c.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for c.stats().Held < n {
		if time.Now().After(deadline) {
			c.t.Fatalf("the listener never held %d executions", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// privateTmpfs mounts a tmpfs only these tests use, removed at the end.
func privateTmpfs(t *testing.T) string {
	t.Helper()
	testenv.NeedRoot(t)
	mnt := filepath.Join(t.TempDir(), "fs")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", mnt, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "size=32m,mode=0755"); err != nil {
		testenv.Unavailable(t, "cannot mount a tmpfs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	return mnt
}

// program builds a small static program on the tmpfs; its hash too.
func program(t *testing.T, dir, name string) (string, string) {
	t.Helper()
	p, err := spawn.BuildTiny(context.Background(), dir, name, t.Name()+name+strconv.FormatInt(time.Now().UnixNano(), 10))
	if err != nil {
		testenv.Unavailable(t, "cannot build the test program: %v", err)
	}
	f, _, err := identify.New(identify.Options{}).IdentifyPath(p)
	if err != nil {
		t.Fatal(err)
	}
	return p, f.SHA256
}

// run executes path and returns how long until the exec finished, and
// its error.
func run(path string) (time.Duration, error) {
	t0 := time.Now()
	err := exec.Command(path).Run()
	return time.Since(t0), err
}

func TestRootMaliciousFailsWithEPERM(t *testing.T) {
	fs := privateTmpfs(t)
	bad, sum := program(t, fs, "dropper")
	good, _ := program(t, fs, "tool")
	c := startChild(t, childConfig{Paths: []string{fs}, FirstSightMS: 1500, Cached: map[string]string{sum: wire.VerdictMalicious}})
	_, err := run(bad)
	if !errors.Is(err, syscall.EPERM) {
		t.Fatalf("malicious program: %v; want EPERM", err)
	}
	select {
	case bl := <-c.blocks:
		if bl.SHA256 != sum || bl.Action != api.AlertActionBlocked {
			t.Errorf("block = %+v", bl)
		}
		// Read before the denied process could exit: whose it was.
		if bl.UID != os.Getuid() {
			t.Errorf("block reported for uid %d; want %d, who ran it", bl.UID, os.Getuid())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no block reported")
	}
	if _, err := run(good); err != nil {
		t.Errorf("unfamiliar program (cloud answers unknown): %v", err)
	}
	// An exception lets it run, at once.
	if l := c.send("except " + sum); l != "ok" {
		t.Fatal(l)
	}
	if _, err := run(bad); err != nil {
		t.Errorf("after the exception: %v", err)
	}
}

// An unfamiliar program waits for the cloud's answer, then runs.
func TestRootUnfamiliarHeldUntilAnswer(t *testing.T) {
	fs := privateTmpfs(t)
	p, _ := program(t, fs, "setup")
	c := startChild(t, childConfig{Paths: []string{fs}, FirstSightMS: 10_000, AskDelayMS: 300})
	d, err := run(p)
	if err != nil {
		t.Fatal(err)
	}
	// Deterministic lower bound: the exec cannot finish before the answer.
	if d < 300*time.Millisecond {
		t.Errorf("ran after %v, before the cloud's answer at 300ms", d)
	}
	if st := c.stats(); st.Held != 1 || st.TimedOut != 0 {
		t.Errorf("stats = %+v", st)
	}
}

// A cloud that never answers: the first unfamiliar program runs at its
// deadline, later ones at once (the circuit is open).
func TestRootStalledCloudDeadline(t *testing.T) {
	fs := privateTmpfs(t)
	p1, _ := program(t, fs, "first")
	p2, _ := program(t, fs, "second")
	c := startChild(t, childConfig{Paths: []string{fs}, FirstSightMS: 700, AskStall: true, CircuitMinMS: 60_000})
	d, err := run(p1)
	if err != nil {
		t.Fatal(err)
	}
	// Bounds: not before the deadline; well within it plus a loaded
	// machine's scheduling delay.
	if d < 700*time.Millisecond || d > 700*time.Millisecond+2*time.Second {
		t.Errorf("first ran after %v; want its 700ms deadline", d)
	}
	d, err = run(p2)
	if err != nil {
		t.Fatal(err)
	}
	if d >= 700*time.Millisecond {
		t.Errorf("second waited %v with the circuit open", d)
	}
	if st := c.stats(); st.TimedOut != 1 || st.Skipped != 1 || !st.CircuitOpen {
		t.Errorf("stats = %+v", st)
	}
}

// The cloud unreachable: programs run at once.
func TestRootCloudDownRunsAtOnce(t *testing.T) {
	fs := privateTmpfs(t)
	p1, _ := program(t, fs, "a")
	p2, _ := program(t, fs, "b")
	c := startChild(t, childConfig{Paths: []string{fs}, FirstSightMS: 10_000, AskError: true})
	for _, p := range []string{p1, p2} {
		d, err := run(p)
		if err != nil {
			t.Fatal(err)
		}
		if d > 2*time.Second {
			t.Errorf("%s waited %v with the cloud down", filepath.Base(p), d)
		}
	}
	if st := c.stats(); st.Held != 1 || st.Skipped != 1 || st.Failed != 1 {
		t.Errorf("stats = %+v", st)
	}
}

// Killing the listener while it holds an execution releases it.
func TestRootKilledListenerReleasesExecution(t *testing.T) {
	fs := privateTmpfs(t)
	p, _ := program(t, fs, "held")
	c := startChild(t, childConfig{Paths: []string{fs}, FirstSightMS: 60_000, AskStall: true})
	type result struct {
		at  time.Time
		err error
	}
	done := make(chan result, 1)
	go func() {
		_, err := run(p)
		done <- result{time.Now(), err}
	}()
	c.waitHeld(1)
	select {
	case r := <-done:
		t.Fatalf("execution finished while held: %v", r.err)
	default:
	}
	killed := time.Now()
	c.cmd.Process.Kill()
	select {
	case r := <-done:
		if r.err != nil {
			t.Errorf("released execution: %v", r.err)
		}
		if d := r.at.Sub(killed); d > time.Second {
			t.Errorf("execution ran %v after the listener was killed; want within a second", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("execution still held 10s after the listener was killed")
	}
}

// Stopping the guard (consent withdrawn) allows what it holds at once.
func TestRootStopReleasesExecution(t *testing.T) {
	fs := privateTmpfs(t)
	p, _ := program(t, fs, "held")
	c := startChild(t, childConfig{Paths: []string{fs}, FirstSightMS: 60_000, AskStall: true})
	done := make(chan error, 1)
	go func() {
		_, err := run(p)
		done <- err
	}()
	c.waitHeld(1)
	// Not by closing stdin: the held process, stopped inside execve,
	// still has a copy of this process's descriptors, the pipe's too.
	fmt.Fprintln(c.in, "stop")
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("released execution: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("execution still held 10s after the guard was told to stop")
	}
	if l := c.next(); l != "stopped context canceled" {
		t.Errorf("listener: %q", l)
	}
}

// The listener's own children are never held: the agent never waits on
// itself.
func TestRootOwnExecutionsAllowedAtOnce(t *testing.T) {
	fs := privateTmpfs(t)
	p, _ := program(t, fs, "helper")
	c := startChild(t, childConfig{Paths: []string{fs}, FirstSightMS: 60_000, AskStall: true})
	l := c.send("exec " + p)
	var ms int
	var rest string
	if _, err := fmt.Sscanf(l, "exec %d %s", &ms, &rest); err != nil || rest != "<nil>" {
		t.Fatalf("listener's own exec: %q", l)
	}
	if st := c.stats(); st.Self != 1 || st.Held != 0 {
		t.Errorf("stats = %+v", st)
	}
}

// A program found good gets an ignore mark: its next executions raise no
// event, until it is modified or the marks are invalidated.
func TestRootIgnoreMarks(t *testing.T) {
	fs := privateTmpfs(t)
	p, _ := program(t, fs, "tool")
	c := startChild(t, childConfig{Paths: []string{fs}, FirstSightMS: 10_000})
	events := func() uint64 { return c.stats().Events }
	for i := range 3 {
		if _, err := run(p); err != nil {
			t.Fatal(err)
		}
		if n := events(); n != 1 {
			t.Fatalf("after %d runs, %d permission events; want 1 (then marked)", i+1, n)
		}
	}
	if st := c.stats(); st.Marked != 1 {
		t.Errorf("stats = %+v", st)
	}
	// Modified: the kernel clears the mark.
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write([]byte{0})
	f.Close()
	if _, err := run(p); err != nil {
		t.Fatal(err)
	}
	if n := events(); n != 2 {
		t.Fatalf("after a modification, %d events; want 2", n)
	}
	if _, err := run(p); err != nil {
		t.Fatal(err)
	}
	if n := events(); n != 2 {
		t.Fatalf("the modified file was not marked again: %d events", n)
	}
	if l := c.send("invalidate"); l != "ok" {
		t.Fatal(l)
	}
	if _, err := run(p); err != nil {
		t.Fatal(err)
	}
	if n := events(); n != 3 {
		t.Fatalf("after Invalidate, %d events; want 3", n)
	}
}
