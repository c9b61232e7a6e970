// Package upload sends the statistics queue to the Security Network: it
// takes batches from the queue, keeps them within the server's limits,
// sends them through the agent's installation (package cloud) with
// patient backoff, and counts what the server accepted and refused.
// Nothing is taken or sent unless the person participates.
package upload

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/cloud"
	"github.com/cloudprotect/cloudprotect/agent/internal/idle"
	"github.com/cloudprotect/cloudprotect/wire"
)

// Defaults of Options.
const (
	DefaultInterval       = 15 * time.Minute
	DefaultNudgeThreshold = 1000
	// The backoff after failures is the installation's.
	DefaultMinBackoff    = cloud.DefaultMinBackoff
	DefaultMaxBackoff    = cloud.DefaultMaxBackoff
	DefaultMaxRetryAfter = cloud.DefaultMaxRetryAfter
	// maxBatchesPerCycle bounds one drain of the queue.
	maxBatchesPerCycle = 100
)

// Queue is what the uploader needs of the statistics queue.
type Queue interface {
	// TakeBatch returns the batch in flight if there is one, whatever max
	// is, or else cuts a new one of at most max pending records, as deltas
	// since they were last sent. The ID stays the same until MarkSent,
	// DropBatch or ReleaseBatch, also across restarts, so a retry sends
	// the same ID. An empty batch means nothing is pending.
	TakeBatch(max int) (id string, recs []wire.Record, err error)
	// ReleaseBatch gives back a batch that was never sent; its records
	// are cut again by the next TakeBatch.
	ReleaseBatch(id string) error
	// MarkSent records that the server accepted the batch.
	MarkSent(id string) error
	// DropBatch records that the server refused the batch for good
	// (400, 413, 422); its records count as dropped.
	DropBatch(id string) error
	// Pending returns the number of records waiting to be sent.
	Pending() int
}

// Installation is what the uploader needs of the agent's installation on
// the Security Network (*cloud.Installation is one).
type Installation interface {
	// Generation names the installation now; leaving moves it on.
	Generation() cloud.Generation
	// PostBatch sends a batch for the installation of generation gen,
	// registering first when needed; nil when the server accepted it.
	PostBatch(ctx context.Context, gen cloud.Generation, batchID string, gz []byte) error
	// Problem says why nothing can be sent to the configured server, or
	// nil.
	Problem() error
	// DeleteNow sends the deletion requests waiting for the server.
	DeleteNow(ctx context.Context)
	// AddTotals adds to the counters kept with the installation.
	AddTotals(cloud.Totals)
	// Status is what the local API shows of the installation and the
	// counters.
	Status() api.UploadInfo
}

// Options configure an Uploader. Queue, Installation, Allowed and
// StatementVersion are required.
type Options struct {
	Queue Queue
	// Installation sends the batches and keeps the counters.
	Installation Installation
	// Allowed reports whether the person participates. It is checked
	// before a batch is taken from the queue; the installation checks it
	// again before every request.
	Allowed func() bool
	// StatementVersion returns the statement version the person accepted,
	// sent in every batch.
	StatementVersion func() int
	// Scrub, when set, is applied to the records of every batch before
	// it is encoded (the agent anonymises their paths once more, with
	// every name it knows by then). The preview must apply it too.
	Scrub func([]wire.Record) []wire.Record
	// Clock is the time; nil means cloud.SystemClock.
	Clock cloud.Clock
	// Logger receives what happens; nil discards.
	Logger *slog.Logger
	// Interval is how often pending records are sent (default 15 min).
	Interval time.Duration
	// NudgeThreshold is the number of pending records at which a Nudge
	// sends at once instead of waiting for the interval (default 1,000).
	NudgeThreshold int
	// MaxBatchRecords, MaxBatchBytes and MaxBatchDecoded bound a batch:
	// its records, its size compressed and its size as JSON (default
	// wire.MaxBatchRecords, wire.MaxBatchCompressed and
	// wire.MaxBatchDecoded, the server's limits).
	MaxBatchRecords int
	MaxBatchBytes   int
	MaxBatchDecoded int
	// MinBackoff and MaxBackoff bound the exponential backoff after
	// network errors and 5xx answers (default 30 s and 30 min).
	MinBackoff, MaxBackoff time.Duration
	// MaxRetryAfter caps how long a Retry-After can hold uploads
	// (default 1 h).
	MaxRetryAfter time.Duration
	// Jitter returns a number in [0, 1); nil means math/rand/v2.
	Jitter func() float64
	// OnChange is called, without locks held, when what Status shows
	// changed. It must not block.
	OnChange func()
	// Idle, when set, follows whether Serve is asleep with nothing
	// pending (for tests that drive a fake clock).
	Idle *idle.Loop
}

// Uploader sends the queue's batches through the installation. Serve does
// the work; the other methods are safe to call from any goroutine.
type Uploader struct {
	opts  Options
	in    Installation
	log   *slog.Logger
	clock cloud.Clock
	idle  *idle.Loop

	nudge   chan struct{} // one slot: the queue grew
	wake    chan struct{} // one slot: consent changed
	sendNow chan sendRequest

	mu sync.Mutex // protects the fields below
	// gen is the installation's generation the schedule below belongs
	// to; when the person left, it starts afresh.
	gen cloud.Generation
	// Upload schedule: the next periodic upload, and the earliest retry
	// after a failure (failures in a row), or after a Retry-After
	// (serverWait, which Send now honours too).
	nextUpload  time.Time
	retryAt     time.Time
	failures    int
	serverWait  time.Time
	nextAttempt time.Time
	lastErr     string
	// batchLimit is the number of records that last fit in a batch (or
	// that the server last took); each drain starts again from
	// MaxBatchRecords.
	batchLimit int
	// lastBatch is the last batch encoded, kept for its retries.
	lastBatch encoded

	// afterPost is a test hook: it runs when a batch's POST has returned,
	// before its answer is used.
	afterPost func()
}

type encoded struct {
	id      string
	sv      int
	gz      []byte
	decoded int // bytes of JSON before gzip
}

type sendRequest struct {
	force bool
	reply chan sendReply
}

type sendReply struct {
	res api.UploadResult
	err error
}

// BackoffError is returned by Send without force while the uploader waits
// after failures: the next attempt is due at Until.
type BackoffError struct {
	Until time.Time
}

func (e *BackoffError) Error() string {
	return fmt.Sprintf("the last attempt to send failed; the next one is due at %s", e.Until.UTC().Format(time.RFC3339))
}

// New returns an uploader.
func New(opts Options) (*Uploader, error) {
	if opts.Queue == nil || opts.Installation == nil || opts.Allowed == nil || opts.StatementVersion == nil {
		return nil, errors.New("create uploader: Queue, Installation, Allowed and StatementVersion are required")
	}
	if opts.Clock == nil {
		opts.Clock = cloud.SystemClock{}
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&opts.Interval, DefaultInterval)
	def(&opts.MinBackoff, DefaultMinBackoff)
	def(&opts.MaxBackoff, DefaultMaxBackoff)
	def(&opts.MaxRetryAfter, DefaultMaxRetryAfter)
	if opts.NudgeThreshold <= 0 {
		opts.NudgeThreshold = DefaultNudgeThreshold
	}
	if opts.MaxBatchRecords <= 0 || opts.MaxBatchRecords > wire.MaxBatchRecords {
		opts.MaxBatchRecords = wire.MaxBatchRecords
	}
	if opts.MaxBatchBytes <= 0 || opts.MaxBatchBytes > wire.MaxBatchCompressed {
		opts.MaxBatchBytes = wire.MaxBatchCompressed
	}
	if opts.MaxBatchDecoded <= 0 || opts.MaxBatchDecoded > wire.MaxBatchDecoded {
		opts.MaxBatchDecoded = wire.MaxBatchDecoded
	}
	if opts.Jitter == nil {
		opts.Jitter = rand.Float64
	}
	u := &Uploader{
		opts:    opts,
		in:      opts.Installation,
		log:     opts.Logger,
		clock:   opts.Clock,
		idle:    opts.Idle,
		nudge:   make(chan struct{}, 1),
		wake:    make(chan struct{}, 1),
		sendNow: make(chan sendRequest),
		gen:     opts.Installation.Generation(),
	}
	now := opts.Clock.Now()
	u.nextUpload = now
	if last := opts.Installation.Status().LastUpload; last != nil {
		u.nextUpload = later(now, last.Add(opts.Interval))
	}
	return u, nil
}

// Nudge tells the uploader that the queue grew; with NudgeThreshold
// records pending it sends without waiting for the interval. It never
// blocks.
func (u *Uploader) Nudge() { u.idle.Notify(u.nudge) }

// Wake tells the uploader that consent changed. It never blocks. (The
// installation aborts requests in flight when the person stops
// participating.)
func (u *Uploader) Wake() { u.idle.Notify(u.wake) }

func (u *Uploader) changed() {
	if u.opts.OnChange != nil {
		u.opts.OnChange()
	}
}

// Status returns what the local API shows of the upload: the
// installation's, with the uploader's last error and next attempt.
func (u *Uploader) Status() api.UploadInfo {
	info := u.in.Status()
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.lastErr != "" {
		info.LastError = u.lastErr
	}
	if !u.nextAttempt.IsZero() && (info.NextAttempt == nil || u.nextAttempt.Before(*info.NextAttempt)) {
		t := u.nextAttempt.UTC()
		info.NextAttempt = &t
	}
	return info
}

// sync starts the schedule afresh when the person left since it was
// made: failures of the installation left behind say nothing of the next.
func (u *Uploader) sync() {
	gen := u.in.Generation()
	u.mu.Lock()
	defer u.mu.Unlock()
	if gen == u.gen {
		return
	}
	u.gen = gen
	u.failures, u.retryAt, u.serverWait = 0, time.Time{}, time.Time{}
	u.lastErr = ""
}

// Serve sends batches until ctx is cancelled, and returns ctx.Err().
func (u *Uploader) Serve(ctx context.Context) error {
	for {
		u.sync()
		if u.uploadDue() {
			u.drain(ctx)
		}
		wait, ok := u.schedule()
		var tc <-chan time.Time
		var t cloud.Timer
		if ok {
			t = u.clock.NewTimer(wait)
			tc = t.C()
		}
		var nudged, took bool
		var req sendRequest
		u.idle.Sleep(len(tc) > 0)
		select {
		case <-ctx.Done():
		case <-tc:
		case <-u.wake:
			took = true
		case <-u.nudge:
			nudged, took = true, true
		case req = <-u.sendNow:
		}
		u.idle.Woke(took)
		if t != nil {
			t.Stop()
		}
		if nudged && u.opts.Queue.Pending() >= u.opts.NudgeThreshold {
			u.mu.Lock()
			u.nextUpload = u.clock.Now()
			u.mu.Unlock()
		}
		if req.reply != nil {
			u.sync()
			res, err := u.sendAtOnce(ctx, req.force)
			req.reply <- sendReply{res, err}
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

// uploadDue reports whether a periodic upload or a retry is due.
func (u *Uploader) uploadDue() bool {
	if !u.opts.Allowed() || u.in.Problem() != nil {
		return false
	}
	now := u.clock.Now()
	u.mu.Lock()
	defer u.mu.Unlock()
	return !now.Before(later(u.nextUpload, u.retryAt, u.serverWait))
}

// schedule returns how long to sleep until the next upload or retry, and
// false when nothing can be sent until something wakes the uploader. It
// also sets what Status shows as the next attempt.
func (u *Uploader) schedule() (time.Duration, bool) {
	allowed := u.opts.Allowed() && u.in.Problem() == nil
	now := u.clock.Now()
	u.mu.Lock()
	var next time.Time
	if allowed {
		next = later(u.nextUpload, u.retryAt, u.serverWait)
	}
	shown := !next.Equal(u.nextAttempt)
	u.nextAttempt = next
	u.mu.Unlock()
	if shown {
		u.changed()
	}
	if next.IsZero() {
		return 0, false
	}
	return max(0, next.Sub(now)), true
}

// sendAtOnce serves Send: deletion requests and the whole queue, ignoring
// (with force) the backoff of earlier failures but never a server's
// Retry-After.
func (u *Uploader) sendAtOnce(ctx context.Context, force bool) (api.UploadResult, error) {
	if !u.opts.Allowed() {
		defer u.in.DeleteNow(ctx)
		return api.UploadResult{Pending: u.opts.Queue.Pending()}, cloud.ErrNotParticipating
	}
	now := u.clock.Now()
	u.mu.Lock()
	wait, retry := u.serverWait, u.retryAt
	u.mu.Unlock()
	if !force && now.Before(retry) {
		// Deletion requests wait for their own retry too.
		return api.UploadResult{Pending: u.opts.Queue.Pending()}, &BackoffError{Until: retry}
	}
	defer u.in.DeleteNow(ctx)
	if err := u.in.Problem(); err != nil {
		return api.UploadResult{Pending: u.opts.Queue.Pending()}, err
	}
	if now.Before(wait) {
		return api.UploadResult{Pending: u.opts.Queue.Pending()},
			fmt.Errorf("send now: the server asked to wait until %s", wait.UTC().Format(time.RFC3339))
	}
	d, err := u.drain(ctx)
	res := api.UploadResult{Sent: d.sent, Refused: d.refused, RefusedReason: d.reason, Pending: u.opts.Queue.Pending()}
	switch {
	case err != nil:
		res.Message = fmt.Sprintf("sent %d records before an error", d.sent)
	case d.sent == 0 && d.refused == 0:
		res.Message = "nothing to send"
	default:
		res.Message = fmt.Sprintf("sent %d records", d.sent)
	}
	if d.refused > 0 {
		res.Message += fmt.Sprintf("; the server refused %d records, which were dropped (%s)", d.refused, d.reason)
	}
	return res, err
}

// drained is what one drain did: records the server accepted, records it
// refused for good (dropped), and why the last one was refused.
type drained struct {
	sent, refused int
	reason        string
}

// drain sends batches until the queue is empty or a request fails, then
// schedules the next upload or the retry.
func (u *Uploader) drain(ctx context.Context) (d drained, err error) {
	defer func() {
		u.mu.Lock()
		u.batchLimit = 0
		u.mu.Unlock()
		u.changed()
	}()
	for range maxBatchesPerCycle {
		o, err := u.sendOne(ctx)
		d.sent += o.sent
		d.refused += o.refused
		if o.reason != "" {
			d.reason = o.reason
		}
		if err != nil {
			u.failed(ctx, err)
			return d, err
		}
		if o.empty || u.opts.Queue.Pending() == 0 {
			break
		}
	}
	now := u.clock.Now()
	u.mu.Lock()
	u.nextUpload = now.Add(u.opts.Interval)
	u.failures, u.retryAt = 0, time.Time{}
	u.mu.Unlock()
	return d, nil
}

// failed schedules the retry after err.
func (u *Uploader) failed(ctx context.Context, err error) {
	if ctx.Err() != nil {
		return
	}
	now := u.clock.Now()
	u.mu.Lock()
	defer u.mu.Unlock()
	if errors.Is(err, cloud.ErrLeft) || errors.Is(err, cloud.ErrNotParticipating) || errors.Is(err, context.Canceled) {
		// Nothing went wrong with the server: the person left or paused
		// (which aborted the request). Try again at the next interval.
		u.nextUpload = now.Add(u.opts.Interval)
		return
	}
	u.lastErr = err.Error()
	var se *cloud.StatusError
	if errors.As(err, &se) && (se.Code == http.StatusTooManyRequests || se.Code == http.StatusServiceUnavailable) && se.RetryAfter > 0 {
		d := min(max(se.RetryAfter, cloud.MinRetryAfter), u.opts.MaxRetryAfter)
		u.serverWait = now.Add(d)
		u.log.Warn("upload deferred by the server", "err", err, "retry_in", d)
		return
	}
	u.failures++
	d := cloud.Backoff(u.failures, u.opts.MinBackoff, u.opts.MaxBackoff, u.opts.Jitter)
	u.retryAt = now.Add(d)
	u.log.Warn("upload failed", "err", err, "failures", u.failures, "retry_in", d)
}

// outcome is what sendOne did with one batch.
type outcome struct {
	sent    int    // records the server accepted
	refused int    // records it refused for good, dropped
	reason  string // why it refused them
	empty   bool   // nothing was pending
}

// refusedRecords reports whether a refusal is about the records in the
// batch, so that a smaller batch or one without the offending record can
// succeed: 413 (too large for the server, or for a proxy before it) and
// 422 naming a record. Other refusals (400, or 422 about the batch
// itself) are not the records' fault: the batch is kept and retried.
func refusedRecords(se *cloud.StatusError) bool {
	return se.Code == http.StatusRequestEntityTooLarge ||
		(se.Code == http.StatusUnprocessableEntity && strings.Contains(se.Message, "records["))
}

// sendOne sends one batch. A batch the server refuses because of its
// records is split: given back, and half as many records are cut, down to
// the single record at fault, which alone is dropped and counted. Nothing
// else is dropped.
func (u *Uploader) sendOne(ctx context.Context) (outcome, error) {
	// The generation is read before the batch is taken: a batch taken
	// before the person left belongs to the installation they left.
	gen := u.in.Generation()
	if !u.opts.Allowed() {
		return outcome{}, cloud.ErrNotParticipating
	}
	id, recs, gz, err := u.takeBatch()
	if err != nil || len(recs) == 0 {
		return outcome{empty: len(recs) == 0}, err
	}
	// The installation registers only now that there is something to
	// send: the batch taken stays in flight with its ID if that fails.
	err = u.in.PostBatch(ctx, gen, id, gz)
	if u.afterPost != nil {
		u.afterPost()
	}
	if u.in.Generation() != gen {
		// Left while the batch was in flight or since its answer came:
		// the queue was purged; the batch is neither acknowledged nor
		// sent again.
		return outcome{}, cloud.ErrLeft
	}
	var se *cloud.StatusError
	switch {
	case err == nil:
		if merr := u.opts.Queue.MarkSent(id); merr != nil {
			u.log.Warn("cannot mark batch sent", "batch", id, "err", merr)
		}
		now := u.clock.Now().UTC()
		u.in.AddTotals(cloud.Totals{RecordsSent: uint64(len(recs)), LastUpload: &now})
		u.mu.Lock()
		u.lastErr = ""
		// After batches were split, they grow again while the server
		// takes them.
		u.batchLimit = min(2*len(recs), u.opts.MaxBatchRecords)
		u.mu.Unlock()
		u.log.Info("batch sent", "batch", id, "records", len(recs), "bytes", len(gz))
		return outcome{sent: len(recs)}, nil
	case errors.As(err, &se) && refusedRecords(se) && len(recs) > 1:
		// The server counted nothing: the records go back to the queue
		// and a batch of half as many is cut (with a new ID).
		if rerr := u.opts.Queue.ReleaseBatch(id); rerr != nil {
			return outcome{}, fmt.Errorf("release refused batch: %w", rerr)
		}
		u.mu.Lock()
		u.batchLimit = len(recs) / 2
		u.mu.Unlock()
		u.log.Warn("the server refused a batch: sending it in smaller ones", "batch", id, "records", len(recs), "err", err)
		return outcome{}, nil
	case errors.As(err, &se) && refusedRecords(se):
		if derr := u.opts.Queue.DropBatch(id); derr != nil {
			u.log.Warn("cannot drop record", "batch", id, "err", derr)
		}
		u.in.AddTotals(cloud.Totals{BatchesDropped: 1, RecordsRefused: 1})
		u.mu.Lock()
		u.lastErr = err.Error()
		u.mu.Unlock()
		u.log.Error("the server refused a record: dropped", "sha256", recs[0].SHA256, "err", err, "hint", se.Hint)
		return outcome{refused: 1, reason: se.Message}, nil
	default:
		return outcome{}, err
	}
}

// takeBatch takes a batch from the queue and encodes it. A batch beyond
// the server's limits (MaxBatchBytes compressed, MaxBatchDecoded as JSON)
// has never been sent (no such batch is ever sent), so it is given back
// to the queue and a smaller batch is cut instead, of as many records as
// should fit going by the sizes of this one; its ID is new, derived by
// the queue, and the server never saw the old one. A single record that
// cannot fit is dropped.
func (u *Uploader) takeBatch() (id string, recs []wire.Record, gz []byte, err error) {
	u.mu.Lock()
	limit := u.batchLimit
	u.mu.Unlock()
	if limit <= 0 || limit > u.opts.MaxBatchRecords {
		limit = u.opts.MaxBatchRecords
	}
	for {
		id, recs, err = u.opts.Queue.TakeBatch(limit)
		if err != nil {
			return "", nil, nil, fmt.Errorf("take batch: %w", err)
		}
		if len(recs) == 0 {
			return "", nil, nil, nil
		}
		if u.opts.Scrub != nil {
			recs = u.opts.Scrub(recs)
		}
		sv := u.opts.StatementVersion()
		u.mu.Lock()
		last := u.lastBatch
		u.mu.Unlock()
		var decoded int
		if last.id == id && last.sv == sv {
			gz, decoded = last.gz, last.decoded // a retry sends the same bytes
		} else {
			b := NewBatch(id, recs, sv)
			if gz, decoded, err = encodeBatch(&b); err != nil {
				return "", nil, nil, err
			}
			u.mu.Lock()
			u.lastBatch = encoded{id: id, sv: sv, gz: gz, decoded: decoded}
			u.mu.Unlock()
		}
		if len(gz) <= u.opts.MaxBatchBytes && decoded <= u.opts.MaxBatchDecoded {
			u.mu.Lock()
			u.batchLimit = limit
			u.mu.Unlock()
			return id, recs, gz, nil
		}
		if len(recs) == 1 {
			u.log.Error("a record is too large to send: dropped", "sha256", recs[0].SHA256, "bytes", len(gz), "decoded", decoded)
			if err := u.opts.Queue.DropBatch(id); err != nil {
				return "", nil, nil, fmt.Errorf("drop batch: %w", err)
			}
			u.in.AddTotals(cloud.Totals{BatchesDropped: 1, RecordsRefused: 1})
			limit = u.opts.MaxBatchRecords
			continue
		}
		if err := u.opts.Queue.ReleaseBatch(id); err != nil {
			return "", nil, nil, fmt.Errorf("release batch: %w", err)
		}
		// As many records as should fit, going by this batch's sizes,
		// with a margin; at least one fewer.
		fit := min(float64(u.opts.MaxBatchBytes)/float64(len(gz)), float64(u.opts.MaxBatchDecoded)/float64(decoded))
		limit = max(1, min(len(recs)-1, int(float64(len(recs))*fit*0.95)))
		u.log.Debug("batch too large: cutting a smaller one", "records", len(recs), "bytes", len(gz), "decoded", decoded, "next", limit)
	}
}

// SendNow sends the deletion requests and every pending record at once,
// for `cloudprotect send` and the tray's "Send now" of an administrator.
// It ignores the backoff of earlier failures but honours a server's
// Retry-After. It needs Serve to run.
func (u *Uploader) SendNow(ctx context.Context) (api.UploadResult, error) {
	return u.Send(ctx, true)
}

// Send is SendNow; without force it also waits for the backoff of
// earlier failures: while a retry is not due it returns a *BackoffError
// and sends nothing. The agent asks anyone who is not an administrator to
// wait like that, so nobody can make it hammer a failing server.
func (u *Uploader) Send(ctx context.Context, force bool) (api.UploadResult, error) {
	if !u.opts.Allowed() {
		return api.UploadResult{}, cloud.ErrNotParticipating
	}
	reply := make(chan sendReply, 1)
	select {
	case u.sendNow <- sendRequest{force: force, reply: reply}:
	case <-ctx.Done():
		return api.UploadResult{}, ctx.Err()
	}
	select {
	case r := <-reply:
		return r.res, r.err
	case <-ctx.Done():
		return api.UploadResult{}, ctx.Err()
	}
}

// later returns the latest of ts.
func later(ts ...time.Time) time.Time {
	var l time.Time
	for _, t := range ts {
		if t.After(l) {
			l = t
		}
	}
	return l
}
