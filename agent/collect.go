package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/execwatch"
	"github.com/cloudprotect/cloudprotect/agent/identify"
	"github.com/cloudprotect/cloudprotect/agent/queue"
)

// Why an epoch's context is cancelled.
var (
	// errWithdrawn: the person no longer participates; whatever the
	// sources still deliver is discarded, then the queue is purged.
	errWithdrawn = errors.New("consent withdrawn")
	// errStopping: the agent stops, collection is paused, or a source
	// failed; what the sources still deliver is identified and committed.
	errStopping = errors.New("collection stopping")
)

// Bounds of an epoch's start and stop.
const (
	// readyWithin is how long a source may take to see every exec.
	readyWithin = 10 * time.Second
	// drainJobsWithin bounds the wait for large files still being hashed
	// at a stop; what is not hashed by then is counted as unidentified.
	drainJobsWithin = 10 * time.Second
)

// collectorDeps is what a collector works with; tests replace parts.
type collectorDeps struct {
	log     *slog.Logger
	consent *consent.Manager
	queue   *queue.Queue
	ident   *identify.Identifier
	rep     hashChecker
	runners *runners
	// chain builds the exec sources to try, best first.
	chain func() ([]func(execwatch.Options) execwatch.Source, error)
	// loaded builds the watcher of download folders; nil for none.
	loaded func() execwatch.Source
	// afterBatch runs after the pipeline queued events.
	afterBatch func()
	// forget purges what was collected and asks the cloud to delete it.
	forget func()
	// consentChanged wakes the parts that send.
	consentChanged func()
	// statusChanged tells the status publisher to look again.
	statusChanged func()
	// beforeAdd runs in the pipeline before each event is queued (tests).
	beforeAdd func()
}

// collector follows consent: while the person participates it runs one
// collection epoch — the exec source, the loaded watcher, and the
// pipeline, the only writer to the queue — and when they stop
// participating it cancels the epoch, waits for it, then purges. It is a
// service under the supervisor: an epoch whose source fails ends with an
// error, the supervisor starts the collector again after a delay, and the
// next epoch starts with the next source in the chain.
type collector struct {
	collectorDeps
	// settle carries requests to report once consent is applied.
	settle chan chan struct{}

	mu sync.Mutex // protects the fields below
	// cur is the running epoch, nil while none runs.
	cur *epoch
	// chainAt is where the next epoch starts in the chain of sources.
	chainAt int
	// failed is why the last epoch failed; it is the status's reason
	// while a lesser source runs. sourceFailed says it was the exec
	// source (rather than the watcher of download folders).
	failed       error
	sourceFailed bool
	// skipped says which better sources could not run in this epoch.
	skipped []string
	// done accumulates the counters of finished epochs.
	done epochStats
}

// epoch is one running collection.
type epoch struct {
	source execwatch.Source
	loaded execwatch.Source
	pipe   *pipeline
}

// epochStats are the counters the status shows.
type epochStats struct {
	seen, lost, missed, unidentified uint64
}

func newCollector(d collectorDeps) *collector {
	return &collector{collectorDeps: d, settle: make(chan chan struct{})}
}

// Serve runs epochs while the person participates and purges when they
// stop, until ctx is cancelled. It returns the error of an epoch whose
// source failed.
func (c *collector) Serve(ctx context.Context) error {
	changed, cancel := c.consent.Subscribe()
	defer cancel()
	var waiting []chan struct{}
	answer := func() {
		for _, ch := range waiting {
			close(ch)
		}
		waiting = waiting[:0]
	}
	defer answer()
	for {
		v := c.consent.View()
		if v.Collecting {
			err := c.runEpoch(ctx, changed, &waiting)
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if err != nil {
				return err
			}
			continue // consent changed: apply it
		}
		c.mu.Lock()
		c.chainAt, c.failed, c.skipped = 0, nil, nil
		c.mu.Unlock()
		if v.State != consent.Participating {
			c.forget()
		}
		c.consentChanged()
		c.statusChanged()
		answer()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		case ch := <-c.settle:
			waiting = append(waiting, ch)
		}
	}
}

// settled waits until the collector has applied the current consent:
// sources started or stopped, the queue purged after leaving. The local
// API answers a change only then, so its answer is the truth.
func (c *collector) settled(ctx context.Context) {
	ch := make(chan struct{})
	select {
	case c.settle <- ch:
	case <-ctx.Done():
		return
	}
	select {
	case <-ch:
	case <-ctx.Done():
	}
}

// runEpoch starts an epoch, runs it until consent changes or ctx is
// cancelled, stops it and waits for it. It returns nil when consent
// changed, ctx.Err() on cancellation, and an error when the exec source
// failed or none could run.
func (c *collector) runEpoch(ctx context.Context, changed <-chan struct{}, waiting *[]chan struct{}) error {
	chain, err := c.chain()
	if err != nil {
		return err
	}
	ectx, ecancel := context.WithCancelCause(ctx)
	defer ecancel(errStopping)
	out := make(chan []execwatch.Event, 64)
	pipe := newPipeline(c.collectorDeps)
	pipeDone := make(chan error, 1)
	go func() { pipeDone <- pipe.run(ectx, out) }()

	var wg sync.WaitGroup
	srcErr := make(chan error, 2)
	loadedErr := make(chan error, 1)
	serve := func(s execwatch.Source) {
		wg.Go(func() {
			if err := s.Serve(ectx, out); err != nil && ectx.Err() == nil {
				loadedErr <- fmt.Errorf("the watcher of download folders stopped: %w", err)
			}
		})
	}
	// stop cancels the epoch, lets the sources deliver what the kernel
	// reported, and waits for the pipeline to identify and commit it (or,
	// when consent was withdrawn, to discard it).
	stop := func(cause error) error {
		ecancel(cause)
		wg.Wait()
		close(out)
		perr := <-pipeDone
		c.mu.Lock()
		if c.cur != nil {
			c.done.add(c.cur.stats())
			c.cur = nil
		}
		c.mu.Unlock()
		c.statusChanged()
		return perr
	}

	src, skipped, err := c.startSource(ectx, chain, out, &wg, srcErr)
	if err != nil {
		stop(errStopping)
		return err
	}
	e := &epoch{source: src, pipe: pipe}
	pipe.setWatcher(src)
	if c.loaded != nil {
		e.loaded = c.loaded()
		serve(e.loaded)
	}
	c.mu.Lock()
	c.cur, c.skipped = e, skipped
	c.mu.Unlock()
	c.log.Info("collection started", "source", src.Name(), "skipped", skipped)
	c.consentChanged()
	c.statusChanged()
	for _, ch := range *waiting {
		close(ch)
	}
	*waiting = (*waiting)[:0]

	for {
		select {
		case <-ctx.Done():
			stop(errStopping)
			c.log.Info("collection stopped")
			return ctx.Err()
		case err := <-srcErr:
			c.log.Error("exec source failed; collection restarts with the next source", "err", err)
			stop(errStopping)
			c.mu.Lock()
			c.failed, c.sourceFailed = err, true
			c.chainAt = min(c.chainAt+1, len(chain)-1)
			c.mu.Unlock()
			return err
		case err := <-loadedErr:
			// The exec source is fine: the next epoch starts with it again.
			c.log.Error("collection restarts", "err", err)
			stop(errStopping)
			c.mu.Lock()
			c.failed, c.sourceFailed = err, false
			c.mu.Unlock()
			return err
		case err := <-pipeDone:
			// The pipeline only ends early when the queue is closed.
			pipeDone <- err
			stop(errStopping)
			return fmt.Errorf("statistics pipeline stopped: %w", err)
		case <-changed:
		case ch := <-c.settle:
			*waiting = append(*waiting, ch)
		}
		v := c.consent.View()
		if !v.Collecting {
			cause := errStopping
			if v.State != consent.Participating {
				cause = errWithdrawn
			}
			stop(cause)
			c.log.Info("collection stopped", "participation", v.State, "paused", v.Paused)
			return nil
		}
		for _, ch := range *waiting {
			close(ch)
		}
		*waiting = (*waiting)[:0]
	}
}

// startSource serves the first source of the chain, from chainAt, that
// gets ready; sources that fail before they are ready are skipped. It
// returns the source and why better ones were skipped.
func (c *collector) startSource(ctx context.Context, chain []func(execwatch.Options) execwatch.Source,
	out chan<- []execwatch.Event, wg *sync.WaitGroup, srcErr chan<- error) (execwatch.Source, []string, error) {
	c.mu.Lock()
	from := min(c.chainAt, len(chain)-1)
	c.mu.Unlock()
	var skipped []string
	for _, build := range chain[from:] {
		s := build(execwatch.Options{Logger: c.log})
		sctx, scancel := context.WithCancel(ctx)
		errc := make(chan error, 1)
		wg.Go(func() {
			defer scancel()
			errc <- s.Serve(sctx, out)
		})
		timer := time.NewTimer(readyWithin)
		select {
		case <-s.Ready():
			timer.Stop()
			// From now on a return is a failure of the running epoch.
			wg.Go(func() {
				if err := <-errc; err != nil && ctx.Err() == nil {
					srcErr <- fmt.Errorf("the %s source stopped: %w", s.Name(), err)
				}
			})
			return s, skipped, nil
		case err := <-errc:
			timer.Stop()
			if ctx.Err() != nil {
				return nil, skipped, ctx.Err()
			}
			c.log.Info("exec source cannot run here", "source", s.Name(), "err", err)
			skipped = append(skipped, fmt.Sprintf("%s: %v", s.Name(), err))
		case <-timer.C:
			scancel()
			<-errc
			c.log.Warn("exec source not ready in time", "source", s.Name(), "within", readyWithin)
			skipped = append(skipped, fmt.Sprintf("%s: not ready within %s", s.Name(), readyWithin))
		case <-ctx.Done():
			timer.Stop()
			scancel()
			<-errc
			return nil, skipped, ctx.Err()
		}
	}
	return nil, skipped, fmt.Errorf("no way to watch executed programs here (%s): %w", strings.Join(skipped, "; "), execwatch.ErrUnavailable)
}

func (s *epochStats) add(o epochStats) {
	s.seen += o.seen
	s.lost += o.lost
	s.missed += o.missed
	s.unidentified += o.unidentified
}

func (e *epoch) stats() epochStats {
	st := e.source.Stats()
	out := epochStats{seen: st.Events, lost: st.Lost}
	if e.loaded != nil {
		l := e.loaded.Stats()
		out.seen += l.Events
		out.lost += l.Lost
	}
	out.missed, out.unidentified = e.pipe.missed.Load(), e.pipe.unidentified.Load()
	return out
}

// collectionStatus is what the status says about collection.
type collectionStatus struct {
	source  string
	stats   epochStats
	reasons []string
}

// status reports the running source, the counters since the agent
// started, and every reason the agent may miss executions. The reasons
// come from here alone: the source's own limits, why a better source is
// not running, and what was missed.
func (c *collector) status() collectionStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := collectionStatus{stats: c.done}
	if c.cur == nil {
		if c.failed != nil {
			st.reasons = append(st.reasons, fmt.Sprintf("%v; trying again", c.failed))
		}
		return st
	}
	st.source = c.cur.source.Name()
	st.stats.add(c.cur.stats())
	if limited, why := c.cur.source.Limited(); limited {
		st.reasons = append(st.reasons, why)
		if len(c.skipped) > 0 {
			st.reasons = append(st.reasons, fmt.Sprintf("better sources cannot run here (%s)", strings.Join(c.skipped, "; ")))
		}
	}
	switch {
	case c.failed != nil && c.sourceFailed:
		st.reasons = append(st.reasons, fmt.Sprintf("%v, so the %s source is used", c.failed, st.source))
	case c.failed != nil:
		st.reasons = append(st.reasons, fmt.Sprintf("%v; it was started again", c.failed))
	}
	if st.stats.missed > 0 {
		st.reasons = append(st.reasons, fmt.Sprintf("%d executions were seen but not identified: programs run from memory or from a filesystem of another mount namespace that ended before the agent could look", st.stats.missed))
	}
	if st.stats.lost > 0 {
		st.reasons = append(st.reasons, fmt.Sprintf("%d executions were missed because the agent fell behind", st.stats.lost))
	}
	if st.stats.unidentified > 0 {
		st.reasons = append(st.reasons, fmt.Sprintf("%d executions could not be identified (files changing while read, unreadable or too large)", st.stats.unidentified))
	}
	return st
}

// loadPeople lists, in system mode, every person whose folders are
// watched for programs that arrive, with their rights (see
// execwatch.Person); nil in user mode or when the configuration names
// the folders: then the watcher watches them with the agent's own.
func (a *Agent) loadPeople() []execwatch.Person {
	if len(a.cfg.LoadDirs) > 0 || a.cfg.Mode == ModeUser {
		return nil
	}
	people, err := execwatch.PeopleFromPasswd("/etc/passwd")
	if err != nil {
		a.log.Warn("read /etc/passwd for download folders", "err", err)
	}
	return people
}

// forget removes everything collected while the person participated: the
// pending statistics from disk, and (through the uploader) the data the
// cloud holds. It is idempotent, so it runs at every start too. The
// collector calls it only once no epoch runs: nothing can be added after.
func (a *Agent) forget() {
	if !a.queue.Empty() {
		st := a.queue.Stats()
		if err := a.queue.Purge(); err != nil {
			a.log.Error("purge queue", "err", err)
		} else {
			a.log.Info("pending statistics deleted", "records", st.Records)
		}
	}
	if err := a.ident.Forget(); err != nil {
		a.log.Error("delete the identification cache", "err", err)
	}
	a.runners.clear()
	a.onForget()
}
