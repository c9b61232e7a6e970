// Package reputation asks the Security Network for the reputation of every
// newly seen file: hashes are gathered over a short window and looked up
// in bulk, verdicts are cached for as long as the server allows, and
// "malicious" or "untrusted" verdicts become alerts for the person. No
// lookup is made while the person does not participate.
package reputation

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"path"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/cloud"
	"github.com/cloudprotect/cloudprotect/agent/safetext"
	"github.com/cloudprotect/cloudprotect/wire"
)

// Defaults of Options.
const (
	DefaultWindow     = 2 * time.Second
	DefaultBatch      = wire.MaxLookupHashes
	DefaultMaxPending = 10_000
	DefaultCacheSize  = 100_000
	DefaultMinBackoff = 30 * time.Second
	DefaultMaxBackoff = 30 * time.Minute
)

// Lookuper answers bulk reputation lookups. *cloud.Installation is one:
// it looks up with the installation's credentials and refuses while the
// person does not participate.
type Lookuper interface {
	Lookup(ctx context.Context, hashes []string) ([]wire.Reputation, error)
	// Problem says why no lookup can be made whatever is tried (no
	// server is configured, or not one that may be used), or nil. Only a
	// change of configuration ends it.
	Problem() error
}

// Options configure a Checker. Lookup, Allowed and Alert are required.
type Options struct {
	Lookup Lookuper
	// Allowed reports whether the person participates; no lookup is made
	// and nothing is queued while it is false.
	Allowed func() bool
	// Alert receives "malicious" and "untrusted" verdicts, from Serve's
	// goroutine, without locks held. It must not block for long.
	Alert func(api.Alert)
	// Clock is the time; nil means cloud.SystemClock.
	Clock cloud.Clock
	// Logger receives what happens; nil discards.
	Logger *slog.Logger
	// Window is how long hashes are gathered before a lookup (default
	// 2 s); Batch pending hashes are looked up at once (default and
	// maximum wire.MaxLookupHashes).
	Window time.Duration
	Batch  int
	// MaxPending bounds the hashes waiting for a lookup (default 10,000);
	// beyond it new hashes are dropped and counted.
	MaxPending int
	// CacheSize bounds the verdicts kept (default 100,000); the least
	// recently used are forgotten first.
	CacheSize int
	// MinBackoff and MaxBackoff bound the wait after a failed lookup
	// (default 30 s and 30 min).
	MinBackoff, MaxBackoff time.Duration
	// Jitter returns a number in [0, 1); nil means math/rand/v2.
	Jitter func() float64
}

// Stats are counters of a Checker.
type Stats struct {
	Pending int    `json:"pending"` // hashes waiting for a lookup
	Cached  int    `json:"cached"`  // verdicts cached
	Dropped uint64 `json:"dropped"` // hashes dropped because too many were pending
	Lookups uint64 `json:"lookups"` // bulk lookups answered
	Alerts  uint64 `json:"alerts"`  // alerts raised
}

// Checker looks up the reputation of files. Check and Forget are safe to
// call from any goroutine; Serve does the lookups.
type Checker struct {
	opts  Options
	log   *slog.Logger
	clock cloud.Clock
	kick  chan struct{} // one slot: enough pending, or consent changed

	mu sync.Mutex // protects the fields below
	// pending maps hashes waiting for a lookup to the path they were seen
	// at; order keeps them oldest first (hashes already looked up or
	// forgotten are skipped when taken).
	pending map[string]string
	order   []string
	// oldest is when the oldest pending hash arrived.
	oldest time.Time
	// inflight holds the hashes of the lookup under way.
	inflight map[string]string
	// gen is bumped by Forget: answers to older lookups are discarded.
	gen      uint64
	cache    map[string]*list.Element // of *entry
	lru      *list.List               // most recently used first
	retryAt  time.Time
	failures int
	stats    Stats
	// unavailable is the Lookuper's Problem when Serve last looked: no
	// lookup is tried, and nothing wakes Serve but Wake, until it is
	// gone. told is the problem last logged, so that it is logged once
	// per change of configuration.
	unavailable error
	told        string
}

type entry struct {
	sha256  string
	verdict string
	source  string
	expires time.Time
}

// New returns a Checker.
func New(opts Options) (*Checker, error) {
	if opts.Lookup == nil || opts.Allowed == nil || opts.Alert == nil {
		return nil, errors.New("create reputation checker: Lookup, Allowed and Alert are required")
	}
	if opts.Clock == nil {
		opts.Clock = cloud.SystemClock{}
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Window <= 0 {
		opts.Window = DefaultWindow
	}
	if opts.Batch <= 0 || opts.Batch > wire.MaxLookupHashes {
		opts.Batch = DefaultBatch
	}
	if opts.MaxPending <= 0 {
		opts.MaxPending = DefaultMaxPending
	}
	if opts.CacheSize <= 0 {
		opts.CacheSize = DefaultCacheSize
	}
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = DefaultMinBackoff
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = DefaultMaxBackoff
	}
	if opts.Jitter == nil {
		opts.Jitter = rand.Float64
	}
	return &Checker{
		opts:        opts,
		log:         opts.Logger,
		clock:       opts.Clock,
		kick:        make(chan struct{}, 1),
		pending:     map[string]string{},
		inflight:    map[string]string{},
		cache:       map[string]*list.Element{},
		lru:         list.New(),
		unavailable: opts.Lookup.Problem(),
	}, nil
}

// Check queues the file with this SHA-256, seen at the anonymised path,
// for a lookup, unless a verdict on it is cached and fresh. It never
// blocks on the network: when too many hashes are pending, the new one
// is dropped and counted. Nothing is queued while the person does not
// participate.
func (c *Checker) Check(sha256, anonPath string) {
	if !wire.ValidSHA256(sha256) || !c.opts.Allowed() {
		return
	}
	anonPath = pathTail(anonPath)
	now := c.clock.Now()
	c.mu.Lock()
	if el, ok := c.cache[sha256]; ok {
		e := el.Value.(*entry)
		if now.Before(e.expires) {
			c.lru.MoveToFront(el)
			c.mu.Unlock()
			return
		}
		c.lru.Remove(el)
		delete(c.cache, sha256)
	}
	if _, ok := c.inflight[sha256]; ok {
		c.inflight[sha256] = anonPath
		c.mu.Unlock()
		return
	}
	if _, ok := c.pending[sha256]; ok {
		c.pending[sha256] = anonPath
		c.mu.Unlock()
		return
	}
	if len(c.pending) >= c.opts.MaxPending {
		c.stats.Dropped++
		c.mu.Unlock()
		return
	}
	first := len(c.pending) == 0
	if first {
		c.oldest = now
	}
	c.pending[sha256] = anonPath
	c.order = append(c.order, sha256)
	full := len(c.pending) >= c.opts.Batch
	unavailable := c.unavailable != nil
	c.mu.Unlock()
	if (first || full) && !unavailable {
		c.Wake() // Serve starts the window, or looks up at once
	}
}

// maxPathKept bounds the path kept with each pending hash for its alert,
// so MaxPending hashes hold at most a few MiB whatever the paths' lengths.
const maxPathKept = 256

// pathTail returns p, or its last maxPathKept bytes behind "…/" (cut at a
// component where it can, never inside a character), keeping the
// program's name and the folders nearest to it.
func pathTail(p string) string {
	if len(p) <= maxPathKept {
		return p
	}
	t := p[len(p)-maxPathKept:]
	if i := strings.IndexByte(t, '/'); i >= 0 && i < len(t)-1 {
		return "…" + t[i:]
	}
	for len(t) > 0 && !utf8.RuneStart(t[0]) {
		t = t[1:]
	}
	return "…/" + t
}

// Wake makes Serve look again at what is pending and at whether lookups
// can be made: call it when consent or the configuration (the server,
// its certificate authorities) changes. It never blocks.
func (c *Checker) Wake() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// Forget drops every pending hash and every cached verdict, and discards
// the answer to a lookup under way: the agent calls it when the person
// leaves.
func (c *Checker) Forget() {
	c.mu.Lock()
	c.gen++
	c.pending, c.order, c.inflight = map[string]string{}, nil, map[string]string{}
	c.cache, c.lru = map[string]*list.Element{}, list.New()
	c.retryAt, c.failures = time.Time{}, 0
	c.mu.Unlock()
	c.Wake()
}

// Stats returns the counters.
func (c *Checker) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.stats
	s.Pending = len(c.pending) + len(c.inflight)
	s.Cached = len(c.cache)
	return s
}

// Serve looks up pending hashes until ctx is cancelled, and returns
// ctx.Err().
func (c *Checker) Serve(ctx context.Context) error {
	for {
		c.checkAvailable()
		wait, ok := c.due()
		if ok && wait <= 0 {
			c.lookup(ctx)
			if ctx.Err() != nil {
				return ctx.Err()
			}
			continue
		}
		var t cloud.Timer
		var tc <-chan time.Time
		if ok {
			t = c.clock.NewTimer(wait)
			tc = t.C()
		}
		select {
		case <-ctx.Done():
		case <-tc:
		case <-c.kick:
		}
		if t != nil {
			t.Stop()
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

// checkAvailable asks the Lookuper whether lookups can be made at all,
// and logs the answer once per change while the person participates.
func (c *Checker) checkAvailable() {
	p := c.opts.Lookup.Problem()
	c.setAvailable(p)
}

func (c *Checker) setAvailable(p error) {
	allowed := c.opts.Allowed()
	c.mu.Lock()
	c.unavailable = p
	before := c.told
	switch {
	case p != nil && allowed:
		c.told = p.Error()
	case p == nil:
		c.told = ""
	}
	now := c.told
	c.mu.Unlock()
	switch {
	case now != "" && now != before:
		c.log.Warn("reputation lookups wait until a Security Network server can be used: programs are not checked with the cloud", "problem", now)
	case now == "" && before != "":
		c.log.Info("a Security Network server can be used again: reputation lookups resume")
	}
}

// Unavailable says why no lookup can be made until the configuration
// changes (no server, or not one that may be used), or nil. It is cheap:
// the answer Serve got when it last looked.
func (c *Checker) Unavailable() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.unavailable
}

// due returns how long until the next lookup; false when nothing is
// pending, the person does not participate or no lookup can be made.
func (c *Checker) due() (time.Duration, bool) {
	if !c.opts.Allowed() {
		return 0, false
	}
	now := c.clock.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.pending) == 0 || c.unavailable != nil {
		return 0, false
	}
	at := c.oldest.Add(c.opts.Window)
	if len(c.pending) >= c.opts.Batch {
		at = now
	}
	if c.retryAt.After(at) {
		at = c.retryAt
	}
	return at.Sub(now), true
}

// lookup looks up one batch of the oldest pending hashes.
func (c *Checker) lookup(ctx context.Context) {
	c.mu.Lock()
	gen := c.gen
	batch := make([]string, 0, min(len(c.pending), c.opts.Batch))
	i := 0
	for ; i < len(c.order) && len(batch) < c.opts.Batch; i++ {
		h := c.order[i]
		p, ok := c.pending[h]
		if !ok {
			continue
		}
		batch = append(batch, h)
		c.inflight[h] = p
		delete(c.pending, h)
	}
	c.order = append([]string(nil), c.order[i:]...)
	c.oldest = c.clock.Now()
	c.mu.Unlock()
	if len(batch) == 0 {
		return
	}

	reps, err := c.opts.Lookup.Lookup(ctx, batch)
	var problem error
	if err != nil {
		problem = c.opts.Lookup.Problem()
	}

	now := c.clock.Now()
	c.mu.Lock()
	if c.gen != gen {
		c.mu.Unlock()
		return // forgotten while the lookup was under way
	}
	if err != nil {
		// Back to the front of the queue, to be asked again.
		for _, h := range batch {
			if p, ok := c.inflight[h]; ok {
				c.pending[h] = p
				delete(c.inflight, h)
			}
		}
		c.order = append(batch, c.order...)
		if ctx.Err() != nil {
			c.mu.Unlock()
			return
		}
		if problem != nil {
			// The configuration changed meanwhile: no retry until it
			// changes again.
			c.mu.Unlock()
			c.setAvailable(problem)
			return
		}
		c.failures++
		wait := cloud.Backoff(c.failures, c.opts.MinBackoff, c.opts.MaxBackoff, c.opts.Jitter)
		c.retryAt = now.Add(wait)
		c.mu.Unlock()
		level := slog.LevelWarn
		if errors.Is(err, cloud.ErrNotParticipating) {
			level = slog.LevelDebug // consent changed while the lookup was prepared
		}
		c.log.Log(ctx, level, "reputation lookup failed", "err", err, "hashes", len(batch), "retry_in", wait)
		return
	}
	c.failures, c.retryAt = 0, time.Time{}
	c.stats.Lookups++
	var alerts []api.Alert
	for _, r := range reps {
		p, ok := c.inflight[r.SHA256]
		if !ok {
			continue
		}
		if r.TTLSeconds > 0 {
			c.storeLocked(r, now.Add(time.Duration(r.TTLSeconds)*time.Second))
		}
		if r.Verdict == wire.VerdictMalicious || r.Verdict == wire.VerdictUntrusted {
			alerts = append(alerts, AlertFor(r.SHA256, p, r))
			c.stats.Alerts++
		}
	}
	for _, h := range batch {
		delete(c.inflight, h)
	}
	c.mu.Unlock()
	for _, a := range alerts {
		c.log.Warn("reputation alert", "verdict", a.Verdict, "program", a.Program)
		c.opts.Alert(a)
	}
}

// Ask looks hashes up now, without waiting for the gathering window, for
// a decision that cannot wait (an execution held until the cloud
// answers); ctx bounds it. Answers are cached as Serve's are and taken
// off the pending list; no alert is raised: the caller acts on the
// verdicts. Nothing is asked while the person does not participate.
func (c *Checker) Ask(ctx context.Context, hashes []string) ([]wire.Reputation, error) {
	if !c.opts.Allowed() {
		return nil, cloud.ErrNotParticipating
	}
	if err := c.Unavailable(); err != nil {
		return nil, err
	}
	if len(hashes) > wire.MaxLookupHashes {
		return nil, fmt.Errorf("ask reputation: %d hashes, at most %d at once", len(hashes), wire.MaxLookupHashes)
	}
	c.mu.Lock()
	gen := c.gen
	c.mu.Unlock()
	reps, err := c.opts.Lookup.Lookup(ctx, hashes)
	if err != nil {
		return nil, err
	}
	asked := make(map[string]bool, len(hashes))
	for _, h := range hashes {
		asked[h] = true
	}
	now := c.clock.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stats.Lookups++
	out := reps[:0:0]
	for _, r := range reps {
		if !asked[r.SHA256] {
			continue // an answer to a question nobody asked
		}
		out = append(out, r)
		if c.gen != gen {
			continue // forgotten meanwhile: nothing is kept
		}
		if r.TTLSeconds > 0 {
			c.storeLocked(r, now.Add(time.Duration(r.TTLSeconds)*time.Second))
		}
		delete(c.pending, r.SHA256)
	}
	return out, nil
}

// storeLocked caches a verdict and its source, forgetting the least
// recently used one beyond CacheSize.
func (c *Checker) storeLocked(r wire.Reputation, expires time.Time) {
	if el, ok := c.cache[r.SHA256]; ok {
		e := el.Value.(*entry)
		e.verdict, e.source, e.expires = r.Verdict, r.Source, expires
		c.lru.MoveToFront(el)
		return
	}
	c.cache[r.SHA256] = c.lru.PushFront(&entry{sha256: r.SHA256, verdict: r.Verdict, source: r.Source, expires: expires})
	for c.lru.Len() > c.opts.CacheSize {
		old := c.lru.Back()
		c.lru.Remove(old)
		delete(c.cache, old.Value.(*entry).sha256)
	}
}

// Verdict returns the cached verdict on sha256, if a fresh one is cached.
func (c *Checker) Verdict(sha256 string) (string, bool) {
	r, ok := c.Cached(sha256)
	return r.Verdict, ok
}

// Cached returns the fresh cached verdict on sha256 with its source, if
// there is one.
func (c *Checker) Cached(sha256 string) (wire.Reputation, bool) {
	now := c.clock.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.cache[sha256]
	if !ok {
		return wire.Reputation{}, false
	}
	e := el.Value.(*entry)
	if !now.Before(e.expires) {
		return wire.Reputation{}, false
	}
	return wire.Reputation{SHA256: sha256, Verdict: e.verdict, Source: e.source}, true
}

// AlertFor builds the alert on a file from the agent's own facts: the
// hash it asked about, the path it saw the file at, and of the server's
// answer only the verdict and its source, each one of a fixed set of
// words (anything else reads as "unknown" and no source). Nothing the
// server wrote as free text reaches an alert. Bidirectional overrides,
// control and other invisible format characters in the path, which a
// hostile file name can carry to make one program look like another or
// to smuggle a message, are shown as "?".
func AlertFor(sha256, seenPath string, r wire.Reputation) api.Alert {
	v := r.Verdict
	if !wire.ValidVerdict(v) {
		v = wire.VerdictUnknown
	}
	src := r.Source
	if !wire.ValidSource(src) {
		src = ""
	}
	shown := Neutralise(seenPath)
	return api.Alert{SHA256: sha256, Path: shown, Program: path.Base(shown), Verdict: v, Source: src, Action: api.AlertActionAlerted}
}

// Neutralise replaces the characters of s that change how the text
// around it reads (bidirectional controls, control and format characters,
// invalid UTF-8) with "?", as every surface that shows a path does
// (safetext.Line).
func Neutralise(s string) string { return safetext.Line(s) }
