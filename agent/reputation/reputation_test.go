package reputation_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/cloud"
	"github.com/cloudprotect/cloudprotect/agent/reputation"
	"github.com/cloudprotect/cloudprotect/agent/upload/uploadtest"
	"github.com/cloudprotect/cloudprotect/wire"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var start = time.Date(2026, 3, 2, 9, 0, 0, 0, time.UTC)

func hash(n int) string {
	s := sha256.Sum256([]byte(fmt.Sprint(n)))
	return hex.EncodeToString(s[:])
}

// fakeLookup answers from a table of verdicts, with a TTL of an hour.
type fakeLookup struct {
	mu       sync.Mutex // protects the fields below
	verdicts map[string]string
	calls    [][]string
	err      error
	block    chan struct{} // when set, lookups wait on it
	problem  error         // Problem's answer
	asked    int           // calls of Problem
}

func (f *fakeLookup) Problem() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.asked++
	return f.problem
}

func (f *fakeLookup) setProblem(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.problem = err
}

// problemChecks returns how often Problem was called: once each time
// the checker's Serve wakes up.
func (f *fakeLookup) problemChecks() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.asked
}

func (f *fakeLookup) Lookup(ctx context.Context, hashes []string) ([]wire.Reputation, error) {
	f.mu.Lock()
	f.calls = append(f.calls, slices.Clone(hashes))
	block, err := f.block, f.err
	if f.problem != nil {
		err = f.problem // as the installation refuses
	}
	f.mu.Unlock()
	if block != nil {
		select {
		case <-block:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]wire.Reputation, 0, len(hashes))
	for _, h := range hashes {
		v := f.verdicts[h]
		if v == "" {
			v = wire.VerdictUnknown
		}
		out = append(out, wire.Reputation{SHA256: h, Verdict: v, TTLSeconds: 3600})
	}
	return out, nil
}

func (f *fakeLookup) callCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.calls)
}

func (f *fakeLookup) lastCall() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.calls) == 0 {
		return nil
	}
	return f.calls[len(f.calls)-1]
}

type rig struct {
	t       *testing.T
	clk     *uploadtest.Clock
	lk      *fakeLookup
	c       *reputation.Checker
	allowed atomic.Bool
	mu      sync.Mutex
	alerts  []api.Alert
}

func newRig(t *testing.T, tweak func(*reputation.Options)) *rig {
	r := &rig{t: t, clk: uploadtest.NewClock(start), lk: &fakeLookup{verdicts: map[string]string{}}}
	r.allowed.Store(true)
	opts := reputation.Options{
		Lookup:  r.lk,
		Allowed: r.allowed.Load,
		Alert: func(a api.Alert) {
			r.mu.Lock()
			r.alerts = append(r.alerts, a)
			r.mu.Unlock()
		},
		Clock:  r.clk,
		Jitter: func() float64 { return 0.99 },
	}
	if tweak != nil {
		tweak(&opts)
	}
	c, err := reputation.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	r.c = c
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Serve = %v; want context.Canceled", err)
		}
	})
	return r
}

func (r *rig) gotAlerts() []api.Alert {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.alerts)
}

// eventually waits, for at most 10 s of real time, until cond holds.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func TestHashesAreGatheredOverTheWindow(t *testing.T) {
	t.Parallel()
	r := newRig(t, nil)
	for i := range 3 {
		r.c.Check(hash(i), fmt.Sprintf("/usr/bin/p%d", i))
	}
	if !r.clk.WaitTimers(1, 5*time.Second) {
		t.Fatal("no window timer")
	}
	r.clk.Advance(1900 * time.Millisecond)
	time.Sleep(20 * time.Millisecond)
	if n := r.lk.callCount(); n != 0 {
		t.Fatalf("%d lookups before the window closed; want 0", n)
	}
	r.clk.Advance(100 * time.Millisecond)
	eventually(t, "one lookup", func() bool { return r.lk.callCount() == 1 })
	if got := r.lk.lastCall(); len(got) != 3 {
		t.Errorf("lookup of %d hashes; want 3 in one", len(got))
	}
}

func TestAFullBatchIsLookedUpAtOnce(t *testing.T) {
	t.Parallel()
	r := newRig(t, nil)
	for i := range 1000 {
		r.c.Check(hash(i), "/usr/bin/x")
	}
	eventually(t, "a lookup without waiting for the window", func() bool { return r.lk.callCount() == 1 })
	if got := r.lk.lastCall(); len(got) != 1000 {
		t.Errorf("lookup of %d hashes; want 1000", len(got))
	}
}

func TestVerdictsAreCachedForTheirTTL(t *testing.T) {
	t.Parallel()
	r := newRig(t, nil)
	r.c.Check(hash(1), "/usr/bin/a")
	r.clk.WaitTimers(1, 5*time.Second)
	r.clk.Advance(2 * time.Second)
	eventually(t, "the verdict is cached", func() bool { _, ok := r.c.Verdict(hash(1)); return ok })
	r.c.Check(hash(1), "/usr/bin/a")
	if p := r.c.Stats().Pending; p != 0 {
		t.Fatalf("a cached hash was queued again (%d pending)", p)
	}
	r.clk.Advance(time.Hour) // the TTL has passed
	r.c.Check(hash(1), "/usr/bin/a")
	r.clk.WaitTimers(1, 5*time.Second)
	r.clk.Advance(2 * time.Second)
	eventually(t, "a second lookup after the TTL", func() bool { return r.lk.callCount() == 2 })
}

func TestBadVerdictsRaiseAlerts(t *testing.T) {
	t.Parallel()
	r := newRig(t, nil)
	verdicts := map[int]string{1: wire.VerdictMalicious, 2: wire.VerdictUntrusted, 3: wire.VerdictTrusted, 4: wire.VerdictUnknown}
	for n, v := range verdicts {
		r.lk.verdicts[hash(n)] = v
		r.c.Check(hash(n), fmt.Sprintf("~/Downloads/tool-%d", n))
	}
	r.clk.WaitTimers(1, 5*time.Second)
	r.clk.Advance(2 * time.Second)
	eventually(t, "two alerts", func() bool { return len(r.gotAlerts()) == 2 })
	got := r.gotAlerts()
	slices.SortFunc(got, func(a, b api.Alert) int { return strings.Compare(a.Verdict, b.Verdict) })
	want := []api.Alert{
		{SHA256: hash(1), Path: "~/Downloads/tool-1", Program: "tool-1", Verdict: wire.VerdictMalicious, Action: api.AlertActionAlerted},
		{SHA256: hash(2), Path: "~/Downloads/tool-2", Program: "tool-2", Verdict: wire.VerdictUntrusted, Action: api.AlertActionAlerted},
	}
	if !slices.Equal(got, want) {
		t.Errorf("alerts = %+v; want %+v", got, want)
	}
}

func TestNoLookupWithoutConsent(t *testing.T) {
	t.Parallel()
	r := newRig(t, nil)
	r.allowed.Store(false)
	r.c.Check(hash(1), "/usr/bin/a")
	r.clk.Advance(time.Hour)
	time.Sleep(20 * time.Millisecond)
	if n, p := r.lk.callCount(), r.c.Stats().Pending; n != 0 || p != 0 {
		t.Fatalf("%d lookups, %d pending without consent; want none", n, p)
	}
}

func TestForgetDropsPendingAndAnswersUnderWay(t *testing.T) {
	t.Parallel()
	r := newRig(t, nil)
	r.lk.verdicts[hash(1)] = wire.VerdictMalicious
	r.lk.block = make(chan struct{})
	r.c.Check(hash(1), "/usr/bin/a")
	r.clk.WaitTimers(1, 5*time.Second)
	r.clk.Advance(2 * time.Second)
	eventually(t, "the lookup is under way", func() bool { return r.lk.callCount() == 1 })
	r.c.Check(hash(2), "/usr/bin/b")
	r.c.Forget()
	close(r.lk.block)
	time.Sleep(20 * time.Millisecond)
	r.clk.Advance(time.Hour)
	time.Sleep(20 * time.Millisecond)
	if a := r.gotAlerts(); len(a) != 0 {
		t.Errorf("alerts after Forget: %+v", a)
	}
	if st := r.c.Stats(); st.Pending != 0 || st.Cached != 0 {
		t.Errorf("Stats after Forget = %+v; want nothing pending or cached", st)
	}
	if n := r.lk.callCount(); n != 1 {
		t.Errorf("%d lookups; want only the one under way", n)
	}
}

func TestPendingIsBounded(t *testing.T) {
	t.Parallel()
	r := newRig(t, func(o *reputation.Options) { o.MaxPending = 10 })
	for i := range 15 {
		r.c.Check(hash(i), "/usr/bin/x")
	}
	if st := r.c.Stats(); st.Pending != 10 || st.Dropped != 5 {
		t.Errorf("Stats = %+v; want 10 pending, 5 dropped", st)
	}
}

func TestCacheIsBounded(t *testing.T) {
	t.Parallel()
	r := newRig(t, func(o *reputation.Options) { o.CacheSize = 3 })
	for i := range 5 {
		r.c.Check(hash(i), "/usr/bin/x")
	}
	r.clk.WaitTimers(1, 5*time.Second)
	r.clk.Advance(2 * time.Second)
	eventually(t, "a lookup", func() bool { return r.lk.callCount() == 1 })
	eventually(t, "the cache is filled", func() bool { return r.c.Stats().Cached == 3 })
}

func TestFailedLookupsBackOffAndRecover(t *testing.T) {
	t.Parallel()
	r := newRig(t, nil)
	r.lk.err = errors.New("connection refused")
	r.lk.verdicts[hash(1)] = wire.VerdictMalicious
	r.c.Check(hash(1), "/usr/bin/a")
	limit := start.Add(2 * time.Hour)
	for {
		if !r.clk.WaitTimers(1, 5*time.Second) {
			t.Fatal("no timer while a hash is pending")
		}
		if _, fired := r.clk.AdvanceToNext(limit); !fired {
			break
		}
	}
	// 2 s window, then 30 s, 1, 2, 4, 8, 16, 30, 30, 30 min...
	if n := r.lk.callCount(); n < 7 || n > 11 {
		t.Errorf("%d lookups in two hours of failures; want 7 to 11", n)
	}
	r.lk.mu.Lock()
	r.lk.err = nil
	r.lk.mu.Unlock()
	r.clk.WaitTimers(1, 5*time.Second)
	r.clk.Advance(31 * time.Minute)
	eventually(t, "the alert after recovery", func() bool { return len(r.gotAlerts()) == 1 })
}

func TestRefusedForConsentIsRetriedLater(t *testing.T) {
	t.Parallel()
	r := newRig(t, nil)
	r.lk.err = cloud.ErrNotParticipating
	r.c.Check(hash(1), "/usr/bin/a")
	r.clk.WaitTimers(1, 5*time.Second)
	r.clk.Advance(2 * time.Second)
	eventually(t, "one lookup", func() bool { return r.lk.callCount() == 1 })
	r.lk.mu.Lock()
	r.lk.err = nil
	r.lk.mu.Unlock()
	r.clk.WaitTimers(1, 5*time.Second)
	r.clk.Advance(20 * time.Second)
	time.Sleep(20 * time.Millisecond)
	if n := r.lk.callCount(); n != 1 {
		t.Fatalf("%d lookups within 20 s; want no loop", n)
	}
	r.clk.Advance(time.Minute)
	eventually(t, "a lookup after the backoff", func() bool { return r.lk.callCount() == 2 })
}

// Ask looks up at once (no window), caches the answers so the pending
// lookup does not ask again, raises no alert, keeps no answer to a hash
// it did not ask about, and asks nothing while the person does not
// participate.
func TestAskLooksUpAtOnceAndCaches(t *testing.T) {
	t.Parallel()
	r := newRig(t, nil)
	bad, other := hash(1), hash(2)
	r.lk.mu.Lock()
	r.lk.verdicts[bad] = wire.VerdictMalicious
	r.lk.mu.Unlock()
	r.c.Check(bad, "/tmp/x") // pending, waiting for the window
	reps, err := r.c.Ask(context.Background(), []string{bad})
	if err != nil {
		t.Fatal(err)
	}
	if len(reps) != 1 || reps[0].SHA256 != bad || reps[0].Verdict != wire.VerdictMalicious {
		t.Fatalf("Ask = %+v", reps)
	}
	if v, ok := r.c.Verdict(bad); !ok || v != wire.VerdictMalicious {
		t.Errorf("Verdict after Ask = %q, %v", v, ok)
	}
	if n := r.c.Stats().Pending; n != 0 {
		t.Errorf("%d hashes still pending after Ask answered them", n)
	}
	if got := r.gotAlerts(); len(got) != 0 {
		t.Errorf("Ask raised alerts: %+v", got)
	}
	if _, ok := r.c.Verdict(other); ok {
		t.Errorf("a verdict on %s was cached without being asked", other)
	}

	r.allowed.Store(false)
	calls := r.lk.callCount()
	if _, err := r.c.Ask(context.Background(), []string{other}); !errors.Is(err, cloud.ErrNotParticipating) {
		t.Errorf("Ask while not participating = %v; want ErrNotParticipating", err)
	}
	if r.lk.callCount() != calls {
		t.Error("Ask looked up while the person does not participate")
	}
}

// A hostile cloud's answer about a hash nobody asked for is neither
// returned nor cached.
func TestAskIgnoresUnaskedAnswers(t *testing.T) {
	t.Parallel()
	asked, unasked := hash(10), hash(11)
	lk := lookupFunc(func(ctx context.Context, hashes []string) ([]wire.Reputation, error) {
		return []wire.Reputation{
			{SHA256: asked, Verdict: wire.VerdictUnknown, TTLSeconds: 60},
			{SHA256: unasked, Verdict: wire.VerdictMalicious, TTLSeconds: 60},
		}, nil
	})
	c, err := reputation.New(reputation.Options{Lookup: lk, Allowed: func() bool { return true }, Alert: func(api.Alert) {}})
	if err != nil {
		t.Fatal(err)
	}
	reps, err := c.Ask(context.Background(), []string{asked})
	if err != nil {
		t.Fatal(err)
	}
	if len(reps) != 1 || reps[0].SHA256 != asked {
		t.Errorf("Ask = %+v; want only the asked hash", reps)
	}
	if _, ok := c.Verdict(unasked); ok {
		t.Error("an unasked verdict was cached")
	}
}

type lookupFunc func(ctx context.Context, hashes []string) ([]wire.Reputation, error)

func (f lookupFunc) Lookup(ctx context.Context, hashes []string) ([]wire.Reputation, error) {
	return f(ctx, hashes)
}

func (lookupFunc) Problem() error { return nil }

// A hostile local user can run programs with 4 KiB paths; the paths kept
// for alerts while the cloud cannot be reached stay bounded, and an alert
// still names the program and the folders nearest to it.
func TestPendingPathsAreBounded(t *testing.T) {
	r := newRig(t, func(o *reputation.Options) { o.MaxPending = 10_000 })
	deep := "~/" + strings.Repeat("deep-folder/", 340) // about 4 KiB
	unreachable := make(chan struct{})                 // the lookups hang
	r.lk.mu.Lock()
	r.lk.block = unreachable
	r.lk.mu.Unlock()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range 10_000 {
		r.c.Check(hash(i), fmt.Sprintf("%sprog-%d", deep, i))
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	if grew := int64(after.HeapAlloc) - int64(before.HeapAlloc); grew > 8<<20 {
		t.Errorf("10,000 pending hashes with 4 KiB paths hold %d MiB; want at most 8", grew>>20)
	}
	if p := r.c.Stats().Pending; p < 10_000 {
		t.Fatalf("%d hashes pending; want 10,000 or more", p)
	}
	r.lk.mu.Lock()
	r.lk.block = nil
	r.lk.mu.Unlock()
	close(unreachable)

	r.lk.mu.Lock()
	r.lk.verdicts[hash(20_000)] = wire.VerdictMalicious
	r.lk.mu.Unlock()
	r.c.Forget()
	r.c.Check(hash(20_000), deep+"évil-\u00e9-tool")
	r.clk.WaitTimers(1, 5*time.Second)
	r.clk.Advance(2 * time.Second)
	eventually(t, "an alert", func() bool { return len(r.gotAlerts()) == 1 })
	a := r.gotAlerts()[0]
	if a.Program != "évil-é-tool" || !strings.HasPrefix(a.Path, "…/deep-folder/") || !strings.HasSuffix(a.Path, "/évil-é-tool") || len(a.Path) > 300 {
		t.Errorf("alert path %q (%d bytes), program %q; want the path's tail behind …/ and the program's name", a.Path, len(a.Path), a.Program)
	}
}
