package protect

import (
	"context"
	"sync"
	"time"

	"github.com/cloudprotect/cloudprotect/wire"
)

// asker holds unfamiliar executions while it asks the cloud about their
// files, many hashes per lookup and a few lookups at a time. It never
// holds an execution past its deadline: the event's own timer allows it
// and drops it from here.
type asker struct {
	g    *Guard
	kick chan struct{} // one slot: something to ask

	mu sync.Mutex // protects the fields below
	// waiting maps a hash to the executions held for it; queue lists the
	// hashes not yet asked, oldest first.
	waiting map[string][]*subject
	queue   []string
	count   int // executions held
}

func (a *asker) init(g *Guard) {
	a.g = g
	a.kick = make(chan struct{}, 1)
	a.waiting = make(map[string][]*subject)
}

// hold adds s to the executions waiting for the cloud; false when too
// many are held already or s's deadline passed meanwhile.
func (a *asker) hold(s *subject) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.count >= a.g.opts.MaxHeld {
		return false
	}
	s.e.mu.Lock()
	if s.e.answered {
		s.e.mu.Unlock()
		return false
	}
	s.e.held = true
	s.e.mu.Unlock()
	h := s.facts.SHA256
	list := a.waiting[h]
	if len(list) == 0 {
		a.queue = append(a.queue, h)
	}
	a.waiting[h] = append(list, s)
	a.count++
	a.g.c.held.Add(1)
	select {
	case a.kick <- struct{}{}:
	default:
	}
	return true
}

// drop forgets e, whose deadline passed, and releases it.
func (a *asker) drop(e *event) {
	a.mu.Lock()
	for h, list := range a.waiting {
		for i, s := range list {
			if s.e != e {
				continue
			}
			list = append(list[:i], list[i+1:]...)
			if len(list) == 0 {
				delete(a.waiting, h)
			} else {
				a.waiting[h] = list
			}
			a.count--
			a.mu.Unlock()
			a.g.release(e)
			return
		}
	}
	a.mu.Unlock()
}

// take returns up to n hashes still waiting to be asked.
func (a *asker) take(n int) []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []string
	i := 0
	for ; i < len(a.queue) && len(out) < n; i++ {
		if _, ok := a.waiting[a.queue[i]]; ok {
			out = append(out, a.queue[i])
		}
	}
	a.queue = append(a.queue[:0], a.queue[i:]...)
	return out
}

// answered removes and returns the executions waiting for hash h.
func (a *asker) answered(h string) []*subject {
	a.mu.Lock()
	defer a.mu.Unlock()
	list := a.waiting[h]
	delete(a.waiting, h)
	a.count -= len(list)
	return list
}

// serve asks the cloud until ctx is cancelled; then it allows everything
// still held.
func (a *asker) serve(ctx context.Context) {
	var wg sync.WaitGroup
	slots := make(chan struct{}, maxLookupsInFlight)
	defer func() {
		wg.Wait()
		a.releaseAll()
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.kick:
		}
		for {
			batch := a.take(wire.MaxLookupHashes)
			if len(batch) == 0 {
				break
			}
			select {
			case slots <- struct{}{}:
			case <-ctx.Done():
				return
			}
			wg.Go(func() {
				defer func() { <-slots }()
				a.lookup(ctx, batch)
			})
		}
	}
}

// lookup asks about batch and decides every execution waiting for it.
// A failed or late lookup opens the circuit and allows them.
func (a *asker) lookup(ctx context.Context, batch []string) {
	g := a.g
	// The executions' own timers allow them at their deadline; the lookup
	// may go on a little longer, so a late answer is still cached.
	lctx, cancel := context.WithTimeout(ctx, 2*g.deadline())
	t0 := time.Now()
	reps, err := g.opts.Reputation.Ask(lctx, batch)
	took := time.Since(t0)
	cancel()
	g.log.Debug("asked the cloud for held executions", "hashes", len(batch), "took", took, "err", err)
	verdicts := make(map[string]wire.Reputation, len(reps))
	if err != nil {
		if ctx.Err() == nil {
			g.circ.failure(time.Now())
			g.log.Warn("cloud did not answer for unfamiliar programs; they run, and are not held until it answers again",
				"err", err, "hashes", len(batch))
		}
	} else {
		if took < g.deadline() {
			// An answer after the deadline came too late for the
			// executions held for it: the circuit stays as their
			// timers left it.
			g.circ.success()
		}
		for _, r := range reps {
			verdicts[r.SHA256] = r
		}
	}
	for _, h := range batch {
		for _, s := range a.answered(h) {
			if r, ok := verdicts[h]; ok {
				g.verdict(s, r)
				continue
			}
			if err != nil {
				g.c.failed.Add(1)
			}
			g.allow(s, true)
		}
	}
}

// releaseAll allows every execution still held.
func (a *asker) releaseAll() {
	a.mu.Lock()
	var all []*subject
	for h, list := range a.waiting {
		all = append(all, list...)
		delete(a.waiting, h)
	}
	a.queue, a.count = nil, 0
	a.mu.Unlock()
	for _, s := range all {
		a.g.release(s.e)
	}
}

// circuit skips first-sight holds for a while after the cloud failed to
// answer in time, so later executions do not each wait the full deadline.
// Closed, it lets holds through; open, it refuses them until its time is
// up; then one execution is held as a probe: an answer closes the
// circuit, another failure opens it for twice as long (up to max). A
// probe that never reports back (it was not held after all) lapses after
// probeFor.
type circuit struct {
	min, max, probeFor time.Duration

	mu         sync.Mutex // protects the fields below
	open       bool
	until      time.Time
	wait       time.Duration
	probeUntil time.Time // a probe is out until then
}

// allowHold reports whether an unfamiliar execution may be held now.
func (c *circuit) allowHold(now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case !c.open:
		return true
	case now.Before(c.until) || now.Before(c.probeUntil):
		return false
	default:
		c.probeUntil = now.Add(c.probeFor)
		return true
	}
}

// failure opens the circuit, or keeps it open twice as long after a
// failed probe. Failures while it is open and no probe is out (other
// executions held before it opened) change nothing.
func (c *circuit) failure(now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	probing := c.open && !now.Before(c.until)
	switch {
	case c.open && !probing:
		return
	case probing:
		c.wait = min(2*c.wait, c.max)
	default:
		c.wait = c.min
	}
	c.open, c.until, c.probeUntil = true, now.Add(c.wait), time.Time{}
}

// success closes the circuit.
func (c *circuit) success() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.open, c.wait, c.probeUntil = false, 0, time.Time{}
}

func (c *circuit) isOpen() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.open
}
