package protect

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/identify"
	"github.com/cloudprotect/cloudprotect/wire"
)

// These tests drive the decisions without the kernel: the guard's group
// descriptor is the write end of a pipe, so every answer it writes (a
// struct fanotify_response) can be read back, and time is synctest's.

// fakeRep is a Security Network whose cached verdicts and answers the
// test sets.
type fakeRep struct {
	mu      sync.Mutex // protects the fields below
	cached  map[string]string
	answers map[string]string // Ask's verdicts; missing means every
	every   string            // Ask's verdict on the others ("" unknown)
	delay   time.Duration     // Ask answers after it
	stall   bool              // Ask waits for its context
	err     error             // Ask fails with it
	problem error             // Unavailable's answer
	asked   [][]string
}

func (f *fakeRep) Unavailable() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.problem
}

func (f *fakeRep) Cached(h string) (wire.Reputation, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.cached[h]
	return wire.Reputation{SHA256: h, Verdict: v, Source: wire.SourceFeed}, ok
}

func (f *fakeRep) Ask(ctx context.Context, hashes []string) ([]wire.Reputation, error) {
	f.mu.Lock()
	f.asked = append(f.asked, hashes)
	delay, stall, err := f.delay, f.stall, f.err
	f.mu.Unlock()
	if stall {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []wire.Reputation
	for _, h := range hashes {
		v := f.answers[h]
		if v == "" {
			v = f.every
		}
		if v == "" {
			v = wire.VerdictUnknown
		}
		out = append(out, wire.Reputation{SHA256: h, Verdict: v, Source: wire.SourceAnalyst, TTLSeconds: 60})
	}
	return out, nil
}

func (f *fakeRep) askCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.asked)
}

func (f *fakeRep) set(fn func(f *fakeRep)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

type rig struct {
	t      *testing.T
	g      *Guard
	rep    *fakeRep
	r      int // read end of the answers pipe
	ctx    context.Context
	dir    string
	mu     sync.Mutex // protects blocks
	blocks []api.Alert
	uids   []int
}

// newRig makes a guard answering into a pipe; call it inside a bubble.
func newRig(t *testing.T, tweak func(*Options)) *rig {
	t.Helper()
	r := &rig{t: t, rep: &fakeRep{cached: map[string]string{}, answers: map[string]string{}}, dir: t.TempDir()}
	opts := Options{
		Identify:   identify.New(identify.Options{}),
		Reputation: r.rep,
		Report: func(al api.Alert, uid int) {
			r.mu.Lock()
			r.blocks = append(r.blocks, al)
			r.uids = append(r.uids, uid)
			r.mu.Unlock()
		},
		FirstSight: 1500 * time.Millisecond,
		UserDirs:   []string{r.dir},
	}
	if tweak != nil {
		tweak(&opts)
	}
	g, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	g.fd = p[1]
	r.g, r.r = g, p[0]
	ctx, cancel := context.WithCancel(t.Context())
	r.ctx = ctx
	done := make(chan struct{})
	go func() {
		defer close(done)
		g.ask.serve(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		g.shutdown()
		unix.Close(p[0])
	})
	return r
}

// program writes a file of its own content and returns its path and hash.
func (r *rig) program(name string) (string, string) {
	r.t.Helper()
	p := filepath.Join(r.dir, name)
	body := fmt.Appendf(nil, "#!/bin/sh\n# %s %s\n", r.t.Name(), name)
	if err := os.WriteFile(p, body, 0o755); err != nil {
		r.t.Fatal(err)
	}
	s := sha256.Sum256(body)
	return p, hex.EncodeToString(s[:])
}

// exec raises a permission event for path, decided by a worker
// goroutine; it returns the event's descriptor number.
func (r *rig) exec(path string) int {
	r.t.Helper()
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		r.t.Fatal(err)
	}
	e := r.g.newEvent(fd, os.Getpid()+1_000_000, time.Now())
	go r.g.decide(r.ctx, e)
	return fd
}

// answers reads every answer written so far: descriptor → response.
func (r *rig) answers() map[int]uint32 {
	r.t.Helper()
	out := map[int]uint32{}
	var b [8]byte
	for {
		n, err := unix.Read(r.r, b[:])
		if err == unix.EAGAIN || (err == nil && n == 0) {
			return out // nothing more, or the guard closed its end
		}
		if err != nil || n != 8 {
			r.t.Fatalf("read answers: %d, %v", n, err)
		}
		fd := int(int32(binary.NativeEndian.Uint32(b[0:])))
		if _, dup := out[fd]; dup {
			r.t.Fatalf("descriptor %d answered twice", fd)
		}
		out[fd] = binary.NativeEndian.Uint32(b[4:])
	}
}

// expect waits for the bubble to settle and checks the answer to fd.
func (r *rig) expect(fd int, want uint32, why string) {
	r.t.Helper()
	synctest.Wait()
	got, ok := r.answers()[fd]
	switch {
	case !ok:
		r.t.Fatalf("%s: not answered", why)
	case got != want:
		r.t.Fatalf("%s: answer %s, want %s", why, respName(got), respName(want))
	}
}

// unanswered checks that fd is still held.
func (r *rig) unanswered(fd int, why string) {
	r.t.Helper()
	synctest.Wait()
	if got, ok := r.answers()[fd]; ok {
		r.t.Fatalf("%s: answered %s, want it still held", why, respName(got))
	}
}

func respName(r uint32) string {
	switch r {
	case unix.FAN_ALLOW:
		return "allow"
	case unix.FAN_DENY:
		return "deny"
	}
	return fmt.Sprint(r)
}

func TestKnownMaliciousIsDenied(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, nil)
		p, h := r.program("dropper")
		r.rep.cached[h] = wire.VerdictMalicious
		r.expect(r.exec(p), unix.FAN_DENY, "cached malicious verdict")
		if len(r.blocks) != 1 {
			t.Fatalf("%d blocks reported, want 1", len(r.blocks))
		}
		b := r.blocks[0]
		if b.SHA256 != h || b.Action != api.AlertActionBlocked || b.Verdict != wire.VerdictMalicious || b.Program != "dropper" ||
			b.Source != wire.SourceFeed || b.Time.IsZero() {
			t.Errorf("block = %+v", b)
		}
		if r.uids[0] != os.Getuid() && r.uids[0] != -1 {
			t.Errorf("block uid = %d", r.uids[0])
		}
		if st := r.g.Stats(); st.Denied != 1 || st.LastBlock == nil || st.LastBlock.SHA256 != h {
			t.Errorf("stats = %+v", st)
		}
		if r.rep.askCount() != 0 {
			t.Error("the cloud was asked about a file with a cached verdict")
		}
	})
}

func TestExceptionAllowsMalicious(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		x, err := OpenExceptions(filepath.Join(t.TempDir(), ExceptionsFile))
		if err != nil {
			t.Fatal(err)
		}
		r := newRig(t, func(o *Options) { o.Exceptions = x })
		p, h := r.program("in-house-tool")
		r.rep.cached[h] = wire.VerdictMalicious
		r.expect(r.exec(p), unix.FAN_DENY, "before the exception")
		if _, err := x.Add(h, "our build tool", 0, time.Now()); err != nil {
			t.Fatal(err)
		}
		r.expect(r.exec(p), unix.FAN_ALLOW, "with the exception")
		if err := x.Remove(h); err != nil {
			t.Fatal(err)
		}
		r.expect(r.exec(p), unix.FAN_DENY, "after the exception was removed")
	})
}

// An unfamiliar program in a user folder is held until the cloud answers.
func TestUnfamiliarHeldUntilCloudAnswers(t *testing.T) {
	cases := []struct {
		name    string
		verdict string
		want    uint32
	}{
		{"unknown runs", "", unix.FAN_ALLOW},
		{"malicious is denied", wire.VerdictMalicious, unix.FAN_DENY},
		{"untrusted runs", wire.VerdictUntrusted, unix.FAN_ALLOW},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				r := newRig(t, nil)
				p, h := r.program("setup.run")
				r.rep.set(func(f *fakeRep) { f.answers[h] = tc.verdict; f.delay = 400 * time.Millisecond })
				start := time.Now()
				fd := r.exec(p)
				r.unanswered(fd, "while the cloud is asked")
				time.Sleep(400 * time.Millisecond)
				r.expect(fd, tc.want, "after the cloud answered")
				if held := time.Since(start); held != 400*time.Millisecond {
					t.Errorf("held %v, want exactly the cloud's 400ms", held)
				}
				if st := r.g.Stats(); st.Held != 1 || st.TimedOut != 0 {
					t.Errorf("stats = %+v", st)
				}
				if tc.want == unix.FAN_DENY && (len(r.blocks) != 1 || r.blocks[0].Source != wire.SourceAnalyst) {
					t.Errorf("blocks = %+v; want one, its verdict from an analyst", r.blocks)
				}
			})
		})
	}
}

// A cloud that does not answer holds the first unfamiliar program until
// its deadline, then opens the circuit: the next ones are not held and
// the cloud is not asked; after CircuitMin one is held again as a probe,
// and an answer closes the circuit.
func TestStalledCloudOpensCircuit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, func(o *Options) { o.CircuitMin = 30 * time.Second })
		r.rep.set(func(f *fakeRep) { f.stall = true })
		p1, _ := r.program("first")
		start := time.Now()
		fd := r.exec(p1)
		r.unanswered(fd, "before the deadline")
		time.Sleep(1500*time.Millisecond - time.Nanosecond)
		r.unanswered(fd, "a moment before the deadline")
		time.Sleep(time.Nanosecond)
		r.expect(fd, unix.FAN_ALLOW, "at the deadline")
		if d := time.Since(start); d != 1500*time.Millisecond {
			t.Errorf("answered after %v, want the deadline 1.5s", d)
		}
		if !r.g.Stats().CircuitOpen {
			t.Fatal("circuit not open after a held execution timed out")
		}
		asked := r.rep.askCount()
		p2, _ := r.program("second")
		r.expect(r.exec(p2), unix.FAN_ALLOW, "while the circuit is open (at once)")
		if r.rep.askCount() != asked {
			t.Error("the cloud was asked while the circuit was open")
		}
		if st := r.g.Stats(); st.Skipped != 1 || st.TimedOut != 1 {
			t.Errorf("stats = %+v", st)
		}

		// The probe: the cloud answers again.
		time.Sleep(30 * time.Second)
		r.rep.set(func(f *fakeRep) { f.stall = false; f.delay = 100 * time.Millisecond })
		p3, _ := r.program("third")
		fd3 := r.exec(p3)
		r.unanswered(fd3, "the probe is held")
		time.Sleep(100 * time.Millisecond)
		r.expect(fd3, unix.FAN_ALLOW, "the probe after the answer")
		if r.g.Stats().CircuitOpen {
			t.Error("circuit still open after the cloud answered")
		}
		p4, _ := r.program("fourth")
		fd4 := r.exec(p4)
		r.unanswered(fd4, "held again once the circuit closed")
		time.Sleep(100 * time.Millisecond)
		r.expect(fd4, unix.FAN_ALLOW, "after the answer")
	})
}

// An unreachable cloud answers at once with an error: the program runs
// at once and the circuit opens; a failed probe doubles the wait.
func TestUnreachableCloudAllowsAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, func(o *Options) { o.CircuitMin = 10 * time.Second })
		r.rep.set(func(f *fakeRep) { f.err = errors.New("connection refused") })
		p1, _ := r.program("a")
		r.expect(r.exec(p1), unix.FAN_ALLOW, "cloud unreachable")
		p2, _ := r.program("b")
		r.expect(r.exec(p2), unix.FAN_ALLOW, "circuit open")
		if n := r.rep.askCount(); n != 1 {
			t.Errorf("cloud asked %d times, want 1", n)
		}
		time.Sleep(10 * time.Second)
		p3, _ := r.program("c")
		r.expect(r.exec(p3), unix.FAN_ALLOW, "failed probe")
		if n := r.rep.askCount(); n != 2 {
			t.Errorf("cloud asked %d times, want 2 (one probe)", n)
		}
		time.Sleep(10 * time.Second) // the wait is now 20 s
		p4, _ := r.program("d")
		r.expect(r.exec(p4), unix.FAN_ALLOW, "circuit still open")
		if n := r.rep.askCount(); n != 2 {
			t.Errorf("cloud asked %d times 10 s after a failed probe, want 2", n)
		}
	})
}

// Programs outside the places people write to (root's, not writable by
// others) and programs with a known verdict are answered at once.
func TestEverythingElseAnsweredAtOnce(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs files owned by root")
	}
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, func(o *Options) { o.UserDirs = []string{"/nonexistent"} })
		r.rep.set(func(f *fakeRep) { f.stall = true })
		p, _ := r.program("tool")
		r.expect(r.exec(p), unix.FAN_ALLOW, "root's program outside user folders")
		os.Chmod(p, 0o777)
		p2, _ := r.program("writable")
		os.Chmod(p2, 0o757)
		fd := r.exec(p2)
		r.unanswered(fd, "a file others may write is unfamiliar")
		if r.rep.askCount() != 1 {
			t.Error("cloud not asked about the world-writable file")
		}
	})
}

// A malicious verdict on a system file (root's, in a package-managed
// folder) never denies it: a wrong verdict must not stop the machine.
func TestSystemFileNeverDenied(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sys := "/usr/bin/true"
		var st unix.Stat_t
		if err := unix.Stat(sys, &st); err != nil || st.Uid != 0 {
			t.Skipf("no root-owned %s", sys)
		}
		r := newRig(t, nil)
		f, _, err := identify.New(identify.Options{}).IdentifyPath(sys)
		if err != nil {
			t.Fatal(err)
		}
		r.rep.cached[f.SHA256] = wire.VerdictMalicious
		r.expect(r.exec(sys), unix.FAN_ALLOW, "system file with a malicious verdict")
		if len(r.blocks) != 0 {
			t.Errorf("blocks reported: %+v", r.blocks)
		}
	})
}

// When more executions wait than MaxHeld, the next is allowed at once.
func TestTooManyHeldAllowsAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, func(o *Options) { o.MaxHeld = 2 })
		r.rep.set(func(f *fakeRep) { f.stall = true })
		var fds []int
		for i := range 3 {
			p, _ := r.program(fmt.Sprint("p", i))
			fds = append(fds, r.exec(p))
			synctest.Wait()
		}
		got := r.answers()
		if _, ok := got[fds[0]]; ok {
			t.Error("first execution answered; want it held")
		}
		if got[fds[2]] != unix.FAN_ALLOW {
			t.Errorf("third execution: %v; want allowed at once", got)
		}
		if st := r.g.Stats(); st.Busy != 1 || st.Held != 2 {
			t.Errorf("stats = %+v", st)
		}
	})
}

// Stopping the guard allows every execution it holds, at once.
func TestStopAllowsHeld(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, nil)
		r.rep.set(func(f *fakeRep) { f.stall = true })
		p, _ := r.program("held")
		fd := r.exec(p)
		r.unanswered(fd, "held")
		r.g.shutdown()
		got := r.answers()
		if got[fd] != unix.FAN_ALLOW {
			t.Fatalf("after stop: %v; want allowed", got)
		}
		// The timer fires later and finds the group closed: no second
		// answer, no write to a closed descriptor.
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if extra := r.answers(); len(extra) != 0 {
			t.Errorf("answers after the stop: %v", extra)
		}
	})
}

// Invalidate drops the marks of decisions under way: the generation
// moves, so markGood of an older decision sets nothing.
func TestInvalidateDropsPendingMarks(t *testing.T) {
	r := &Guard{}
	s := &subject{gen: r.gen.Load()}
	r.fd = -1
	r.Invalidate()
	if r.gen.Load() == s.gen {
		t.Fatal("Invalidate did not move the generation")
	}
}

func TestCircuit(t *testing.T) {
	c := circuit{min: 10 * time.Second, max: 40 * time.Second, probeFor: 3 * time.Second}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	steps := []struct {
		at      time.Duration
		op      string
		want    bool // for "hold"
		comment string
	}{
		{0, "hold", true, "closed"},
		{0, "fail", false, "opens for 10s"},
		{1 * time.Second, "fail", false, "a second failure while open changes nothing"},
		{9 * time.Second, "hold", false, "still open"},
		{10 * time.Second, "hold", true, "probe"},
		{10 * time.Second, "hold", false, "one probe at a time"},
		{11 * time.Second, "fail", false, "failed probe: open for 20s"},
		{30 * time.Second, "hold", false, "still open"},
		{31 * time.Second, "hold", true, "probe"},
		{35 * time.Second, "hold", true, "the first probe lapsed after 3s"},
		{35 * time.Second, "fail", false, "open for 40s"},
		{74 * time.Second, "hold", false, "capped at 40s, still open"},
		{75 * time.Second, "hold", true, "probe"},
		{75 * time.Second, "ok", false, "closed"},
		{75 * time.Second, "hold", true, "closed"},
		{76 * time.Second, "fail", false, "opens for min again"},
		{85 * time.Second, "hold", false, "open"},
		{86 * time.Second, "hold", true, "probe after 10s"},
	}
	for i, s := range steps {
		now := t0.Add(s.at)
		switch s.op {
		case "hold":
			if got := c.allowHold(now); got != s.want {
				t.Fatalf("step %d (%s): allowHold = %v", i, s.comment, got)
			}
		case "fail":
			c.failure(now)
		case "ok":
			c.success()
		}
	}
}

// An answer that comes after the deadline was too late: it is cached, but
// the circuit the timeout opened stays open.
func TestLateAnswerKeepsCircuitOpen(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, func(o *Options) { o.CircuitMin = 30 * time.Second })
		r.rep.set(func(f *fakeRep) { f.delay = 2 * time.Second })
		p, _ := r.program("slow")
		fd := r.exec(p)
		time.Sleep(1500 * time.Millisecond)
		r.expect(fd, unix.FAN_ALLOW, "at the deadline")
		time.Sleep(time.Second) // the answer arrives
		synctest.Wait()
		if !r.g.Stats().CircuitOpen {
			t.Error("a late answer closed the circuit")
		}
	})
}

// While the cloud cannot be asked at all (no server is configured), an
// unfamiliar program is neither held nor asked about: it runs at once,
// without an ignore mark, so that it is checked once a server can be
// used; why is logged once, however many programs run.
func TestNoServerAllowsAtOnceAndSaysSoOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var logs bytes.Buffer
		r := newRig(t, func(o *Options) { o.Logger = slog.New(slog.NewTextHandler(&logs, nil)) })
		r.rep.set(func(f *fakeRep) { f.problem = errors.New("no Security Network server is configured: nothing is sent") })
		for i := range 5 {
			p, _ := r.program(fmt.Sprintf("unfamiliar-%d", i))
			r.expect(r.exec(p), unix.FAN_ALLOW, "without a server (at once)")
			time.Sleep(time.Minute)
		}
		if n := r.rep.askCount(); n != 0 {
			t.Errorf("the cloud was asked %d times without a server; want never", n)
		}
		if st := r.g.Stats(); st.Held != 0 || st.Marked != 0 || st.Skipped != 5 || st.CircuitOpen {
			t.Errorf("stats = %+v; want 5 skipped, none held or marked, the circuit closed", st)
		}
		if n := strings.Count(logs.String(), "no Security Network server"); n != 1 {
			t.Errorf("logged %d times; want once:\n%s", n, logs.String())
		}

		// A server can be used: the next unfamiliar program is held.
		r.rep.set(func(f *fakeRep) { f.problem = nil; f.stall = true })
		p, _ := r.program("after")
		r.unanswered(r.exec(p), "with a server")
	})
}
