package agent

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/execwatch"
	"github.com/cloudprotect/cloudprotect/agent/identify"
	"github.com/cloudprotect/cloudprotect/agent/queue"
)

// stopWithin is how long the sources may take to stop after consent is
// withdrawn; they return much sooner (on the cancellation of their poll).
const stopWithin = time.Second

// gate says whether events may be queued. Every path that adds to the
// queue holds it for reading while it checks and adds; withdrawing
// consent takes it for writing, so once close() returns nothing more is
// added and the queue can be purged.
type gate struct {
	mu   sync.RWMutex // protects open
	open bool
}

func (g *gate) set(open bool) {
	g.mu.Lock()
	g.open = open
	g.mu.Unlock()
}

// with runs fn if the gate is open, holding it open meanwhile.
func (g *gate) with(fn func()) bool {
	g.mu.RLock()
	defer g.mu.RUnlock()
	if g.open {
		fn()
	}
	return g.open
}

// collection is one run of the exec source and the loaded watcher while
// the person participates.
type collection struct {
	cancel context.CancelFunc
	done   chan struct{}
	source execwatch.Source
	loaded *execwatch.Loaded
}

// deferredCounts remembers what events wait for a large file's hash.
type deferredCounts struct {
	execs  int
	loaded bool
	at     time.Time
}

// collect follows consent: it runs the exec source, the loaded watcher and
// the pipeline while collecting is allowed, stops them within a second
// when it is not, and when the person is not participating (left,
// declined, forbidden by policy, or a record that could not be trusted)
// purges the queue and asks the cloud to delete what it received.
func (a *Agent) collect(ctx context.Context) error {
	changed, cancel := a.consent.Subscribe()
	defer cancel()
	var cur *collection
	stop := func() {
		if cur == nil {
			return
		}
		a.gate.set(false)
		cur.cancel()
		select {
		case <-cur.done:
		case <-time.After(stopWithin):
			a.log.Error("exec sources did not stop in time", "within", stopWithin)
			<-cur.done
		}
		a.setSource(nil)
		cur = nil
		a.log.Info("collection stopped")
	}
	defer stop()
	var settled []chan struct{}
	for {
		v := a.consent.View()
		switch {
		case v.Collecting && cur == nil:
			c, err := a.startCollection(ctx)
			if err != nil {
				a.log.Error("cannot watch executed programs", "err", err)
				a.setLimited(true, "no way to watch executed programs here: "+err.Error())
			} else {
				cur = c
			}
		case !v.Collecting:
			stop()
			a.gate.set(false)
			if v.State != consent.Participating {
				a.forget()
			}
		}
		a.onConsentChange()
		a.statusChanged()
		for _, ch := range settled {
			close(ch)
		}
		settled = settled[:0]
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		case ch := <-a.settle:
			settled = append(settled, ch)
		}
	}
}

// settled waits until the collector has applied the current consent:
// sources started or stopped, the queue purged after leaving. The local
// API answers a change only then, so its answer is the truth.
func (a *Agent) settled(ctx context.Context) {
	ch := make(chan struct{})
	select {
	case a.settle <- ch:
	case <-ctx.Done():
		return
	}
	select {
	case <-ch:
	case <-ctx.Done():
	}
}

// forget removes everything collected while the person participated: the
// pending statistics from disk, and (through the uploader) the data the
// cloud holds. It is idempotent, so it runs at every start too.
func (a *Agent) forget() {
	a.deferredMu.Lock()
	clear(a.deferred)
	a.deferredMu.Unlock()
	// Events still buffered for the next commit count too: they would
	// be committed a moment later otherwise.
	if !a.queue.Empty() {
		st := a.queue.Stats()
		if err := a.queue.Purge(); err != nil {
			a.log.Error("purge queue", "err", err)
		} else {
			a.log.Info("pending statistics deleted", "records", st.Records)
		}
	}
	a.onForget()
}

func (a *Agent) startCollection(ctx context.Context) (*collection, error) {
	src, err := execwatch.Choose(execwatch.Options{Logger: a.log, Prefer: a.cfg.ExecSource})
	if err != nil {
		return nil, err
	}
	loaded := execwatch.NewLoaded(execwatch.LoadedOptions{Logger: a.log, Dirs: a.loadDirs()})
	cctx, cancel := context.WithCancel(ctx)
	c := &collection{cancel: cancel, done: make(chan struct{}), source: src, loaded: loaded}
	out := make(chan []execwatch.Event, 64)
	var wg sync.WaitGroup
	for _, s := range []execwatch.Source{src, loaded} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.Serve(cctx, out); err != nil && cctx.Err() == nil {
				a.log.Error("exec source stopped", "source", s.Name(), "err", err)
				a.setLimited(true, fmt.Sprintf("the %s source stopped: %v", s.Name(), err))
			}
		}()
	}
	pipeDone := make(chan struct{})
	go func() {
		defer close(pipeDone)
		a.pipeline(cctx, out)
	}()
	go func() {
		wg.Wait()
		cancel()
		<-pipeDone
		close(c.done)
	}()
	a.gate.set(true)
	// The status names the source once it sees every exec.
	if r, ok := src.(execwatch.Readier); ok {
		select {
		case <-r.Ready():
		case <-c.done:
		case <-time.After(5 * time.Second):
			a.log.Warn("exec source not ready after 5s", "source", src.Name())
		}
	}
	a.setSource(c)
	a.log.Info("collection started", "source", src.Name(), "loaded_dirs", loaded.Dirs())
	return c, nil
}

// loadDirs lists the folders where programs arrive: the person's in user
// mode, every person's with a home under /home (and root's) in system mode.
func (a *Agent) loadDirs() []string {
	if len(a.cfg.LoadDirs) > 0 {
		return a.cfg.LoadDirs
	}
	if a.cfg.Mode == ModeUser {
		return nil // the watcher's default: this user's folders
	}
	var dirs []string
	users, err := identify.ReadPasswd("/etc/passwd")
	if err != nil {
		a.log.Warn("read /etc/passwd for download folders", "err", err)
	}
	for _, u := range users {
		if u.Home == "/root" || strings.HasPrefix(u.Home, "/home/") {
			dirs = append(dirs, execwatch.UserLoadDirs(u.Home, filepath.Join(u.Home, ".config"))...)
		}
	}
	return dirs
}

// pipeline turns batches of events into queued statistics: identify each
// file (a cache hit costs an fstat), add it to the queue, and look up the
// reputation of hashes not seen before. It returns when out is drained
// after ctx is cancelled.
func (a *Agent) pipeline(ctx context.Context, out <-chan []execwatch.Event) {
	for {
		var batch []execwatch.Event
		select {
		case <-ctx.Done():
			// Close the descriptors of what is still buffered.
			for {
				select {
				case b := <-out:
					closeAll(b)
				default:
					return
				}
			}
		case batch = <-out:
		}
		a.gate.with(func() {
			for _, ev := range batch {
				a.handle(ev)
			}
		})
		closeAll(batch)
		a.afterBatch()
	}
}

func closeAll(b []execwatch.Event) {
	for _, ev := range b {
		if ev.File != nil {
			ev.File.Close()
		}
	}
}

// handle identifies one event's file and queues it; the caller holds the gate.
func (a *Agent) handle(ev execwatch.Event) {
	var facts identify.Facts
	var err error
	if ev.File != nil {
		facts, err = a.ident.Identify(ev.File, ev.Path)
	} else {
		facts, err = a.ident.IdentifyPath(ev.Path)
	}
	switch {
	case errors.Is(err, identify.ErrDeferred):
		a.noteDeferred(ev)
		return
	case err != nil:
		a.identifyFailed.Add(1)
		a.log.Debug("identify", "path", ev.Path, "err", err)
		return
	}
	t := ev.Time
	if t.IsZero() {
		t = time.Now()
	}
	if err := a.queue.Add(queue.Event{Facts: facts, Exec: !ev.Loaded, Loaded: ev.Loaded, Time: t}); err != nil {
		a.log.Warn("queue event", "err", err)
		return
	}
	a.newHash(facts)
}

// noteDeferred remembers an event whose file is hashed in the background.
func (a *Agent) noteDeferred(ev execwatch.Event) {
	key := a.anon.Anonymize(ev.Path)
	a.deferredMu.Lock()
	defer a.deferredMu.Unlock()
	d := a.deferred[key]
	if d == nil {
		if len(a.deferred) >= maxDeferred {
			a.identifyFailed.Add(1)
			return
		}
		d = &deferredCounts{at: ev.Time}
		a.deferred[key] = d
	}
	if ev.Loaded {
		d.loaded = true
	} else {
		d.execs++
	}
}

// maxDeferred bounds the events waiting for background hashes.
const maxDeferred = 4096

// deferredDone queues the events of a large file once it is hashed. It
// runs on the identifier's background worker.
func (a *Agent) deferredDone(r identify.Result) {
	a.deferredMu.Lock()
	d := a.deferred[r.Facts.Path]
	delete(a.deferred, r.Facts.Path)
	a.deferredMu.Unlock()
	if d == nil || r.Err != nil {
		return
	}
	a.gate.with(func() {
		t := d.at
		if t.IsZero() {
			t = time.Now()
		}
		for i := 0; i < d.execs; i++ {
			a.queue.Add(queue.Event{Facts: r.Facts, Exec: true, Time: t})
		}
		if d.loaded {
			a.queue.Add(queue.Event{Facts: r.Facts, Loaded: true, Time: t})
		}
		a.newHash(r.Facts)
	})
	a.afterBatch()
}

// setSource records the running collection for the status.
func (a *Agent) setSource(c *collection) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.running = c
	a.limited, a.limitedReason = false, ""
	if c != nil {
		a.limited, a.limitedReason = c.source.Limited()
	}
}

func (a *Agent) setLimited(limited bool, why string) {
	a.mu.Lock()
	a.limited, a.limitedReason = limited, why
	a.mu.Unlock()
	a.statusChanged()
}
