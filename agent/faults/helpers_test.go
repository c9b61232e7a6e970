package faults

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/internal/spawn"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/agent/testenv"
	"github.com/cloudprotect/cloudprotect/wire"
)

// childEnv turns the test binary into a local API client (see child).
const childEnv = "CLOUDPROTECT_FAULTS_CHILD"

func TestMain(m *testing.M) {
	spawn.MaybeChild()
	if op := os.Getenv(childEnv); op != "" {
		os.Exit(child(op, os.Getenv("CLOUDPROTECT_SOCKET")))
	}
	if os.Getenv("CLOUDPROTECT_FAULTS") != "" {
		copyClient()
	}
	code := m.Run()
	if clientBin != "" {
		os.RemoveAll(filepath.Dir(clientBin))
	}
	if tinyPath != "" && tinyPath != "/bin/true" {
		os.RemoveAll(filepath.Dir(tinyPath))
	}
	if binDir != "" && os.Getenv("CLOUDPROTECT_FAULTS_BIN") == "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// full reports whether the long form was asked for (CLOUDPROTECT_FAULTS=full).
func full() bool { return os.Getenv("CLOUDPROTECT_FAULTS") == "full" }

// scale returns ci in the bounded form and long in the full form.
func scale(ci, long int) int {
	if full() {
		return long
	}
	return ci
}

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// binaries builds cloudprotectd, cloudprotect-server and cloudprotect
// once per test run and returns their folder. CLOUDPROTECT_FAULTS_BIN
// names a folder of binaries built elsewhere instead (for instance from a
// deliberately broken copy of the tree, to see the cases fail).
func binaries(t *testing.T) string {
	t.Helper()
	if dir := os.Getenv("CLOUDPROTECT_FAULTS_BIN"); dir != "" {
		return dir
	}
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "cloudprotect-faults-bin-")
		if buildErr != nil {
			return
		}
		os.Chmod(binDir, 0o755)
		root, err := moduleRoot()
		if err != nil {
			buildErr = err
			return
		}
		cmd := exec.Command("go", "build", "-o", binDir+"/",
			"./cmd/cloudprotectd", "./cmd/cloudprotect-server", "./cmd/cloudprotect")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("build binaries: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binDir
}

func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod above the test's folder")
		}
		dir = parent
	}
}

// worldDir makes a temporary folder every local user can traverse (for
// clients run as other users), removed when the test ends.
func worldDir(t *testing.T, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// agentProc is a real cloudprotectd process.
type agentProc struct {
	t        *testing.T
	bin      string
	system   bool
	StateDir string
	Socket   string
	Policy   string
	Home     string
	Server   string
	env      []string
	logPath  string

	// cloud, when set, is where sent records are counted: a record
	// may leave the queue for it at any time.
	cloud *cloud

	cmd    *exec.Cmd
	exited chan struct{}
	Client *localapi.Client
	starts int
}

type agentOpts struct {
	// System runs the system agent (root, socket open to every user);
	// otherwise --user.
	System bool
	// StateDir, when set, is used instead of a fresh folder.
	StateDir string
	// Home is the person's home (user mode): their Downloads are watched.
	Home string
	// Server is the Security Network URL (default: nothing listens).
	Server string
	// Cloud, when set, is the server: records may leave the queue for it,
	// and the helpers count them there too.
	Cloud *cloud
}

// newAgent prepares an agent in a fresh folder; start runs it.
func newAgent(t *testing.T, o agentOpts) *agentProc {
	t.Helper()
	dir := worldDir(t, "cloudprotect-faults-")
	a := &agentProc{
		t:        t,
		bin:      filepath.Join(binaries(t), "cloudprotectd"),
		system:   o.System,
		StateDir: o.StateDir,
		Socket:   filepath.Join(dir, "run", "cloudprotectd.sock"),
		Policy:   filepath.Join(dir, "policy.json"),
		Home:     o.Home,
		Server:   o.Server,
		logPath:  filepath.Join(dir, "agent.log"),
	}
	if a.StateDir == "" {
		a.StateDir = filepath.Join(dir, "state")
	}
	if a.Home == "" {
		// Not ".../home/...": the cloud refuses paths holding "/home/"
		// anywhere (see TestOddPathKeepsBatch).
		a.Home = filepath.Join(dir, "person")
		os.MkdirAll(filepath.Join(a.Home, "Downloads"), 0o755)
	}
	if o.Cloud != nil {
		a.cloud = o.Cloud
		if a.Server == "" {
			a.Server = o.Cloud.URL
		}
	}
	if a.Server == "" {
		a.Server = "http://127.0.0.1:1"
	}
	a.Client = localapi.NewClient(a.Socket)
	t.Cleanup(func() {
		if a.running() {
			a.kill()
		}
		a.Client.Close()
		if bad := a.crashes(); bad != "" {
			t.Errorf("agent log shows a crash:\n%s", bad)
		}
		if t.Failed() {
			t.Logf("agent log (last lines):\n%s", tail(a.logText(), 40))
		}
	})
	return a
}

// start runs the agent and waits until it answers.
func (a *agentProc) start() {
	a.t.Helper()
	args := []string{"--state-dir", a.StateDir, "--socket", a.Socket, "--policy", a.Policy, "--server", a.Server}
	if !a.system {
		args = append([]string{"--user"}, args...)
	}
	logf, err := os.OpenFile(a.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		a.t.Fatal(err)
	}
	fmt.Fprintf(logf, "=== start %d\n", a.starts+1)
	cmd := exec.Command(a.bin, args...)
	cmd.Env = append([]string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + a.Home,
		"XDG_CONFIG_HOME=" + filepath.Join(a.Home, ".config"),
		"XDG_RUNTIME_DIR=" + filepath.Dir(filepath.Dir(a.Socket)),
	}, a.env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		a.t.Fatal(err)
	}
	logf.Close()
	a.cmd = cmd
	a.exited = make(chan struct{})
	go func() { cmd.Wait(); close(a.exited) }()
	a.starts++
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := a.Client.Status(ctx)
		cancel()
		if err == nil {
			return
		}
		select {
		case <-a.exited:
			a.t.Fatalf("agent exited at start: %v\n%s", cmd.ProcessState, tail(a.logText(), 20))
		default:
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("agent not answering 20s after start: %v\n%s", err, tail(a.logText(), 20))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (a *agentProc) running() bool {
	if a.cmd == nil {
		return false
	}
	select {
	case <-a.exited:
		return false
	default:
		return true
	}
}

func (a *agentProc) pid() int { return a.cmd.Process.Pid }

// kill sends SIGKILL and waits for the process to be gone.
func (a *agentProc) kill() {
	a.t.Helper()
	a.cmd.Process.Signal(syscall.SIGKILL)
	<-a.exited
	a.Client.Close()
}

// stop asks the agent to stop (SIGTERM) and checks it stopped cleanly.
func (a *agentProc) stop() {
	a.t.Helper()
	a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.exited:
	case <-time.After(30 * time.Second):
		a.cmd.Process.Signal(syscall.SIGKILL)
		<-a.exited
		a.t.Fatalf("agent did not stop within 30s of SIGTERM")
	}
	a.Client.Close()
	if !a.cmd.ProcessState.Success() {
		a.t.Errorf("agent stopped with %v", a.cmd.ProcessState)
	}
}

func (a *agentProc) logText() string {
	b, _ := os.ReadFile(a.logPath)
	return string(b)
}

// crashes returns the log lines that show a panic, a fatal runtime error
// or a data race.
func (a *agentProc) crashes() string {
	var out []string
	for _, l := range strings.Split(a.logText(), "\n") {
		if strings.HasPrefix(l, "panic:") || strings.HasPrefix(l, "fatal error:") || strings.Contains(l, "DATA RACE") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func (a *agentProc) status() api.Status {
	a.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := a.Client.Status(ctx)
	if err != nil {
		a.t.Fatalf("status: %v", err)
	}
	return st
}

func (a *agentProc) participate() api.Status {
	a.t.Helper()
	return a.setParticipation(true)
}

func (a *agentProc) leave() api.Status {
	a.t.Helper()
	return a.setParticipation(false)
}

func (a *agentProc) setParticipation(on bool) api.Status {
	a.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	req := api.ParticipationRequest{Participate: on, Via: "cli"}
	if on {
		req.StatementVersion = consent.StatementVersion
	}
	st, err := a.Client.SetParticipation(ctx, req)
	if err != nil {
		a.t.Fatalf("participate=%v: %v", on, err)
	}
	return st
}

// waitStatus waits (bounded) until the status satisfies ok.
func (a *agentProc) waitStatus(what string, ok func(api.Status) bool) api.Status {
	a.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		st := a.status()
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("timed out waiting for %s; status %+v", what, st)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitCollecting waits until the exec source runs.
func (a *agentProc) waitCollecting() {
	a.t.Helper()
	a.waitStatus("collection to start", func(s api.Status) bool {
		return s.Participation.Collecting && s.Agent.ExecSource != ""
	})
}

// queued returns every record waiting to be sent, by SHA-256: a program
// in the batch waiting for the cloud and after it is summed up.
func (a *agentProc) queued() (api.QueuePreview, map[string]wire.Record) {
	a.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	q, err := a.Client.Queue(ctx)
	if err != nil {
		a.t.Fatalf("queue: %v", err)
	}
	m := make(map[string]wire.Record, len(q.Records))
	for _, r := range q.Records {
		if prev, ok := m[r.SHA256]; ok {
			r.ExecCount += prev.ExecCount
			r.Loaded = r.Loaded || prev.Loaded
		}
		m[r.SHA256] = r.Record
	}
	return q, m
}

// waitRecord waits until the queue holds a record for sha satisfying ok.
func (a *agentProc) waitRecord(sha string, what string, ok func(wire.Record) bool) wire.Record {
	a.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, m := a.queued()
		if r, found := m[sha]; found && ok(r) {
			return r
		}
		if time.Now().After(deadline) {
			r := m[sha]
			a.t.Fatalf("timed out waiting for %s (record now %+v)", what, r)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// corruptFiles lists files the queue or the consent store set aside.
func (a *agentProc) corruptFiles() []string {
	m, _ := filepath.Glob(filepath.Join(a.StateDir, "*.corrupt-*"))
	return m
}

// procStats is what the kernel says about a process.
type procStats struct {
	RSSKiB, HWMKiB int
	Threads, FDs   int
}

func (p procStats) String() string {
	return fmt.Sprintf("rss=%d KiB hwm=%d KiB threads=%d fds=%d", p.RSSKiB, p.HWMKiB, p.Threads, p.FDs)
}

func readProc(t testing.TB, pid int) procStats {
	t.Helper()
	var ps procStats
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("read process %d: %v", pid, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		n, _ := strconv.Atoi(strings.Fields(v + " 0")[0])
		switch k {
		case "VmRSS":
			ps.RSSKiB = n
		case "VmHWM":
			ps.HWMKiB = n
		case "Threads":
			ps.Threads = n
		}
	}
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatalf("read process %d descriptors: %v", pid, err)
	}
	ps.FDs = len(ents)
	return ps
}

// uniqueProgram writes a copy of the tiny static program (or /bin/true
// when no C compiler is there) with random bytes appended, so its SHA-256
// is new, and returns its path and hash.
func uniqueProgram(t testing.TB, dir, name string) (string, string) {
	t.Helper()
	b, err := os.ReadFile(tinyProgram(t))
	if err != nil {
		t.Fatal(err)
	}
	b = append(b, []byte(rand.Text())...)
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b, 0o755); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return p, hex.EncodeToString(sum[:])
}

var (
	tinyOnce sync.Once
	tinyPath string
)

// tinyProgram returns a static program that exits at once (one exec is
// one executed file), built once.
func tinyProgram(t testing.TB) string {
	t.Helper()
	tinyOnce.Do(func() {
		if _, err := exec.LookPath("cc"); err != nil {
			tinyPath = "/bin/true"
			return
		}
		dir, err := os.MkdirTemp("", "cloudprotect-faults-tiny-")
		if err != nil {
			return
		}
		os.Chmod(dir, 0o755)
		p, err := spawn.BuildTiny(context.Background(), dir, "tiny", "faults")
		if err == nil {
			tinyPath = p
		}
	})
	if tinyPath == "" {
		t.Fatal("no program to execute: building the tiny program failed")
	}
	return tinyPath
}

func sha256File(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// runN executes path n times and waits for each.
func runN(t testing.TB, path string, n int) {
	t.Helper()
	for range n {
		if out, err := exec.Command(path).CombinedOutput(); err != nil {
			t.Fatalf("run %s: %v %s", path, err, out)
		}
	}
}

// storm executes a program over and over from its own goroutines until
// stopped. Attempts counts every exec before it is tried, so it is an
// upper bound of the executions that happened.
type storm struct {
	Attempts atomic.Int64
	cancel   context.CancelFunc
	wg       sync.WaitGroup
}

func startStorm(path string, workers int, pause time.Duration) *storm {
	ctx, cancel := context.WithCancel(context.Background())
	s := &storm{cancel: cancel}
	attr := &syscall.ProcAttr{Files: []uintptr{0, 1, 2}}
	argv := []string{filepath.Base(path)}
	for range workers {
		s.wg.Go(func() {
			for ctx.Err() == nil {
				s.Attempts.Add(1)
				pid, err := syscall.ForkExec(path, argv, attr)
				if err == nil {
					var ws syscall.WaitStatus
					for {
						if _, err := syscall.Wait4(pid, &ws, 0, nil); err != syscall.EINTR {
							break
						}
					}
				}
				if pause > 0 {
					select {
					case <-ctx.Done():
					case <-time.After(pause):
					}
				}
			}
		})
	}
	return s
}

// stop ends the storm and returns the number of attempts.
func (s *storm) stop() int64 {
	s.cancel()
	s.wg.Wait()
	return s.Attempts.Load()
}

// runAs runs a copy of this test binary as uid:gid, acting as a local API
// client with op (see child), and returns its output. The copy lives in a
// folder every user can read.
func runAs(t *testing.T, uid, gid int, socket string, op string, stdin *os.File) *exec.Cmd {
	t.Helper()
	copyClient()
	if clientBin == "" {
		t.Fatal("cannot copy the test binary for another user")
	}
	cmd := exec.Command(clientBin, "-test.run=^$")
	cmd.Env = []string{childEnv + "=" + op, "CLOUDPROTECT_SOCKET=" + socket}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	if stdin != nil {
		cmd.Stdin = stdin
	}
	return cmd
}

// copyClient copies this test binary where every user can run it. It runs
// from TestMain before any test, so that no process forked meanwhile holds
// the copy's write descriptor (which makes exec fail with "text file busy").
func copyClient() {
	clientOnce.Do(func() {
		exe, err := os.Executable()
		if err != nil {
			return
		}
		dir, err := os.MkdirTemp("", "cloudprotect-faults-client-")
		if err != nil {
			return
		}
		os.Chmod(dir, 0o755)
		b, err := os.ReadFile(exe)
		if err == nil && os.WriteFile(filepath.Join(dir, "client"), b, 0o755) == nil {
			clientBin = filepath.Join(dir, "client")
		}
	})
}

var (
	clientOnce sync.Once
	clientBin  string
)

// output runs cmd and returns its trimmed output, failing on error.
func output(t *testing.T, cmd *exec.Cmd) string {
	t.Helper()
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	if err := cmd.Run(); err != nil {
		t.Fatalf("client %v: %v\n%s", cmd.Env, err, buf.String())
	}
	return strings.TrimSpace(buf.String())
}

// faultCase starts a case of the fault suite: it runs under `make
// faults` (CLOUDPROTECT_FAULTS=ci or full), not in `make test`, and needs
// root: without it, it skips, or fails under CI=true.
func faultCase(t *testing.T) {
	t.Helper()
	if os.Getenv("CLOUDPROTECT_FAULTS") == "" {
		t.Skip("a case of the fault suite: run `make faults` (CLOUDPROTECT_FAULTS=ci, or full for the long form)")
	}
	testenv.NeedRoot(t)
}

// waitWatching waits until executions are really seen: the status names
// the exec source a moment before its kernel marks are in place, so a
// probe program is run until its record appears.
func (a *agentProc) waitWatching(work string) {
	a.t.Helper()
	a.waitCollecting()
	prog, sum := uniqueProgram(a.t, work, "probe")
	defer os.Remove(prog)
	deadline := time.Now().Add(20 * time.Second)
	for {
		runN(a.t, prog, 1)
		if a.seen(sum) > 0 {
			return
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("executions not seen 20s after collection started")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// seen returns the executions of sha the agent counted: queued, plus sent
// to the cloud when there is one. With a cloud, it first asks for an
// upload, so that what waits is sent.
func (a *agentProc) seen(sha string) uint64 {
	a.t.Helper()
	if a.cloud != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		a.Client.Upload(ctx)
		cancel()
	}
	_, m := a.queued()
	n := m[sha].ExecCount
	if a.cloud != nil {
		n += uint64(a.cloud.counts(a.t)[sha])
	}
	return n
}

// waitSeen waits until the agent counted exactly n executions of sha
// (queued or sent). A read taken while a batch moves from the queue to
// the cloud may count it twice; the next one does not.
func (a *agentProc) waitSeen(sha string, n uint64, what string) {
	a.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		got := a.seen(sha)
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("timed out waiting for %s: %d executions counted, want %d", what, got, n)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitLoaded waits until sha is known as a loaded file, queued or sent.
func (a *agentProc) waitLoaded(sha, what string) {
	a.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		a.seen(sha) // uploads first, when there is a cloud
		if _, m := a.queued(); m[sha].Loaded || (a.cloud != nil && a.cloud.loaded(a.t, sha)) {
			return
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
