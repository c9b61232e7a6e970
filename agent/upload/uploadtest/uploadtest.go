// Package uploadtest provides fakes for testing code that uses packages
// upload and cloud: a Clock whose time moves only when the test says so,
// and an in-memory Queue with the batch semantics of the agent's queue.
package uploadtest

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/cloud"
	"github.com/cloudprotect/cloudprotect/wire"
)

// Clock is a fake cloud.Clock. Its timers fire only when Advance moves
// the time past them.
type Clock struct {
	mu     sync.Mutex // protects the fields below
	now    time.Time
	timers []*timer
	// changed is closed and replaced whenever a timer is added.
	changed chan struct{}
}

type timer struct {
	c    *Clock
	at   time.Time
	ch   chan time.Time
	done bool
}

// NewClock returns a fake clock showing start.
func NewClock(start time.Time) *Clock {
	return &Clock{now: start, changed: make(chan struct{})}
}

// Now returns the fake time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// NewTimer returns a timer that fires when the fake time reaches now+d;
// at once when d ≤ 0.
func (c *Clock) NewTimer(d time.Duration) cloud.Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &timer{c: c, at: c.now.Add(d), ch: make(chan time.Time, 1)}
	if d <= 0 {
		t.done = true
		t.ch <- c.now
		return t
	}
	c.timers = append(c.timers, t)
	close(c.changed)
	c.changed = make(chan struct{})
	return t
}

func (t *timer) C() <-chan time.Time { return t.ch }

func (t *timer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	if t.done {
		return false
	}
	t.done = true
	t.c.timers = slices.DeleteFunc(t.c.timers, func(x *timer) bool { return x == t })
	return true
}

// Advance moves the time forward by d and fires the timers due.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	c.fireLocked()
}

func (c *Clock) fireLocked() {
	c.timers = slices.DeleteFunc(c.timers, func(t *timer) bool {
		if t.at.After(c.now) {
			return false
		}
		t.done = true
		t.ch <- c.now
		return true
	})
}

// Timers returns the number of pending timers.
func (c *Clock) Timers() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.timers)
}

// Next returns when the earliest pending timer fires.
func (c *Clock) Next() (time.Time, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.timers) == 0 {
		return time.Time{}, false
	}
	next := c.timers[0].at
	for _, t := range c.timers[1:] {
		if t.at.Before(next) {
			next = t.at
		}
	}
	return next, true
}

// WaitTimers waits, for at most timeout of real time, until at least n
// timers are pending. It reports whether they are.
func (c *Clock) WaitTimers(n int, timeout time.Duration) bool {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		c.mu.Lock()
		ok, ch := len(c.timers) >= n, c.changed
		c.mu.Unlock()
		if ok {
			return true
		}
		select {
		case <-ch:
		case <-deadline.C:
			return false
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// AdvanceToNext moves the time to the earliest pending timer, but not
// beyond limit, fires it, and returns the new time. It reports false when
// no timer is due by limit (the time is then moved to limit).
func (c *Clock) AdvanceToNext(limit time.Time) (time.Time, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var next time.Time
	for _, t := range c.timers {
		if next.IsZero() || t.at.Before(next) {
			next = t.at
		}
	}
	if next.IsZero() || next.After(limit) {
		if limit.After(c.now) {
			c.now = limit
		}
		return c.now, false
	}
	if next.After(c.now) {
		c.now = next
	}
	c.fireLocked()
	return c.now, true
}

// Queue is an in-memory upload.Queue: records wait in order, a batch cut
// by TakeBatch stays in flight with its ID until it is settled, and
// everything acknowledged is kept for the test to inspect.
type Queue struct {
	mu       sync.Mutex // protects the fields below
	pending  []wire.Record
	inflight *batch
	nextID   int
	sent     []wire.Record
	dropped  int // records
	batches  map[string]int
	// Max bounds the pending records (0: unbounded); beyond it Add drops
	// the oldest and counts them in Evicted.
	max     int
	evicted int
}

type batch struct {
	id   string
	recs []wire.Record
}

// NewQueue returns an empty queue keeping at most max records (0:
// unbounded).
func NewQueue(max int) *Queue { return &Queue{max: max, batches: map[string]int{}} }

// Add appends records.
func (q *Queue) Add(recs ...wire.Record) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.pending = append(q.pending, recs...)
	if q.max > 0 && len(q.pending) > q.max {
		n := len(q.pending) - q.max
		q.evicted += n
		q.pending = slices.Delete(q.pending, 0, n)
	}
}

// TakeBatch implements upload.Queue.
func (q *Queue) TakeBatch(max int) (string, []wire.Record, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.inflight != nil {
		return q.inflight.id, slices.Clone(q.inflight.recs), nil
	}
	n := min(max, len(q.pending))
	if n <= 0 {
		return "", nil, nil
	}
	q.nextID++
	b := &batch{id: fmt.Sprintf("batch-%d", q.nextID), recs: slices.Clone(q.pending[:n])}
	q.pending = slices.Delete(q.pending, 0, n)
	q.inflight = b
	q.batches[b.id]++
	return b.id, slices.Clone(b.recs), nil
}

func (q *Queue) settle(id string) (*batch, error) {
	if q.inflight == nil || q.inflight.id != id {
		return nil, fmt.Errorf("settle batch %q: no such batch in flight", id)
	}
	b := q.inflight
	q.inflight = nil
	return b, nil
}

// ReleaseBatch implements upload.Queue.
func (q *Queue) ReleaseBatch(id string) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	b, err := q.settle(id)
	if err != nil {
		return err
	}
	q.pending = append(b.recs, q.pending...)
	return nil
}

// MarkSent implements upload.Queue.
func (q *Queue) MarkSent(id string) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	b, err := q.settle(id)
	if err != nil {
		return err
	}
	q.sent = append(q.sent, b.recs...)
	return nil
}

// DropBatch implements upload.Queue.
func (q *Queue) DropBatch(id string) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	b, err := q.settle(id)
	if err != nil {
		return err
	}
	q.dropped += len(b.recs)
	return nil
}

// Pending implements upload.Queue: records waiting, in flight included.
func (q *Queue) Pending() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := len(q.pending)
	if q.inflight != nil {
		n += len(q.inflight.recs)
	}
	return n
}

// Purge forgets every record, as the agent does when the person leaves.
func (q *Queue) Purge() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.pending, q.inflight = nil, nil
}

// Sent returns the records acknowledged by MarkSent, in order.
func (q *Queue) Sent() []wire.Record {
	q.mu.Lock()
	defer q.mu.Unlock()
	return slices.Clone(q.sent)
}

// Dropped returns the number of records in dropped batches.
func (q *Queue) Dropped() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.dropped
}

// Evicted returns the number of records Add dropped to stay within max.
func (q *Queue) Evicted() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.evicted
}

// InFlight returns the ID of the batch in flight, or "".
func (q *Queue) InFlight() string {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.inflight == nil {
		return ""
	}
	return q.inflight.id
}

// Record returns a realistic record for the n-th file, as the agent
// would queue it: mostly package-managed ELF programs with build IDs,
// some scripts in the user's folders.
func Record(n int, execs uint64, seen time.Time) wire.Record {
	sum := sha256.Sum256([]byte(fmt.Sprintf("file %d", n)))
	r := wire.Record{ExecCount: execs, FirstSeen: seen.UTC(), LastSeen: seen.UTC()}
	r.SHA256 = hex.EncodeToString(sum[:])
	r.Size = int64(4096 + (n*7919)%3_000_000)
	if n%5 == 4 {
		r.Path = fmt.Sprintf("~/.local/bin/tool-%d.py", n)
		r.Kind = wire.KindScript
		r.Interpreter = "/usr/bin/python3"
		return r
	}
	build := sha256.Sum256([]byte(fmt.Sprintf("build %d", n)))
	r.Kind = wire.KindELF
	r.Path = fmt.Sprintf("/usr/bin/program-%d", n)
	r.PackageManaged = true
	r.ELF = &wire.ELF{
		Machine:     "x86_64",
		Type:        "dyn",
		PIE:         true,
		Interpreter: "/lib64/ld-linux-x86-64.so.2",
		BuildID:     hex.EncodeToString(build[:20]),
	}
	return r
}
