package agent

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/execwatch"
	"github.com/cloudprotect/cloudprotect/agent/identify"
	"github.com/cloudprotect/cloudprotect/agent/queue"
)

// fakeSource is an exec source driven by the test through channels, so
// that the collector runs inside a synctest bubble.
type fakeSource struct {
	name    string
	limited string
	ready   chan struct{}
	// failEarly makes Serve fail before it is ready.
	failEarly error
	batches   chan []execwatch.Event
	fail      chan error
	// atStop is delivered when Serve is cancelled, as a real source
	// delivers what the kernel still held.
	atStop []execwatch.Event
}

func newFakeSource(name, limited string) *fakeSource {
	return &fakeSource{name: name, limited: limited, ready: make(chan struct{}), batches: make(chan []execwatch.Event),
		fail: make(chan error, 1)}
}

func (f *fakeSource) Name() string                  { return f.name }
func (f *fakeSource) Limited() (bool, string)       { return f.limited != "", f.limited }
func (f *fakeSource) Ready() <-chan struct{}        { return f.ready }
func (f *fakeSource) Stats() execwatch.Stats        { return execwatch.Stats{} }
func (f *fakeSource) send(b ...execwatch.Event)     { f.batches <- b }
func (f *fakeSource) stopWith(b ...execwatch.Event) { f.atStop = b }
func (f *fakeSource) failWith(err error)            { f.fail <- err }
func (f *fakeSource) Serve(ctx context.Context, out chan<- []execwatch.Event) error {
	if f.failEarly != nil {
		return f.failEarly
	}
	close(f.ready)
	for {
		select {
		case <-ctx.Done():
			if len(f.atStop) > 0 {
				out <- f.atStop
			}
			return ctx.Err()
		case b := <-f.batches:
			out <- b
		case err := <-f.fail:
			return err
		}
	}
}

// fakeChecker records the hashes the pipeline asks about.
type fakeChecker struct {
	mu     sync.Mutex // protects hashes
	hashes map[string]int
}

func (c *fakeChecker) Check(sha, _ string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.hashes == nil {
		c.hashes = map[string]int{}
	}
	c.hashes[sha]++
}

// harness is a collector over fake sources, a real consent record, a
// real queue and a real identifier.
type harness struct {
	t   *testing.T
	dir string
	c   *collector
	cm  *consent.Manager
	q   *queue.Queue
	rep *fakeChecker

	rnd *rand.Rand // the programs' contents; its seed is logged

	mu    sync.Mutex // protects built
	built []*fakeSource
	// make builds the sources of the chain, by position.
	make []func() *fakeSource
}

func newHarness(t *testing.T, chain ...func() *fakeSource) *harness {
	t.Helper()
	dir := t.TempDir()
	cm, err := consent.Open(consent.Options{StatePath: filepath.Join(dir, "consent.json"), PolicyPath: filepath.Join(dir, "policy.json")})
	if err != nil {
		t.Fatal(err)
	}
	q, err := queue.Open(filepath.Join(dir, "queue.db"), queue.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	seed := rand.Uint64()
	t.Logf("random seed %d", seed)
	h := &harness{t: t, dir: dir, cm: cm, q: q, rep: &fakeChecker{}, make: chain, rnd: rand.New(rand.NewPCG(seed, seed))}
	h.c = newCollector(collectorDeps{
		log:     testLogger(t),
		consent: cm,
		queue:   q,
		ident:   identify.New(identify.Options{MaxInline: 1024}),
		rep:     h.rep,
		runners: newRunners(),
		chain: func() ([]func(execwatch.Options) execwatch.Source, error) {
			var out []func(execwatch.Options) execwatch.Source
			for _, mk := range h.make {
				out = append(out, func(execwatch.Options) execwatch.Source {
					s := mk()
					h.mu.Lock()
					h.built = append(h.built, s)
					h.mu.Unlock()
					return s
				})
			}
			return out, nil
		},
		afterBatch: func() {},
		forget: func() {
			if err := q.Purge(); err != nil {
				t.Errorf("purge: %v", err)
			}
		},
		consentChanged: func() {},
		statusChanged:  func() {},
	})
	return h
}

// source returns the last source built.
func (h *harness) source() *fakeSource {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.built) == 0 {
		h.t.Fatal("no source built")
	}
	return h.built[len(h.built)-1]
}

func (h *harness) participate(on bool) {
	h.t.Helper()
	if _, err := h.cm.Set(on, consent.StatementVersion, consent.ViaCLI, 0); err != nil {
		h.t.Fatal(err)
	}
}

// program writes an executable file of n bytes with random contents and
// returns its path.
func (h *harness) program(name string, n int) string {
	h.t.Helper()
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(h.rnd.Uint32())
	}
	copy(b, "#!/bin/sh\n")
	p := filepath.Join(h.dir, name)
	if err := os.WriteFile(p, b, 0o755); err != nil {
		h.t.Fatal(err)
	}
	return p
}

func (h *harness) sha(path string) string {
	h.t.Helper()
	f, _, err := identify.New(identify.Options{MaxInline: 1 << 30}).IdentifyPath(path)
	if err != nil {
		h.t.Fatal(err)
	}
	return f.SHA256
}

// counts returns the executions stored per SHA-256, after a commit.
func (h *harness) counts() map[string]uint64 {
	h.t.Helper()
	if err := h.q.Flush(); err != nil {
		h.t.Fatalf("commit: %v", err)
	}
	recs, err := h.q.Records()
	if err != nil {
		h.t.Fatalf("read queue: %v", err)
	}
	m := map[string]uint64{}
	for _, r := range recs {
		m[r.SHA256] = r.ExecCount
	}
	return m
}

func execOf(path string, pid int32) execwatch.Event {
	return execwatch.Event{FD: -1, Path: path, PID: pid, UID: execwatch.UIDUnknown, Time: time.Now(), Kind: execwatch.KindExec}
}

// testLogger logs to the test's output.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// A stop while participating loses nothing: what the source still
// delivers, and a large file still being hashed, are committed before
// the collector returns.
func TestCollectorDrainsAtStop(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func() *fakeSource { return newFakeSource("fake", "") })
		small, big := h.program("small", 100), h.program("big", 4096)
		link := filepath.Join(h.dir, "big-link")
		if err := os.Link(big, link); err != nil {
			t.Fatal(err)
		}
		h.participate(true)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- h.c.Serve(ctx) }()
		synctest.Wait()
		src := h.source()
		src.send(execOf(small, 10), execOf(small, 11), execOf(big, 12))
		// At the stop the source delivers more: the large file under its
		// other name, twice, and the small one.
		src.stopWith(execOf(link, 13), execOf(link, 14), execOf(small, 15))
		synctest.Wait()
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Fatalf("Serve = %v, want context.Canceled", err)
		}
		got := h.counts()
		if got[h.sha(small)] != 3 || got[h.sha(big)] != 3 {
			t.Errorf("counts = %v; want 3 for the small and 3 for the large file", got)
		}
	})
}

// Withdrawing consent cancels the epoch, waits for it, then purges: an
// event the pipeline is adding at that moment is purged too. Without
// the wait, the purge would come first and the event would stay.
func TestCollectorWithdrawalAddsNothingAfterPurge(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func() *fakeSource { return newFakeSource("fake", "") })
		prog := h.program("prog", 100)
		release := make(chan struct{})
		var once sync.Once
		h.c.beforeAdd = func() { once.Do(func() { <-release }) }
		h.participate(true)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- h.c.Serve(ctx) }()
		synctest.Wait()
		h.source().send(execOf(prog, 10))
		synctest.Wait() // the pipeline waits in beforeAdd
		h.participate(false)
		synctest.Wait() // the collector did all it does before the add
		close(release)
		synctest.Wait()
		if got := h.counts(); len(got) != 0 {
			t.Errorf("after leaving the queue holds %v", got)
		}
		if !h.q.Empty() {
			t.Errorf("after leaving the queue is not empty: %+v", h.q.Stats())
		}
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Fatalf("Serve = %v", err)
		}
	})
}

// A source that fails while serving ends the epoch with its error; the
// supervisor starts the collector again after a delay and the next
// source of the chain runs, and the status says why.
func TestCollectorFallsBackWhenSourceFails(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t,
			func() *fakeSource { return newFakeSource("alpha", "") },
			func() *fakeSource { return newFakeSource("beta", "beta sees less") },
		)
		h.participate(true)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- supervise(ctx, testLogger(t), service{"collect", h.c.Serve}) }()
		synctest.Wait()
		if st := h.c.status(); st.source != "alpha" || len(st.reasons) != 0 {
			t.Fatalf("status = %+v, want alpha, not limited", st)
		}
		h.source().failWith(errors.New("kernel said no"))
		synctest.Wait()
		st := h.c.status()
		if st.source != "" || len(st.reasons) != 1 || !strings.Contains(st.reasons[0], "the alpha source stopped: kernel said no") {
			t.Fatalf("status while restarting = %+v", st)
		}
		time.Sleep(restartMin) // the supervisor's delay
		synctest.Wait()
		st = h.c.status()
		if st.source != "beta" || !strings.Contains(strings.Join(st.reasons, "; "), "beta sees less") ||
			!strings.Contains(strings.Join(st.reasons, "; "), "the alpha source stopped: kernel said no, so the beta source is used") {
			t.Fatalf("status after the restart = %+v", st)
		}
		prog := h.program("prog", 100)
		h.source().send(execOf(prog, 10))
		synctest.Wait()
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Fatalf("supervise = %v", err)
		}
		if got := h.counts()[h.sha(prog)]; got != 1 {
			t.Errorf("executions counted by the fallback source: %d, want 1", got)
		}
	})
}

// A source that cannot run here is skipped at once, and the status says
// why the lesser one runs.
func TestCollectorSkipsUnavailableSource(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t,
			func() *fakeSource {
				s := newFakeSource("alpha", "")
				s.failEarly = errors.New("not permitted")
				return s
			},
			func() *fakeSource { return newFakeSource("beta", "beta sees less") },
		)
		h.participate(true)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- h.c.Serve(ctx) }()
		synctest.Wait()
		st := h.c.status()
		if st.source != "beta" || !strings.Contains(strings.Join(st.reasons, "; "), "alpha: not permitted") {
			t.Errorf("status = %+v", st)
		}
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Fatalf("Serve = %v", err)
		}
	})
}

// The connector's process events are matched with fanotify's executions:
// a process whose program fanotify reported is left alone; one whose
// program it missed (or for which it reported only the dynamic loader)
// is identified through /proc/PID/exe; one already gone is counted as
// missed.
func TestPipelineMatchesProcessEvents(t *testing.T) {
	h := newHarness(t)
	sleepPath, err := exec.LookPath("sleep")
	if err != nil {
		t.Skip("no sleep program")
	}
	sleepPath, _ = filepath.EvalSymlinks(sleepPath)
	loader := ""
	for _, p := range []string{"/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1"} {
		if r, err := filepath.EvalSymlinks(p); err == nil {
			loader = r
		}
	}
	start := func() int32 {
		cmd := exec.Command(sleepPath, "30")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return int32(cmd.Process.Pid)
	}
	deps := h.c.collectorDeps
	deps.ident = identify.New(identify.Options{})
	p := newPipeline(deps)
	in := make(chan []execwatch.Event, 8)
	process := func(pid int32) execwatch.Event {
		return execwatch.Event{FD: -1, PID: pid, UID: execwatch.UIDUnknown, Kind: execwatch.KindProcess}
	}
	checkpoint := execwatch.Event{FD: -1, Kind: execwatch.KindCheckpoint}

	// Reported by fanotify: nothing more.
	seen := start()
	in <- []execwatch.Event{execOf(sleepPath, seen), process(seen), checkpoint}
	// Missed by fanotify: found through /proc.
	missed := start()
	in <- []execwatch.Event{process(missed), checkpoint}
	// Only the loader reported: the program itself was missed.
	if loader != "" {
		onlyLoader := start()
		in <- []execwatch.Event{execOf(loader, onlyLoader), process(onlyLoader), checkpoint}
	}
	// Gone before anyone looked.
	gone := exec.Command(sleepPath, "0")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	in <- []execwatch.Event{process(int32(gone.Process.Pid)), checkpoint}
	close(in)
	if err := p.run(context.Background(), in); err != nil {
		t.Fatal(err)
	}
	want := uint64(2)
	if loader != "" {
		want = 3
	}
	if got := h.counts()[h.sha(sleepPath)]; got != want {
		t.Errorf("executions of sleep = %d, want %d", got, want)
	}
	if got := p.supplemented.Load(); got != want-1 {
		t.Errorf("found through /proc: %d, want %d", got, want-1)
	}
	if got := p.missed.Load(); got != 1 {
		t.Errorf("missed: %d, want 1", got)
	}
}

// fakeWatcher records what the pipeline asks of a fanotify source.
type fakeWatcher struct{ ignored, watched int }

func (w *fakeWatcher) WatchFilesystemOf(int) error { w.watched++; return nil }
func (w *fakeWatcher) IgnoreFile(int) error        { w.ignored++; return nil }

// The dynamic loader is reported once and then ignored by the source; its
// runs are counted from the programs that name it, each run once: a
// loader event still in flight after the switch does not count again.
func TestPipelineCountsLoaderFromPrograms(t *testing.T) {
	h := newHarness(t)
	prog, err := exec.LookPath("true")
	if err != nil {
		t.Skip("no true program")
	}
	prog, _ = filepath.EvalSymlinks(prog)
	deps := h.c.collectorDeps
	deps.ident = identify.New(identify.Options{})
	p := newPipeline(deps)
	f, _, err := deps.ident.IdentifyPath(prog)
	if err != nil {
		t.Fatal(err)
	}
	if f.ELF == nil || f.ELF.Interpreter == "" {
		t.Skipf("%s is not dynamically linked", prog)
	}
	loaderPath, err := filepath.EvalSymlinks(f.ELF.Interpreter)
	if err != nil {
		t.Skipf("loader %s: %v", f.ELF.Interpreter, err)
	}
	w := &fakeWatcher{}
	p.setWatcher(w)
	open := func(path string, pid int32) execwatch.Event {
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		return execwatch.Event{FD: fd, PID: pid, UID: execwatch.UIDUnknown, Time: time.Now(), Kind: execwatch.KindExec}
	}
	in := make(chan []execwatch.Event, 4)
	// Run 1 and its loader; run 2 and its loader, reported though the
	// source was asked to ignore it (it was in the kernel's queue);
	// runs 3 and 4 without loader events.
	in <- []execwatch.Event{open(prog, 10), open(loaderPath, 10), open(prog, 11)}
	in <- []execwatch.Event{open(loaderPath, 11), open(prog, 12)}
	in <- []execwatch.Event{open(prog, 13)}
	close(in)
	if err := p.run(context.Background(), in); err != nil {
		t.Fatal(err)
	}
	got := h.counts()
	lf, _, err := deps.ident.IdentifyPath(loaderPath)
	if err != nil {
		t.Fatal(err)
	}
	if got[f.SHA256] != 4 || got[lf.SHA256] != 4 {
		t.Errorf("program ran %d times, loader %d; want 4 and 4", got[f.SHA256], got[lf.SHA256])
	}
	if w.ignored != 1 {
		t.Errorf("the source was asked to ignore the loader %d times, want 1", w.ignored)
	}
}

// BenchmarkPipelineKnownProgram is the pipeline's own work per execution
// of a program it has identified before, in batches of 100 as fanotify
// delivers them at 1,000 execs/s: an fstat and a cache lookup, the batch's
// tally, one queue update and one reputation check per batch, and the
// descriptors' close. The kernel's side (reading the events) is not in it.
func BenchmarkPipelineKnownProgram(b *testing.B) {
	dir := b.TempDir()
	cm, err := consent.Open(consent.Options{StatePath: filepath.Join(dir, "consent.json"), PolicyPath: filepath.Join(dir, "policy.json")})
	if err != nil {
		b.Fatal(err)
	}
	q, err := queue.Open(filepath.Join(dir, "queue.db"), queue.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer q.Close()
	p := newPipeline(collectorDeps{
		log: slog.New(slog.DiscardHandler), consent: cm, queue: q,
		ident: identify.New(identify.Options{}), rep: &fakeChecker{}, runners: newRunners(),
		afterBatch: func() {},
	})
	prog := filepath.Join(dir, "prog")
	if err := os.WriteFile(prog, append([]byte("#!/bin/sh\n"), make([]byte, 8000)...), 0o755); err != nil {
		b.Fatal(err)
	}
	fd, err := unix.Open(prog, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(fd)
	const batch = 100
	events := make([]execwatch.Event, batch)
	fill := func() {
		for i := range events {
			d, err := unix.Dup(fd)
			if err != nil {
				b.Fatal(err)
			}
			events[i] = execwatch.Event{FD: d, PID: int32(100 + i), UID: execwatch.UIDUnknown, Time: time.Now(), Kind: execwatch.KindExec}
		}
	}
	fill()
	p.handle(events) // identified once
	b.ResetTimer()
	for b.Loop() {
		b.StopTimer()
		fill()
		b.StartTimer()
		p.handle(events)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*batch)/1e3, "µs/exec")
}
