package upload

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/wire"
)

// Defaults of Options.
const (
	DefaultInterval       = 15 * time.Minute
	DefaultNudgeThreshold = 1000
	DefaultMinBackoff     = 30 * time.Second
	DefaultMaxBackoff     = 30 * time.Minute
	DefaultMaxRetryAfter  = time.Hour
	// minRetryAfter is the shortest wait a Retry-After can ask for: a
	// server answering "Retry-After: 0" to every request must not turn the
	// uploader into a busy loop.
	minRetryAfter = 5 * time.Second
	// maxBatchesPerCycle bounds one drain of the queue.
	maxBatchesPerCycle = 100
)

// StateFile is the name of the uploader's state file in the agent's state
// folder.
const StateFile = "upload.json"

// ErrNotParticipating is returned by SendNow and Lookup while the person
// does not participate: nothing is sent.
var ErrNotParticipating = errors.New("not participating in the Security Network: nothing is sent")

// errLeft ends work begun before Leave: it must not be finished.
var errLeft = errors.New("the installation was left while the request was prepared")

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

// Options configure an Uploader. Queue, StatePath, Server, Allowed and
// StatementVersion are required.
type Options struct {
	Queue Queue
	// StatePath is the state file, normally StateFile in the agent's
	// state folder. It holds the installation's token: mode 0600.
	StatePath string
	// Server returns the Security Network's URL, "" when none is
	// configured (then nothing is sent). When it changes, the
	// installation on the old server is queued for deletion and a new one
	// is registered on the new server. See ParseServerURL for the servers
	// on this computer that may be used.
	Server func() string
	// CAFile returns the path of a PEM file of certificate authorities
	// trusted for the server in place of the system's, or ""; nil means
	// none.
	CAFile func() string
	// Allowed reports whether the person participates. It is checked
	// before every request that carries statistics or hashes, and before
	// registering. Deletion requests are sent regardless.
	Allowed func() bool
	// StatementVersion returns the statement version the person accepted,
	// sent when registering and in every batch.
	StatementVersion func() int
	// AgentVersion is sent when registering.
	AgentVersion string
	// Scrub, when set, is applied to the records of every batch before
	// it is encoded (the agent anonymises their paths once more, with
	// every name it knows by then). The preview must apply it too.
	Scrub func([]wire.Record) []wire.Record
	// EnrollSecret returns the private network's enrollment secret, sent
	// when registering; "" when there is none. An error stops the
	// registration: an installation is not registered without the secret
	// its administrator configured. Nil means none.
	EnrollSecret func() (string, error)
	// Client configures the HTTP clients (TLS roots, timeouts, and
	// System: the system agent's rules for servers on this computer).
	Client ClientOptions
	// Clock is the time; nil means SystemClock.
	Clock Clock
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
}

// Uploader registers the installation, sends the queue's batches and
// carries deletion requests to the server. Serve does the work; the other
// methods are safe to call from any goroutine.
type Uploader struct {
	opts  Options
	log   *slog.Logger
	clock Clock

	nudge   chan struct{} // one slot: the queue grew
	wake    chan struct{} // one slot: consent or the installation changed
	sendNow chan sendRequest

	regMu sync.Mutex // serialises registrations

	mu sync.Mutex // protects the fields below
	st state
	// dirty is set when st differs from the file (a write failed, or
	// counters changed); Serve saves it again.
	dirty bool
	// gen is bumped by Leave: work begun under an older generation is
	// abandoned, never finished.
	gen uint64
	// session is cancelled by Leave and when consent is withdrawn, which
	// aborts requests in flight.
	session       context.Context
	cancelSession context.CancelFunc
	clients       map[clientKey]*Client
	// Upload schedule: the next periodic upload, and the earliest retry
	// after a failure (failures in a row), or after a Retry-After
	// (serverWait, which Send now honours too).
	nextUpload time.Time
	retryAt    time.Time
	failures   int
	serverWait time.Time
	// Deletion schedule.
	delRetryAt  time.Time
	delFailures int
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

// New returns an uploader over the state in opts.StatePath. A damaged
// state file is moved aside (see state).
func New(opts Options) (*Uploader, error) {
	if opts.Queue == nil || opts.StatePath == "" || opts.Server == nil || opts.Allowed == nil || opts.StatementVersion == nil {
		return nil, errors.New("create uploader: Queue, StatePath, Server, Allowed and StatementVersion are required")
	}
	if opts.Clock == nil {
		opts.Clock = SystemClock{}
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
	if opts.Client.Now == nil {
		opts.Client.Now = opts.Clock.Now
	}
	now := opts.Clock.Now()
	st, problems, err := loadState(opts.StatePath, now)
	if err != nil {
		return nil, fmt.Errorf("create uploader: %w", err)
	}
	for _, p := range problems {
		opts.Logger.Error("upload state repaired", "problem", p)
	}
	u := &Uploader{
		opts:    opts,
		log:     opts.Logger,
		clock:   opts.Clock,
		nudge:   make(chan struct{}, 1),
		wake:    make(chan struct{}, 1),
		sendNow: make(chan sendRequest),
		st:      st,
		dirty:   len(problems) > 0,
		clients: map[clientKey]*Client{},
	}
	u.session, u.cancelSession = context.WithCancel(context.Background())
	u.nextUpload = now
	if st.LastUpload != nil {
		u.nextUpload = later(now, st.LastUpload.Add(opts.Interval))
	}
	return u, nil
}

// Nudge tells the uploader that the queue grew; with NudgeThreshold
// records pending it sends without waiting for the interval. It never
// blocks.
func (u *Uploader) Nudge() {
	select {
	case u.nudge <- struct{}{}:
	default:
	}
}

// Wake tells the uploader that consent changed. When the person no longer
// participates, requests in flight are aborted. It never blocks.
func (u *Uploader) Wake() {
	if !u.opts.Allowed() {
		u.mu.Lock()
		u.resetSessionLocked()
		u.mu.Unlock()
	}
	u.signal()
}

func (u *Uploader) signal() {
	select {
	case u.wake <- struct{}{}:
	default:
	}
}

func (u *Uploader) changed() {
	if u.opts.OnChange != nil {
		u.opts.OnChange()
	}
}

// resetSessionLocked aborts every request in flight.
func (u *Uploader) resetSessionLocked() {
	u.cancelSession()
	u.session, u.cancelSession = context.WithCancel(context.Background())
}

// Leave is called when the person stops participating. It durably queues
// a deletion request for the current installation (the state file is
// written before Leave returns), forgets the installation so that the
// next participation registers a new one, and aborts any request in
// flight: a batch taken before Leave is never sent or acknowledged
// afterwards. The agent purges the queue itself. Serve then retries the
// deletion, across restarts and outages, until the server confirms it.
func (u *Uploader) Leave() error {
	u.mu.Lock()
	u.gen++
	u.resetSessionLocked()
	if in := u.st.Installation; in != nil {
		u.queueDeletionLocked(*in)
		u.st.Installation = nil
	}
	u.failures, u.retryAt, u.serverWait = 0, time.Time{}, time.Time{}
	u.delFailures, u.delRetryAt = 0, time.Time{}
	u.lastErr = ""
	err := u.saveLocked()
	u.mu.Unlock()
	u.log.Info("left the Security Network: installation forgotten, deletion queued")
	u.signal()
	u.changed()
	return err
}

func (u *Uploader) queueDeletionLocked(c Credentials) {
	u.st.Deletions = append(u.st.Deletions, Deletion{Credentials: c, Requested: u.clock.Now().UTC()})
	if n := len(u.st.Deletions) - maxDeletions; n > 0 {
		u.log.Error("too many deletion requests waiting: giving up the oldest", "count", n)
		u.st.Deletions = append([]Deletion(nil), u.st.Deletions[n:]...)
	}
}

// saveLocked writes the state file; on failure the state stays dirty and
// Serve tries again.
func (u *Uploader) saveLocked() error {
	if err := u.st.save(u.opts.StatePath); err != nil {
		u.dirty = true
		u.log.Error("cannot save upload state", "err", err)
		return err
	}
	u.dirty = false
	return nil
}

// Status returns what the local API shows of the upload.
func (u *Uploader) Status() api.UploadInfo {
	server := u.opts.Server()
	u.mu.Lock()
	defer u.mu.Unlock()
	info := api.UploadInfo{
		Server:          server,
		Registered:      u.st.Installation != nil,
		LastError:       u.lastErr,
		RecordsSent:     u.st.RecordsSent,
		BatchesDropped:  u.st.BatchesDropped,
		RecordsRefused:  u.st.RecordsRefused,
		DeletionPending: len(u.st.Deletions) > 0,
	}
	if u.st.LastUpload != nil {
		t := *u.st.LastUpload
		info.LastUpload = &t
	}
	if !u.nextAttempt.IsZero() {
		t := u.nextAttempt.UTC()
		info.NextAttempt = &t
	}
	if err := u.endpointProblem(server); err != nil {
		info.Problem = err.Error()
		info.ProblemHint = NoServerHint
		var ee *EndpointError
		if errors.As(err, &ee) {
			info.ProblemHint = ee.Hint
		} else if !errors.Is(err, ErrNoServer) {
			info.ProblemHint = "correct the server's URL in /etc/cloudprotect/policy.json"
		}
	}
	return info
}

// endpointProblem says why nothing can be sent to server, or nil.
func (u *Uploader) endpointProblem(server string) error {
	if strings.TrimSpace(server) == "" {
		return ErrNoServer
	}
	_, _, err := ParseServerURL(server, u.opts.Client.System)
	return err
}

// NewBatch is the batch the uploader sends for records taken from the
// queue: the local API's preview uses it too, so that what is shown is
// what is sent.
func NewBatch(id string, recs []wire.Record, statementVersion int) wire.Batch {
	if recs == nil {
		recs = []wire.Record{}
	}
	return wire.Batch{BatchID: id, StatementVersion: statementVersion, Records: recs}
}

// Serve sends batches and deletion requests until ctx is cancelled, and
// returns ctx.Err().
func (u *Uploader) Serve(ctx context.Context) error {
	for {
		u.saveIfDirty()
		u.deleteDue(ctx, false)
		if u.uploadDue() {
			u.drain(ctx)
		}
		wait, ok := u.schedule()
		var tc <-chan time.Time
		var t Timer
		if ok {
			t = u.clock.NewTimer(wait)
			tc = t.C()
		}
		var nudged bool
		var req sendRequest
		select {
		case <-ctx.Done():
		case <-tc:
		case <-u.wake:
		case <-u.nudge:
			nudged = true
		case req = <-u.sendNow:
		}
		if t != nil {
			t.Stop()
		}
		if nudged && u.opts.Queue.Pending() >= u.opts.NudgeThreshold {
			u.mu.Lock()
			u.nextUpload = u.clock.Now()
			u.mu.Unlock()
		}
		if req.reply != nil {
			res, err := u.sendAtOnce(ctx, req.force)
			req.reply <- sendReply{res, err}
		}
		if ctx.Err() != nil {
			u.mu.Lock()
			u.resetSessionLocked()
			u.mu.Unlock()
			u.saveIfDirty()
			u.closeIdle()
			return ctx.Err()
		}
	}
}

func (u *Uploader) closeIdle() {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, c := range u.clients {
		c.CloseIdleConnections()
	}
}

func (u *Uploader) saveIfDirty() {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.dirty {
		u.saveLocked()
	}
}

// uploadDue reports whether a periodic upload or a retry is due.
func (u *Uploader) uploadDue() bool {
	if !u.opts.Allowed() || u.endpointProblem(u.opts.Server()) != nil {
		return false
	}
	now := u.clock.Now()
	u.mu.Lock()
	defer u.mu.Unlock()
	return !now.Before(later(u.nextUpload, u.retryAt, u.serverWait))
}

// schedule returns how long to sleep until the next due work, and false
// when nothing is due until something wakes the uploader. It also sets
// what Status shows as the next attempt.
func (u *Uploader) schedule() (time.Duration, bool) {
	allowed := u.opts.Allowed() && u.endpointProblem(u.opts.Server()) == nil
	now := u.clock.Now()
	u.mu.Lock()
	var next time.Time
	if allowed {
		next = later(u.nextUpload, u.retryAt, u.serverWait)
	}
	if len(u.st.Deletions) > 0 && (next.IsZero() || u.delRetryAt.Before(next)) {
		next = later(now, u.delRetryAt)
	}
	old := u.nextAttempt
	u.nextAttempt = next
	u.mu.Unlock()
	if !next.Equal(old) {
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
		defer u.deleteDue(ctx, true)
		return api.UploadResult{Pending: u.opts.Queue.Pending()}, ErrNotParticipating
	}
	now := u.clock.Now()
	u.mu.Lock()
	wait, retry := u.serverWait, u.retryAt
	u.mu.Unlock()
	if !force && now.Before(retry) {
		// Deletion requests wait for their own retry too.
		return api.UploadResult{Pending: u.opts.Queue.Pending()}, &BackoffError{Until: retry}
	}
	defer u.deleteDue(ctx, true)
	if err := u.endpointProblem(u.opts.Server()); err != nil {
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
		u.saveIfDirty()
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
	if errors.Is(err, errLeft) || errors.Is(err, ErrNotParticipating) || errors.Is(err, context.Canceled) {
		// Nothing went wrong with the server: the person left or paused
		// (which aborted the request). Try again at the next interval.
		u.nextUpload = now.Add(u.opts.Interval)
		return
	}
	u.lastErr = err.Error()
	var se *StatusError
	if errors.As(err, &se) && (se.Code == http.StatusTooManyRequests || se.Code == http.StatusServiceUnavailable) && se.RetryAfter > 0 {
		d := min(max(se.RetryAfter, minRetryAfter), u.opts.MaxRetryAfter)
		u.serverWait = now.Add(d)
		u.log.Warn("upload deferred by the server", "err", err, "retry_in", d)
		return
	}
	u.failures++
	d := backoff(u.failures, u.opts.MinBackoff, u.opts.MaxBackoff, u.opts.Jitter)
	u.retryAt = now.Add(d)
	u.log.Warn("upload failed", "err", err, "failures", u.failures, "retry_in", d)
}

// backoff returns the wait after n failures in a row: lo·2^(n-1) capped
// at hi, with jitter taking it down by up to a half.
func backoff(n int, lo, hi time.Duration, jitter func() float64) time.Duration {
	d := lo
	for i := 1; i < n && d < hi; i++ {
		d *= 2
	}
	d = min(d, hi)
	return d/2 + time.Duration(jitter()*float64(d/2))
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
func refusedRecords(se *StatusError) bool {
	return se.Code == http.StatusRequestEntityTooLarge ||
		(se.Code == http.StatusUnprocessableEntity && strings.Contains(se.Message, "records["))
}

// sendOne sends one batch. A batch the server refuses because of its
// records is split: given back, and half as many records are cut, down to
// the single record at fault, which alone is dropped and counted. Nothing
// else is dropped.
func (u *Uploader) sendOne(ctx context.Context) (outcome, error) {
	gen := u.generation()
	if !u.opts.Allowed() {
		return outcome{}, ErrNotParticipating
	}
	id, recs, gz, err := u.takeBatch()
	if err != nil || len(recs) == 0 {
		return outcome{empty: len(recs) == 0}, err
	}
	// Registration waits until there is something to send: the batch
	// taken stays in flight with its ID if registering fails.
	creds, err := u.ensureRegistered(ctx, gen)
	if err != nil {
		return outcome{}, err
	}
	for attempt := 0; ; attempt++ {
		var c *Client
		if c, err = u.client(creds.Server); err != nil {
			return outcome{}, err
		}
		var rctx context.Context
		var done context.CancelFunc
		if rctx, done, err = u.begin(ctx, gen, true); err != nil {
			return outcome{}, err
		}
		_, err = c.PostBatch(rctx, creds.Token, id, gz)
		done()
		if u.afterPost != nil {
			u.afterPost()
		}
		if u.generation() != gen {
			// Left while the batch was in flight: the queue was purged;
			// the batch is neither acknowledged nor sent again.
			return outcome{}, errLeft
		}
		var se *StatusError
		if attempt == 0 && errors.As(err, &se) && se.Code == http.StatusUnauthorized {
			u.log.Warn("the server no longer knows this installation: registering again")
			u.forget(creds)
			if creds, err = u.ensureRegistered(ctx, gen); err != nil {
				return outcome{}, err
			}
			continue
		}
		break
	}
	var se *StatusError
	switch {
	case err == nil:
		if merr := u.opts.Queue.MarkSent(id); merr != nil {
			u.log.Warn("cannot mark batch sent", "batch", id, "err", merr)
		}
		now := u.clock.Now().UTC()
		u.mu.Lock()
		u.st.RecordsSent += uint64(len(recs))
		u.st.LastUpload = &now
		u.dirty = true
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
		u.mu.Lock()
		u.st.BatchesDropped++
		u.st.RecordsRefused++
		u.dirty = true
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
			u.mu.Lock()
			u.st.BatchesDropped++
			u.st.RecordsRefused++
			u.dirty = true
			u.mu.Unlock()
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

func (u *Uploader) generation() uint64 {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.gen
}

// begin returns the context for one request of generation gen: it is
// cancelled by Leave and by a withdrawn consent. With consent set, the
// person must participate.
func (u *Uploader) begin(ctx context.Context, gen uint64, consent bool) (context.Context, context.CancelFunc, error) {
	if consent && (!u.opts.Allowed() || u.opts.StatementVersion() < 1) {
		return nil, nil, ErrNotParticipating
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.gen != gen {
		return nil, nil, errLeft
	}
	rctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(u.session, cancel)
	return rctx, func() { stop(); cancel() }, nil
}

// clientKey names a client: the server and the certificate authorities
// it is verified against (the CA file's path and version).
type clientKey struct {
	server string
	ca     string
	caSize int64
	caTime int64
}

// client returns the client for server, made once for each version of
// the policy's CA file.
func (u *Uploader) client(server string) (*Client, error) {
	key := clientKey{server: server}
	if u.opts.CAFile != nil {
		key.ca = u.opts.CAFile()
	}
	if key.ca != "" {
		fi, err := os.Stat(key.ca)
		if err != nil {
			return nil, fmt.Errorf("read ca_file: %w", err)
		}
		key.caSize, key.caTime = fi.Size(), fi.ModTime().UnixNano()
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if c, ok := u.clients[key]; ok {
		return c, nil
	}
	opts := u.opts.Client
	if key.ca != "" {
		pool, err := loadCAFile(key.ca)
		if err != nil {
			return nil, err
		}
		if opts.TLS != nil {
			opts.TLS = opts.TLS.Clone()
		} else {
			opts.TLS = &tls.Config{}
		}
		opts.TLS.RootCAs = pool
	}
	c, err := NewClient(server, opts)
	if err != nil {
		return nil, err
	}
	for k, old := range u.clients {
		if k.server == key.server {
			old.CloseIdleConnections()
			delete(u.clients, k)
		}
	}
	u.clients[key] = c
	return c, nil
}

// ensureRegistered returns the installation's credentials on the current
// server, registering first if there are none. An installation on another
// server is queued for deletion and replaced.
func (u *Uploader) ensureRegistered(ctx context.Context, gen uint64) (Credentials, error) {
	u.regMu.Lock()
	defer u.regMu.Unlock()
	server := u.opts.Server()
	if err := u.endpointProblem(server); err != nil {
		return Credentials{}, err
	}
	u.mu.Lock()
	if u.gen != gen {
		u.mu.Unlock()
		return Credentials{}, errLeft
	}
	if in := u.st.Installation; in != nil {
		if in.Server == server {
			c := *in
			u.mu.Unlock()
			return c, nil
		}
		u.log.Info("the Security Network's server changed: the old installation is queued for deletion", "old", in.Server, "new", server)
		u.queueDeletionLocked(*in)
		u.st.Installation = nil
		u.saveLocked()
	}
	u.mu.Unlock()

	c, err := u.client(server)
	if err != nil {
		return Credentials{}, err
	}
	req := wire.RegisterRequest{AgentVersion: u.opts.AgentVersion, StatementVersion: u.opts.StatementVersion()}
	if u.opts.EnrollSecret != nil {
		if req.EnrollSecret, err = u.opts.EnrollSecret(); err != nil {
			return Credentials{}, fmt.Errorf("register: %w", err)
		}
	}
	rctx, done, err := u.begin(ctx, gen, true)
	if err != nil {
		return Credentials{}, err
	}
	reg, err := c.Register(rctx, req)
	done()
	if err != nil {
		return Credentials{}, err
	}
	creds := Credentials{InstallationID: reg.InstallationID, Token: reg.Token, Server: server}
	u.mu.Lock()
	if u.gen != gen {
		// Left while registering: the new installation holds nothing, but
		// it is deleted all the same.
		u.queueDeletionLocked(creds)
		u.saveLocked()
		u.mu.Unlock()
		u.signal()
		return Credentials{}, errLeft
	}
	u.st.Installation = &creds
	u.saveLocked()
	u.mu.Unlock()
	u.log.Info("registered with the Security Network", "server", server)
	u.changed()
	return creds, nil
}

// forget drops creds if they are still the current installation: the
// server no longer knows them, so there is nothing to delete.
func (u *Uploader) forget(creds Credentials) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if in := u.st.Installation; in != nil && *in == creds {
		u.st.Installation = nil
		u.saveLocked()
	}
}

// deleteDue sends the deletion requests whose retry time has come (all of
// them with force), removing each one the server confirms.
func (u *Uploader) deleteDue(ctx context.Context, force bool) {
	now := u.clock.Now()
	u.mu.Lock()
	dels := append([]Deletion(nil), u.st.Deletions...)
	due := force || !now.Before(u.delRetryAt)
	u.mu.Unlock()
	if len(dels) == 0 || !due {
		return
	}
	for _, d := range dels {
		err := u.deleteOne(ctx, d)
		if ctx.Err() != nil {
			return
		}
		u.mu.Lock()
		if err != nil {
			u.delFailures++
			wait := backoff(u.delFailures, u.opts.MinBackoff, u.opts.MaxBackoff, u.opts.Jitter)
			if se := (*StatusError)(nil); errors.As(err, &se) && se.RetryAfter > 0 {
				wait = min(max(se.RetryAfter, minRetryAfter), u.opts.MaxRetryAfter)
			}
			u.delRetryAt = u.clock.Now().Add(wait)
			u.lastErr = err.Error()
			u.mu.Unlock()
			u.log.Warn("deletion request failed: will retry", "err", err, "retry_in", wait)
			u.changed()
			return
		}
		for i, x := range u.st.Deletions {
			if x.InstallationID == d.InstallationID {
				u.st.Deletions = append(u.st.Deletions[:i:i], u.st.Deletions[i+1:]...)
				break
			}
		}
		u.delFailures, u.delRetryAt = 0, time.Time{}
		u.saveLocked()
		u.mu.Unlock()
		u.log.Info("the server confirmed the deletion of an installation", "requested", d.Requested)
		u.changed()
	}
}

func (u *Uploader) deleteOne(ctx context.Context, d Deletion) error {
	c, err := u.client(d.Server)
	if err != nil {
		return err
	}
	return c.DeleteInstallation(ctx, d.InstallationID, d.Token)
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
		return api.UploadResult{}, ErrNotParticipating
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

// Lookup asks the server for the reputation of hashes with this
// installation's credentials, registering first if needed. It is what
// the reputation checker uses; like every request carrying hashes it is
// refused while the person does not participate, and aborted by Leave.
func (u *Uploader) Lookup(ctx context.Context, hashes []string) ([]wire.Reputation, error) {
	gen := u.generation()
	for attempt := 0; ; attempt++ {
		creds, err := u.ensureRegistered(ctx, gen)
		if err != nil {
			return nil, err
		}
		c, err := u.client(creds.Server)
		if err != nil {
			return nil, err
		}
		rctx, done, err := u.begin(ctx, gen, true)
		if err != nil {
			return nil, err
		}
		reps, err := c.Lookup(rctx, creds.Token, hashes)
		done()
		var se *StatusError
		if attempt == 0 && errors.As(err, &se) && se.Code == http.StatusUnauthorized {
			u.forget(creds)
			continue
		}
		return reps, err
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
