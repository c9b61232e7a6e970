// Package cloud is the agent's installation on the Security Network: the
// rules for the servers it may use (ParseServerURL), a hardened HTTP
// client for the cloud's API (Client), and the Installation, which
// registers with the server and keeps the credentials, leaves, and
// carries deletion requests to the server until it confirms them. The
// uploader sends statistics and the reputation checker looks hashes up
// through one Installation. Nothing that carries statistics or hashes
// leaves the machine unless the person participates.
package cloud

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
	"github.com/cloudprotect/cloudprotect/agent/internal/idle"
	"github.com/cloudprotect/cloudprotect/wire"
)

// Defaults of Options.
const (
	DefaultMinBackoff    = 30 * time.Second
	DefaultMaxBackoff    = 30 * time.Minute
	DefaultMaxRetryAfter = time.Hour
	// MinRetryAfter is the shortest wait a Retry-After can ask for: a
	// server answering "Retry-After: 0" to every request must not turn
	// the agent into a busy loop.
	MinRetryAfter = 5 * time.Second
)

// StateFile is the name of the installation's state file in the agent's
// state folder.
const StateFile = "upload.json"

// ErrNotParticipating is returned for every request that would carry
// statistics or hashes while the person does not participate: nothing is
// sent.
var ErrNotParticipating = errors.New("not participating in the Security Network: nothing is sent")

// ErrLeft ends work begun before Leave: it must not be finished.
var ErrLeft = errors.New("the installation was left while the request was prepared")

// Generation names the installation at one moment; Leave moves it on.
// Work begun under one generation is abandoned, never finished, under
// another: a batch taken from the queue before the person left belongs to
// the installation they left.
type Generation uint64

// Options configure an Installation. StatePath, Server, Allowed and
// StatementVersion are required.
type Options struct {
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
	// StatementVersion returns the statement version the person
	// accepted, sent when registering.
	StatementVersion func() int
	// AgentVersion is sent when registering.
	AgentVersion string
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
	// MinBackoff and MaxBackoff bound the exponential backoff of deletion
	// requests after failures (default 30 s and 30 min); MaxRetryAfter
	// caps how long a server's Retry-After holds them (default 1 h).
	MinBackoff, MaxBackoff time.Duration
	MaxRetryAfter          time.Duration
	// Jitter returns a number in [0, 1); nil means math/rand/v2.
	Jitter func() float64
	// OnChange is called, without locks held, when what Status shows
	// changed. It must not block.
	OnChange func()
	// Idle, when set, follows whether Serve is asleep with nothing
	// pending (for tests that drive a fake clock).
	Idle *idle.Loop
}

// Installation is this agent's installation on the Security Network: its
// credentials on the configured server (registered when first needed),
// the durable deletion requests of the installations left behind, and the
// uploader's counters, all in the state file (see state). Requests made
// through it (PostBatch, Lookup) carry its token and are refused while
// the person does not participate; Leave aborts those in flight. Serve
// retries the deletion requests; the other methods are safe to call from
// any goroutine.
type Installation struct {
	opts  Options
	log   *slog.Logger
	clock Clock
	idle  *idle.Loop
	wake  chan struct{} // one slot: consent or the installation changed, or the file must be written

	regMu sync.Mutex // serialises registrations
	delMu sync.Mutex // serialises rounds of deletion requests

	mu sync.Mutex // protects the fields below
	st state
	// dirty is set when st differs from the file (a write failed, or the
	// counters changed); Serve writes it.
	dirty bool
	// saveFailures counts failed writes in a row; Serve tries again
	// after a backoff (saveRetryAt).
	saveFailures int
	saveRetryAt  time.Time
	gen          Generation
	// session is cancelled by Leave and when consent is withdrawn, which
	// aborts requests in flight.
	session       context.Context
	cancelSession context.CancelFunc
	clients       map[clientKey]*Client
	// Deletion schedule: the earliest retry after failures in a row, and
	// what Status shows.
	delRetryAt  time.Time
	delFailures int
	nextAttempt time.Time
	// lastErr is the error of the last deletion request, until one is
	// confirmed or the person leaves.
	lastErr string

	// beforeRequest is a test hook: it runs when a request that carries
	// statistics or hashes is about to be made, before its checks.
	beforeRequest func()
}

// Open returns the installation kept in opts.StatePath. A damaged state
// file is moved aside (see state).
func Open(opts Options) (*Installation, error) {
	if opts.StatePath == "" || opts.Server == nil || opts.Allowed == nil || opts.StatementVersion == nil {
		return nil, errors.New("open installation: StatePath, Server, Allowed and StatementVersion are required")
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
	def(&opts.MinBackoff, DefaultMinBackoff)
	def(&opts.MaxBackoff, DefaultMaxBackoff)
	def(&opts.MaxRetryAfter, DefaultMaxRetryAfter)
	if opts.Jitter == nil {
		opts.Jitter = rand.Float64
	}
	if opts.Client.Now == nil {
		opts.Client.Now = opts.Clock.Now
	}
	st, problems, err := loadState(opts.StatePath, opts.Clock.Now())
	if err != nil {
		return nil, fmt.Errorf("open installation: %w", err)
	}
	for _, p := range problems {
		opts.Logger.Error("upload state repaired", "problem", p)
	}
	in := &Installation{
		opts:    opts,
		log:     opts.Logger,
		clock:   opts.Clock,
		idle:    opts.Idle,
		wake:    make(chan struct{}, 1),
		st:      st,
		dirty:   len(problems) > 0,
		clients: map[clientKey]*Client{},
	}
	in.session, in.cancelSession = context.WithCancel(context.Background())
	return in, nil
}

// Wake tells the installation that consent changed. When the person no
// longer participates, requests in flight are aborted. It never blocks.
func (in *Installation) Wake() {
	if !in.opts.Allowed() {
		in.mu.Lock()
		in.resetSessionLocked()
		in.mu.Unlock()
	}
	in.signal()
}

func (in *Installation) signal() { in.idle.Notify(in.wake) }

func (in *Installation) changed() {
	if in.opts.OnChange != nil {
		in.opts.OnChange()
	}
}

// resetSessionLocked aborts every request in flight.
func (in *Installation) resetSessionLocked() {
	in.cancelSession()
	in.session, in.cancelSession = context.WithCancel(context.Background())
}

// Generation returns the installation's generation now.
func (in *Installation) Generation() Generation {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.gen
}

// Leave is called when the person stops participating. It durably queues
// a deletion request for the current installation (the state file is
// written before Leave returns), forgets the installation so that the
// next participation registers a new one, moves the generation on, and
// aborts any request in flight: a batch taken before Leave is never sent
// or acknowledged afterwards. The agent purges the queue itself. Serve
// then retries the deletion, across restarts and outages, until the
// server confirms it.
func (in *Installation) Leave() error {
	in.mu.Lock()
	in.gen++
	in.resetSessionLocked()
	if c := in.st.Installation; c != nil {
		in.queueDeletionLocked(*c)
		in.st.Installation = nil
	}
	in.delFailures, in.delRetryAt = 0, time.Time{}
	in.lastErr = ""
	err := in.saveLocked()
	in.mu.Unlock()
	in.log.Info("left the Security Network: installation forgotten, deletion queued")
	in.signal()
	in.changed()
	return err
}

func (in *Installation) queueDeletionLocked(c Credentials) {
	in.st.Deletions = append(in.st.Deletions, Deletion{Credentials: c, Requested: in.clock.Now().UTC()})
	if n := len(in.st.Deletions) - maxDeletions; n > 0 {
		in.log.Error("too many deletion requests waiting: giving up the oldest", "count", n)
		in.st.Deletions = append([]Deletion(nil), in.st.Deletions[n:]...)
	}
}

// saveLocked writes the state file; on failure the state stays dirty and
// Serve tries again after a backoff.
func (in *Installation) saveLocked() error {
	if err := in.st.save(in.opts.StatePath); err != nil {
		in.dirty = true
		in.saveFailures++
		wait := Backoff(in.saveFailures, in.opts.MinBackoff, in.opts.MaxBackoff, in.opts.Jitter)
		in.saveRetryAt = in.clock.Now().Add(wait)
		in.log.Error("cannot save upload state", "err", err, "retry_in", wait)
		return err
	}
	in.dirty, in.saveFailures, in.saveRetryAt = false, 0, time.Time{}
	return nil
}

// AddTotals adds d's counts to the uploader's counters in the state file
// and, when d has one, keeps its time of the last upload. Serve writes
// the file soon after.
func (in *Installation) AddTotals(d Totals) {
	in.mu.Lock()
	t := &in.st.Totals
	t.RecordsSent += d.RecordsSent
	t.BatchesDropped += d.BatchesDropped
	t.RecordsRefused += d.RecordsRefused
	if d.LastUpload != nil {
		at := d.LastUpload.UTC()
		t.LastUpload = &at
	}
	in.dirty = true
	in.mu.Unlock()
	in.signal()
}

// Problem says why nothing can be sent to the configured server (no
// server: ErrNoServer; one the rules refuse: an *EndpointError), or nil.
func (in *Installation) Problem() error {
	return endpointProblem(in.opts.Server(), in.opts.Client.System)
}

func endpointProblem(server string, system bool) error {
	if strings.TrimSpace(server) == "" {
		return ErrNoServer
	}
	_, _, err := ParseServerURL(server, system)
	return err
}

// ProblemHint says what a person can do about a Problem.
func ProblemHint(err error) string {
	var ee *EndpointError
	switch {
	case errors.Is(err, ErrNoServer):
		return NoServerHint
	case errors.As(err, &ee):
		return ee.Hint
	}
	return "correct the server's URL in /etc/cloudprotect/policy.json"
}

// Status returns what the local API shows of the installation and the
// uploader's counters. LastError and NextAttempt are those of the
// deletion requests.
func (in *Installation) Status() api.UploadInfo {
	server := in.opts.Server()
	problem := endpointProblem(server, in.opts.Client.System)
	in.mu.Lock()
	defer in.mu.Unlock()
	info := api.UploadInfo{
		Server:          server,
		Registered:      in.st.Installation != nil,
		LastError:       in.lastErr,
		RecordsSent:     in.st.RecordsSent,
		BatchesDropped:  in.st.BatchesDropped,
		RecordsRefused:  in.st.RecordsRefused,
		DeletionPending: len(in.st.Deletions) > 0,
	}
	if in.st.LastUpload != nil {
		t := *in.st.LastUpload
		info.LastUpload = &t
	}
	if !in.nextAttempt.IsZero() {
		t := in.nextAttempt.UTC()
		info.NextAttempt = &t
	}
	if problem != nil {
		info.Problem, info.ProblemHint = problem.Error(), ProblemHint(problem)
	}
	return info
}

// Serve writes the state file when it changed and sends the deletion
// requests, retrying with backoff until the server confirms each one,
// until ctx is cancelled; it returns ctx.Err(). It sleeps while there is
// nothing to do.
func (in *Installation) Serve(ctx context.Context) error {
	for {
		in.saveIfDirty()
		in.deleteDue(ctx, false)
		wait, ok := in.schedule()
		var tc <-chan time.Time
		var t Timer
		if ok {
			t = in.clock.NewTimer(wait)
			tc = t.C()
		}
		var took bool
		in.idle.Sleep(len(tc) > 0)
		select {
		case <-ctx.Done():
		case <-tc:
		case <-in.wake:
			took = true
		}
		in.idle.Woke(took)
		if t != nil {
			t.Stop()
		}
		if ctx.Err() != nil {
			in.mu.Lock()
			in.resetSessionLocked()
			in.mu.Unlock()
			in.saveIfDirty()
			in.closeIdle()
			return ctx.Err()
		}
	}
}

func (in *Installation) closeIdle() {
	in.mu.Lock()
	defer in.mu.Unlock()
	for _, c := range in.clients {
		c.CloseIdleConnections()
	}
}

// saveIfDirty writes the state file if it changed, unless the last write
// failed and its retry is not due yet.
func (in *Installation) saveIfDirty() {
	now := in.clock.Now()
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.dirty && !now.Before(in.saveRetryAt) {
		in.saveLocked()
	}
}

// schedule returns how long to sleep until the next deletion request or
// write of the state file is due, and false when nothing is due until
// something wakes the installation. It also sets what Status shows as the
// next attempt.
func (in *Installation) schedule() (time.Duration, bool) {
	now := in.clock.Now()
	in.mu.Lock()
	var next time.Time
	if len(in.st.Deletions) > 0 {
		next = later(now, in.delRetryAt)
	}
	shown := !in.nextAttempt.Equal(next)
	in.nextAttempt = next
	if in.dirty && (next.IsZero() || in.saveRetryAt.Before(next)) {
		next = later(now, in.saveRetryAt)
	}
	in.mu.Unlock()
	if shown {
		in.changed()
	}
	if next.IsZero() {
		return 0, false
	}
	return max(0, next.Sub(now)), true
}

// DeleteNow sends every deletion request at once, whatever the backoff
// of earlier failures, for `cloudprotect send`.
func (in *Installation) DeleteNow(ctx context.Context) { in.deleteDue(ctx, true) }

// deleteDue sends the deletion requests whose retry time has come (all of
// them with force), removing each one the server confirms.
func (in *Installation) deleteDue(ctx context.Context, force bool) {
	in.delMu.Lock()
	defer in.delMu.Unlock()
	now := in.clock.Now()
	in.mu.Lock()
	dels := append([]Deletion(nil), in.st.Deletions...)
	due := force || !now.Before(in.delRetryAt)
	in.mu.Unlock()
	if len(dels) == 0 || !due {
		return
	}
	for _, d := range dels {
		err := in.deleteOne(ctx, d)
		if ctx.Err() != nil {
			return
		}
		in.mu.Lock()
		if err != nil {
			in.delFailures++
			wait := Backoff(in.delFailures, in.opts.MinBackoff, in.opts.MaxBackoff, in.opts.Jitter)
			if se := (*StatusError)(nil); errors.As(err, &se) && se.RetryAfter > 0 {
				wait = min(max(se.RetryAfter, MinRetryAfter), in.opts.MaxRetryAfter)
			}
			in.delRetryAt = in.clock.Now().Add(wait)
			in.lastErr = err.Error()
			in.mu.Unlock()
			in.log.Warn("deletion request failed: will retry", "err", err, "retry_in", wait)
			in.changed()
			return
		}
		for i, x := range in.st.Deletions {
			if x.InstallationID == d.InstallationID {
				in.st.Deletions = append(in.st.Deletions[:i:i], in.st.Deletions[i+1:]...)
				break
			}
		}
		in.delFailures, in.delRetryAt = 0, time.Time{}
		in.lastErr = ""
		in.saveLocked()
		in.mu.Unlock()
		in.log.Info("the server confirmed the deletion of an installation", "requested", d.Requested)
		in.changed()
	}
}

func (in *Installation) deleteOne(ctx context.Context, d Deletion) error {
	c, err := in.client(d.Server)
	if err != nil {
		return err
	}
	return c.DeleteInstallation(ctx, d.InstallationID, d.Token)
}

// begin returns the context for one request of generation gen that
// carries statistics or hashes: it is cancelled by Leave and by a
// withdrawn consent, and the person must participate.
func (in *Installation) begin(ctx context.Context, gen Generation) (context.Context, context.CancelFunc, error) {
	if in.beforeRequest != nil {
		in.beforeRequest()
	}
	if !in.opts.Allowed() || in.opts.StatementVersion() < 1 {
		return nil, nil, ErrNotParticipating
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.gen != gen {
		return nil, nil, ErrLeft
	}
	rctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(in.session, cancel)
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
func (in *Installation) client(server string) (*Client, error) {
	key := clientKey{server: server}
	if in.opts.CAFile != nil {
		key.ca = in.opts.CAFile()
	}
	if key.ca != "" {
		fi, err := os.Stat(key.ca)
		if err != nil {
			return nil, fmt.Errorf("read ca_file: %w", err)
		}
		key.caSize, key.caTime = fi.Size(), fi.ModTime().UnixNano()
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if c, ok := in.clients[key]; ok {
		return c, nil
	}
	opts := in.opts.Client
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
	for k, old := range in.clients {
		if k.server == key.server {
			old.CloseIdleConnections()
			delete(in.clients, k)
		}
	}
	in.clients[key] = c
	return c, nil
}

// ensureRegistered returns the installation's credentials on the current
// server, registering first if there are none. An installation on another
// server is queued for deletion and replaced.
func (in *Installation) ensureRegistered(ctx context.Context, gen Generation) (Credentials, error) {
	in.regMu.Lock()
	defer in.regMu.Unlock()
	server := in.opts.Server()
	if err := endpointProblem(server, in.opts.Client.System); err != nil {
		return Credentials{}, err
	}
	in.mu.Lock()
	if in.gen != gen {
		in.mu.Unlock()
		return Credentials{}, ErrLeft
	}
	if c := in.st.Installation; c != nil {
		if c.Server == server {
			creds := *c
			in.mu.Unlock()
			return creds, nil
		}
		in.log.Info("the Security Network's server changed: the old installation is queued for deletion", "old", c.Server, "new", server)
		in.queueDeletionLocked(*c)
		in.st.Installation = nil
		in.saveLocked()
		in.signal()
	}
	in.mu.Unlock()

	c, err := in.client(server)
	if err != nil {
		return Credentials{}, err
	}
	req := wire.RegisterRequest{AgentVersion: in.opts.AgentVersion, StatementVersion: in.opts.StatementVersion()}
	if in.opts.EnrollSecret != nil {
		if req.EnrollSecret, err = in.opts.EnrollSecret(); err != nil {
			return Credentials{}, fmt.Errorf("register: %w", err)
		}
	}
	rctx, done, err := in.begin(ctx, gen)
	if err != nil {
		return Credentials{}, err
	}
	reg, err := c.Register(rctx, req)
	done()
	if err != nil {
		return Credentials{}, err
	}
	creds := Credentials{InstallationID: reg.InstallationID, Token: reg.Token, Server: server}
	in.mu.Lock()
	if in.gen != gen {
		// Left while registering: the new installation holds nothing, but
		// it is deleted all the same.
		in.queueDeletionLocked(creds)
		in.saveLocked()
		in.mu.Unlock()
		in.signal()
		return Credentials{}, ErrLeft
	}
	in.st.Installation = &creds
	in.saveLocked()
	in.mu.Unlock()
	in.log.Info("registered with the Security Network", "server", server)
	in.changed()
	return creds, nil
}

// forget drops creds if they are still the current installation: the
// server no longer knows them, so there is nothing to delete.
func (in *Installation) forget(creds Credentials) {
	in.mu.Lock()
	defer in.mu.Unlock()
	if c := in.st.Installation; c != nil && *c == creds {
		in.st.Installation = nil
		in.saveLocked()
	}
}

// PostBatch sends a batch (gzip-compressed JSON, see Client.PostBatch)
// for the installation of generation gen, registering first when there
// is none yet; a server that no longer knows the installation gets a new
// one, once. It returns ErrLeft when the person left before the batch
// went out, and ErrNotParticipating while they do not participate. A
// Leave while the batch is in flight aborts it; one after its answer
// arrived is the caller's to notice (Generation).
func (in *Installation) PostBatch(ctx context.Context, gen Generation, batchID string, gz []byte) error {
	creds, err := in.ensureRegistered(ctx, gen)
	if err != nil {
		return err
	}
	for attempt := 0; ; attempt++ {
		c, err := in.client(creds.Server)
		if err != nil {
			return err
		}
		rctx, done, err := in.begin(ctx, gen)
		if err != nil {
			return err
		}
		_, err = c.PostBatch(rctx, creds.Token, batchID, gz)
		done()
		var se *StatusError
		if attempt == 0 && errors.As(err, &se) && se.Code == http.StatusUnauthorized {
			in.log.Warn("the server no longer knows this installation: registering again")
			in.forget(creds)
			if creds, err = in.ensureRegistered(ctx, gen); err != nil {
				return err
			}
			continue
		}
		return err
	}
}

// Lookup asks the server for the reputation of hashes with this
// installation's credentials, registering first if needed. It is what
// the reputation checker uses; like every request carrying hashes it is
// refused while the person does not participate, and aborted by Leave.
func (in *Installation) Lookup(ctx context.Context, hashes []string) ([]wire.Reputation, error) {
	gen := in.Generation()
	for attempt := 0; ; attempt++ {
		creds, err := in.ensureRegistered(ctx, gen)
		if err != nil {
			return nil, err
		}
		c, err := in.client(creds.Server)
		if err != nil {
			return nil, err
		}
		rctx, done, err := in.begin(ctx, gen)
		if err != nil {
			return nil, err
		}
		reps, err := c.Lookup(rctx, creds.Token, hashes)
		done()
		var se *StatusError
		if attempt == 0 && errors.As(err, &se) && se.Code == http.StatusUnauthorized {
			in.forget(creds)
			continue
		}
		return reps, err
	}
}

// Backoff returns the wait after n failures in a row: lo·2^(n-1) capped
// at hi, with jitter taking it down by up to a half.
func Backoff(n int, lo, hi time.Duration, jitter func() float64) time.Duration {
	d := lo
	for i := 1; i < n && d < hi; i++ {
		d *= 2
	}
	d = min(d, hi)
	return d/2 + time.Duration(jitter()*float64(d/2))
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
