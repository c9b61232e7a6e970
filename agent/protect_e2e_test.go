package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/agent/testenv"
	"github.com/cloudprotect/cloudprotect/server/store"
)

// Blocking at exec, end to end: the real cloudprotectd and the real
// reference cloud on loopback, as root.
//
// The agent holds executions with a permission group, so it never runs
// inside the test process: it is a child that the test stops at the end
// and kills with SIGKILL at a hard deadline (protectWatchdog), after which
// the kernel allows whatever it held. The tests whose agent holds
// executions for long (a slow, stalled or absent cloud) check only a
// private tmpfs (--protect-only), so programs that other tests run on the
// machine meanwhile are not held; TestProtectGroupOnlyWhileParticipating
// covers the real filesystems, with a cloud that refuses at once.
//
// Timing checks are the product's contract (deadlines), with bounds
// generous enough for a loaded 2-core machine: a lower bound proves an
// execution was held, an upper bound well below the next deadline proves
// it was not; the exact figures come from the benchmarks.

const protectWatchdog = 2 * time.Minute

var (
	toolsOnce sync.Once
	toolsErr  error
)

// protectBinaries builds cloudprotectd, cloudprotect and
// cloudprotect-server once per test run, beside the daemon.
func protectBinaries(t testing.TB) (daemonBin, cli string) {
	t.Helper()
	testenv.NeedRoot(t)
	daemonBin = daemon(t)
	dir := filepath.Dir(daemonBin)
	toolsOnce.Do(func() {
		out, err := exec.Command("go", "build", "-o", dir+"/", "../cmd/cloudprotect", "../cmd/cloudprotect-server").CombinedOutput()
		if err != nil {
			toolsErr = fmt.Errorf("%v\n%s", err, out)
		}
	})
	if toolsErr != nil {
		t.Fatalf("build: %v", toolsErr)
	}
	return daemonBin, filepath.Join(dir, "cloudprotect")
}

// testCloud is the reference cloud on loopback, in a process of its own,
// optionally behind a proxy (another process) that delays lookups.
//
// Neither may run in the test process: it executes programs, and Go holds
// a garbage collection's stop-the-world while a thread is inside vfork,
// so a cloud in the same process would stall until the execution it is
// asked about is decided: until its deadline.
type testCloud struct {
	URL string
}

// cloudOpts say what the cloud knows and how slow its lookups are.
type cloudOpts struct {
	malicious   []string
	lookupDelay time.Duration
}

const proxyEnv = "CLOUDPROTECT_TEST_LOOKUP_PROXY"

func startTestCloud(t testing.TB, o cloudOpts) *testCloud {
	t.Helper()
	d, _ := protectBinaries(t)
	bin := filepath.Join(filepath.Dir(d), "cloudprotect-server")
	db := "sqlite:" + filepath.Join(t.TempDir(), "cloud.db")
	if len(o.malicious) > 0 {
		ctx := context.Background()
		st, err := store.Open(ctx, db, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := st.ImportLists(ctx, "test feed", map[string][]string{store.ListMalicious: o.malicious}, false, time.Now()); err != nil {
			t.Fatal(err)
		}
		st.Close()
	}
	addr := freeLoopback(t)
	startHelper(t, "cloud", exec.Command(bin, "serve", "--db", db, "--listen", addr, "--log-requests=false", "--no-console"), addr)
	url := "http://" + addr
	if o.lookupDelay > 0 {
		paddr := freeLoopback(t)
		proxy := exec.Command(os.Args[0], "-test.run=^$")
		proxy.Env = append(os.Environ(), fmt.Sprintf("%s=%s|%s|%s", proxyEnv, paddr, url, o.lookupDelay))
		startHelper(t, "lookup proxy", proxy, paddr)
		url = "http://" + paddr
	}
	return &testCloud{URL: url}
}

// freeLoopback returns a loopback address nothing listens on.
func freeLoopback(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// startHelper starts cmd, stopped (and at worst killed) when the test
// ends, and waits until addr accepts connections.
func startHelper(t testing.TB, what string, cmd *exec.Cmd, addr string) {
	t.Helper()
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	for i := 0; ; i++ {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
		select {
		case <-exited:
			t.Fatalf("%s exited:\n%s", what, log.String())
		default:
		}
		if i == 400 {
			t.Fatalf("%s did not start:\n%s", what, log.String())
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// lookupProxy serves "LISTEN|TARGET|DELAY" from proxyEnv: a reverse proxy
// to the cloud that answers reputation lookups DELAY late.
func lookupProxy(spec string) int {
	parts := strings.Split(spec, "|")
	if len(parts) != 3 {
		return 2
	}
	target, err := url.Parse(parts[1])
	delay, derr := time.ParseDuration(parts[2])
	if err != nil || derr != nil {
		return 2
	}
	rp := httputil.NewSingleHostReverseProxy(target)
	err = http.ListenAndServe(parts[0], http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/reputation/sha256" {
			select {
			case <-time.After(delay):
			case <-r.Context().Done():
				return
			}
		}
		rp.ServeHTTP(w, r)
	}))
	fmt.Fprintln(os.Stderr, err)
	return 1
}

// protectingAgent is a cloudprotectd child process.
type protectingAgent struct {
	cmd    *exec.Cmd
	client *localapi.Client
	socket string
	log    *bytes.Buffer
	exited chan struct{}
	stop   func() // SIGTERM, then SIGKILL after 15 s; the test's cleanup calls it
}

// startProtectingAgent runs the agent in user mode (as root, so with
// fanotify) against server, with policy (JSON, "" for none).
func startProtectingAgent(t testing.TB, bin, server, policy string, args ...string) *protectingAgent {
	t.Helper()
	dir, err := os.MkdirTemp("", "cloudprotect-protect-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if policy != "" {
		if err := os.WriteFile(filepath.Join(dir, "policy.json"), []byte(policy), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	sock := filepath.Join(dir, "run", "cloudprotectd.sock")
	ctx, cancel := context.WithTimeout(context.Background(), protectWatchdog)
	cmd := exec.CommandContext(ctx, bin, "--user", "--state-dir", filepath.Join(dir, "state"), "--socket", sock,
		"--policy", filepath.Join(dir, "policy.json"), "--server", server)
	cmd.Args = append(cmd.Args, args...)
	a := &protectingAgent{cmd: cmd, socket: sock, log: &bytes.Buffer{}, exited: make(chan struct{})}
	cmd.Stderr = a.log
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	go func() {
		cmd.Wait()
		close(a.exited)
	}()
	a.client = localapi.NewClient(sock)
	var once sync.Once
	a.stop = func() {
		once.Do(func() {
			cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-a.exited:
			case <-time.After(15 * time.Second):
				t.Errorf("agent did not stop within 15s of SIGTERM; killed")
				cmd.Process.Kill()
				<-a.exited
			}
			cancel()
			a.client.Close()
			if t.Failed() {
				t.Logf("agent log:\n%s", a.log.String())
			}
		})
	}
	t.Cleanup(a.stop)
	for i := 0; ; i++ {
		if _, err := a.client.Status(context.Background()); err == nil {
			return a
		}
		if i == 400 {
			t.Fatalf("agent did not start:\n%s", a.log.String())
		}
		time.Sleep(25 * time.Millisecond)
	}
}

func (a *protectingAgent) participate(t testing.TB) {
	t.Helper()
	if _, err := a.client.SetParticipation(context.Background(), api.ParticipationRequest{
		Participate: true, StatementVersion: consent.StatementVersion, Via: "cli"}); err != nil {
		t.Fatal(err)
	}
}

func (a *protectingAgent) leave(t *testing.T) {
	t.Helper()
	if _, err := a.client.SetParticipation(context.Background(), api.ParticipationRequest{Participate: false, Via: "cli"}); err != nil {
		t.Fatal(err)
	}
}

// waitStatus waits (at most 15 s) until ok holds for the status.
func (a *protectingAgent) waitStatus(t testing.TB, what string, ok func(api.Status) bool) api.Status {
	t.Helper()
	var st api.Status
	var err error
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		st, err = a.client.Status(context.Background())
		if err == nil && ok(st) {
			return st
		}
	}
	t.Fatalf("status never showed %s; last %+v (%v)", what, st.Protection, err)
	return st
}

func (a *protectingAgent) active(t testing.TB) {
	t.Helper()
	a.waitStatus(t, "blocking active", func(st api.Status) bool { return st.Protection.Active })
}

// fanotifyGroups counts the agent's fanotify descriptors.
func (a *protectingAgent) fanotifyGroups(t *testing.T) int {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", a.cmd.Process.Pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if l, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil && l == "anon_inode:[fanotify]" {
			n++
		}
	}
	return n
}

// privateTmpfs mounts a tmpfs for one test, removed when it ends. Tests
// whose agent holds executions for long check only this filesystem
// (cloudprotectd --protect-only), so that programs other tests run on the
// machine meanwhile are not held with them.
func privateTmpfs(t testing.TB) string {
	t.Helper()
	mnt := filepath.Join(t.TempDir(), "fs")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", mnt, "tmpfs", syscall.MS_NOSUID|syscall.MS_NODEV, "size=64m,mode=0755"); err != nil {
		testenv.Unavailable(t, "cannot mount a tmpfs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })
	return mnt
}

// timedRun executes path and says how long until it finished.
func timedRun(path string) (time.Duration, error) {
	t0 := time.Now()
	err := exec.Command(path).Run()
	return time.Since(t0), err
}

// A program the cloud knows as malicious fails with EPERM and a block
// comes on the event stream; `cloudprotect allow` lets it run.
func TestProtectBlocksMaliciousEndToEnd(t *testing.T) {
	daemon, cli := protectBinaries(t)
	fs := privateTmpfs(t)
	downloads := filepath.Join(fs, "Downloads")
	os.Mkdir(downloads, 0o755)
	bad, sum := uniqueProgram(t, downloads, "invoice-viewer")
	cloud := startTestCloud(t, cloudOpts{malicious: []string{sum}})
	// Ample time for a loaded machine's lookups.
	a := startProtectingAgent(t, daemon, cloud.URL, `{"first_sight_timeout_ms": 10000}`, "--protect-only", fs)
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	blocks := make(chan api.Alert, 8)
	go a.client.Events(ctx, func(ev api.Event) error {
		if ev.Alert != nil && ev.Alert.Action == api.AlertActionBlocked {
			blocks <- *ev.Alert
		}
		return nil
	})
	a.participate(t)
	a.active(t)

	if _, err := timedRun(bad); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("malicious program: %v; want EPERM", err)
	}
	select {
	case al := <-blocks:
		if al.SHA256 != sum || al.Verdict != "malicious" || al.Program != "invoice-viewer" || al.Source != "feed" {
			t.Errorf("block = %+v", al)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("no block on the event stream within 15s")
	}
	st := a.waitStatus(t, "the block counted", func(st api.Status) bool { return st.Protection.Blocked == 1 })
	if st.Protection.LastBlock == nil || st.Protection.LastBlock.SHA256 != sum {
		t.Errorf("last block = %+v", st.Protection.LastBlock)
	}
	// Again: the cached verdict denies it without asking.
	if _, err := timedRun(bad); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("second run: %v; want EPERM", err)
	}

	env := append(os.Environ(), "CLOUDPROTECT_SOCKET="+a.socket, "LANGUAGE=en")
	blocked := exec.Command(cli, "blocked")
	blocked.Env = env
	if out, err := blocked.CombinedOutput(); err != nil || !strings.Contains(string(out), sum) ||
		!strings.Contains(string(out), "invoice-viewer") || !strings.Contains(string(out), "a threat feed of the Security Network") {
		t.Errorf("cloudprotect blocked: %v\n%s", err, out)
	}
	allow := exec.Command(cli, "allow", sum, "--reason", "our own invoice viewer")
	allow.Env = env
	if out, err := allow.CombinedOutput(); err != nil || !strings.Contains(string(out), "Allowed on this computer") {
		t.Fatalf("cloudprotect allow: %v\n%s", err, out)
	}
	if _, err := timedRun(bad); err != nil {
		t.Fatalf("after cloudprotect allow: %v", err)
	}
	remove := exec.Command(cli, "allow", "--remove", sum)
	remove.Env = allow.Env
	if out, err := remove.CombinedOutput(); err != nil {
		t.Fatalf("cloudprotect allow --remove: %v\n%s", err, out)
	}
	if _, err := timedRun(bad); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("after the exception was removed: %v; want EPERM", err)
	}
}

// An unfamiliar downloaded program waits for the cloud's answer
// ("unknown"), then runs.
func TestProtectHoldsUnfamiliarUntilCloudAnswers(t *testing.T) {
	daemon, _ := protectBinaries(t)
	cloud := startTestCloud(t, cloudOpts{lookupDelay: 400 * time.Millisecond})
	fs := privateTmpfs(t)
	a := startProtectingAgent(t, daemon, cloud.URL, `{"first_sight_timeout_ms": 10000}`, "--protect-only", fs)
	a.participate(t)
	a.active(t)
	p, _ := uniqueProgram(t, fs, "setup.bin")
	d, err := timedRun(p)
	if err != nil {
		t.Fatal(err)
	}
	// It cannot have run before the cloud answered, and it ran well
	// before its 10 s deadline: on the answer.
	if d < 400*time.Millisecond || d >= 5*time.Second {
		t.Errorf("ran after %v; want after the cloud's answer at 400ms, long before the 10s deadline", d)
	}
	a.waitStatus(t, "one execution held", func(st api.Status) bool { return st.Protection.Held >= 1 })
}

// A cloud that answers only after 10 s: the program runs at the deadline
// (first_sight_timeout_ms), and the next one does not wait.
func TestProtectSlowCloudRunsAtDeadline(t *testing.T) {
	daemon, _ := protectBinaries(t)
	cloud := startTestCloud(t, cloudOpts{lookupDelay: 10 * time.Second})
	dir := privateTmpfs(t)
	a := startProtectingAgent(t, daemon, cloud.URL, `{"first_sight_timeout_ms": 1500}`, "--protect-only", dir)
	a.participate(t)
	a.active(t)
	p1, _ := uniqueProgram(t, dir, "first")
	p2, _ := uniqueProgram(t, dir, "second")
	d, err := timedRun(p1)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("held until %v (deadline 1.5s)", d)
	if d < 1500*time.Millisecond || d > 2*time.Second {
		t.Errorf("ran after %v; want at its 1.5s deadline", d)
	}
	d, err = timedRun(p2)
	if err != nil {
		t.Fatal(err)
	}
	if d >= time.Second {
		t.Errorf("the next unfamiliar program waited %v; the circuit should let it run at once", d)
	}
}

// The cloud down: programs run at once, later ones too.
func TestProtectCloudDownRunsAtOnce(t *testing.T) {
	daemon, _ := protectBinaries(t)
	dir := privateTmpfs(t)
	a := startProtectingAgent(t, daemon, "http://127.0.0.1:1", "", "--protect-only", dir)
	a.participate(t)
	a.active(t)
	for _, name := range []string{"one", "two", "three"} {
		p, _ := uniqueProgram(t, dir, name)
		d, err := timedRun(p)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s ran after %v", name, d)
		if d >= time.Second {
			t.Errorf("%s waited %v with the cloud down; want at once", name, d)
		}
	}
}

// The agent SIGKILLed while it holds an execution: the kernel lets the
// execution proceed.
func TestProtectAgentKilledReleasesExecution(t *testing.T) {
	daemon, _ := protectBinaries(t)
	cloud := startTestCloud(t, cloudOpts{lookupDelay: time.Minute})
	fs := privateTmpfs(t)
	a := startProtectingAgent(t, daemon, cloud.URL, `{"first_sight_timeout_ms": 10000}`, "--protect-only", fs)
	a.participate(t)
	a.active(t)
	p, _ := uniqueProgram(t, fs, "held")
	type result struct {
		at  time.Time
		err error
	}
	done := make(chan result, 1)
	go func() {
		_, err := timedRun(p)
		done <- result{time.Now(), err}
	}()
	a.waitStatus(t, "the execution held", func(st api.Status) bool { return st.Protection.Held >= 1 })
	select {
	case r := <-done:
		t.Fatalf("execution finished while held: %v", r.err)
	default:
	}
	killed := time.Now()
	a.cmd.Process.Kill()
	select {
	case r := <-done:
		if r.err != nil {
			t.Errorf("released execution: %v", r.err)
		}
		if d := r.at.Sub(killed); d > time.Second {
			t.Errorf("ran %v after the agent was killed; want within a second", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("execution still held 10s after the agent was killed")
	}
}

// With "protection": "alert", nothing is denied: the malicious program
// runs and the person is alerted.
func TestProtectAlertModeDeniesNothing(t *testing.T) {
	daemon, _ := protectBinaries(t)
	bad, sum := uniqueProgram(t, t.TempDir(), "dropper")
	cloud := startTestCloud(t, cloudOpts{malicious: []string{sum}})
	a := startProtectingAgent(t, daemon, cloud.URL, `{"protection": "alert"}`)
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	alerts := make(chan api.Alert, 8)
	go a.client.Events(ctx, func(ev api.Event) error {
		if ev.Alert != nil {
			alerts <- *ev.Alert
		}
		return nil
	})
	a.participate(t)
	st := a.waitStatus(t, "collecting", func(st api.Status) bool { return st.Agent.ExecSource != "" })
	if st.Protection.Active || st.Protection.Mode != "alert" {
		t.Fatalf("protection = %+v; want alert mode, not active", st.Protection)
	}
	if n := a.fanotifyGroups(t); n != 1 {
		t.Errorf("%d fanotify groups in alert mode; want 1 (the exec source only)", n)
	}
	for range 2 {
		if _, err := timedRun(bad); err != nil {
			t.Fatalf("malicious program in alert mode: %v; want it to run", err)
		}
	}
	select {
	case al := <-alerts:
		if al.SHA256 != sum || al.Action != api.AlertActionAlerted {
			t.Errorf("alert = %+v", al)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no alert within 20s")
	}
}

// The permission group exists only while the person participates (and
// the policy says block): count the agent's fanotify descriptors.
func TestProtectGroupOnlyWhileParticipating(t *testing.T) {
	daemon, _ := protectBinaries(t)
	a := startProtectingAgent(t, daemon, "http://127.0.0.1:1", "")
	st := a.waitStatus(t, "the reason", func(st api.Status) bool { return st.Protection.Reason != "" })
	if st.Protection.Active || a.fanotifyGroups(t) != 0 {
		t.Fatalf("undecided: protection %+v, %d fanotify groups; want none", st.Protection, a.fanotifyGroups(t))
	}
	a.participate(t)
	a.active(t)
	if n := a.fanotifyGroups(t); n != 2 {
		t.Errorf("participating: %d fanotify groups; want 2 (exec source and permission group)", n)
	}
	// On the machine's own filesystems, with the cloud unreachable, an
	// unfamiliar program runs at once.
	p, _ := uniqueProgram(t, t.TempDir(), "on-root-fs")
	if d, err := timedRun(p); err != nil || d >= time.Second {
		t.Errorf("program on the root filesystem: %v after %v; want it to run at once", err, d)
	}
	if st := a.waitStatus(t, "decided", func(api.Status) bool { return true }); st.Protection.Held == 0 {
		t.Errorf("the program was not checked: %+v", st.Protection)
	}
	a.leave(t)
	a.waitStatus(t, "blocking off", func(st api.Status) bool { return !st.Protection.Active })
	deadline := time.Now().Add(10 * time.Second)
	for a.fanotifyGroups(t) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("after leaving: %d fanotify groups; want none", a.fanotifyGroups(t))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

const agentAsUserEnv = "CLOUDPROTECT_TEST_AGENT_AS_USER"

// agentAsUser runs a user-mode agent with its files under dir until
// SIGTERM: the test binary's copy, started as an ordinary account.
func agentAsUser(dir string) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	a, err := New(Config{
		Mode:       ModeUser,
		StateDir:   filepath.Join(dir, "state"),
		Socket:     filepath.Join(dir, "run", "cloudprotectd.sock"),
		PolicyPath: filepath.Join(dir, "policy.json"),
		Server:     "http://127.0.0.1:1",
		Logger:     slog.New(slog.NewTextHandler(os.Stderr, nil)),
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := a.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// An agent without root cannot have a permission group: its status says
// blocking needs the system agent, and it does not try again and again.
func TestProtectNeedsRoot(t *testing.T) {
	testenv.NeedRoot(t)
	acct := testenv.AddUser(t, "cpblk", "")
	dir, err := os.MkdirTemp("", "cloudprotect-protect-user-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	if err := os.Chown(dir, int(acct.UID), int(acct.GID)); err != nil {
		t.Fatal(err)
	}
	cmd := testenv.As(t, acct.UID, acct.GID, nil, agentAsUserEnv+"="+dir, "HOME="+dir, "XDG_RUNTIME_DIR="+dir)
	var log syncBuffer
	cmd.Stderr = &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	watchdog := time.AfterFunc(protectWatchdog, func() { cmd.Process.Kill() })
	t.Cleanup(func() {
		watchdog.Stop()
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("agent log:\n%s", log.String())
		}
	})
	a := &protectingAgent{cmd: cmd, client: localapi.NewClient(filepath.Join(dir, "run", "cloudprotectd.sock"))}
	defer a.client.Close()
	for i := 0; ; i++ {
		if _, err := a.client.Status(context.Background()); err == nil {
			break
		}
		if i == 400 {
			t.Fatalf("agent did not start:\n%s", log.String())
		}
		time.Sleep(25 * time.Millisecond)
	}
	a.participate(t)
	const why = "blocking needs the system agent, which runs as root"
	st := a.waitStatus(t, "why blocking is off", func(st api.Status) bool { return st.Protection.Reason == why })
	if st.Protection.Active || st.Protection.Mode != "block" {
		t.Errorf("protection = %+v", st.Protection)
	}
	time.Sleep(2 * time.Second)
	if n := strings.Count(log.String(), "blocking at exec needs root"); n != 1 {
		t.Errorf("%d attempts logged; want 1 until consent or policy change", n)
	}
	if n := a.fanotifyGroups(t); n > 1 {
		t.Errorf("%d fanotify groups; want at most the unprivileged exec source", n)
	}
}

// syncBuffer is a bytes.Buffer safe for a writer and a reader at once.
type syncBuffer struct {
	mu sync.Mutex // protects b
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
