package upload_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/cloudprotect/cloudprotect/agent/cloud"
	"github.com/cloudprotect/cloudprotect/agent/internal/idle"
	"github.com/cloudprotect/cloudprotect/agent/upload"
	"github.com/cloudprotect/cloudprotect/agent/upload/uploadtest"
	"github.com/cloudprotect/cloudprotect/wire"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// start is the fake time every test begins at.
var start = time.Date(2026, 3, 2, 9, 0, 0, 0, time.UTC)

// Modes of the scripted server.
const (
	modeOK          = "ok"
	mode500         = "500"
	mode429         = "429"      // Retry-After: 120
	mode503Date     = "503-date" // Retry-After: an HTTP date 300 s ahead
	mode503         = "503"      // no Retry-After
	modeReset       = "reset"    // the connection is closed without an answer
	modeSlow        = "slow"     // no answer within the client's timeouts
	modeGarbage     = "garbage"  // counts the batch, then answers 200 with a broken body
	modeOversized   = "oversized"
	modeWrongType   = "wrong-type"
	modeRedirect    = "redirect" // 307 to another host
	mode422         = "422"
	modeRefuseSome  = "refuse-some"  // 422 naming a record for batches holding a hash in refuse
	modeSmallBodies = "small-bodies" // 413 for bodies over maxBody, as a proxy with a small limit
	modeForgetToken = "forget"       // 401 once: the server lost the installation
)

// scripted is a Security Network server whose answers a test scripts.
// It keeps what a real server would: installations, counted batch IDs
// and exec counts per hash.
type scripted struct {
	t    *testing.T
	clk  *uploadtest.Clock
	srv  *httptest.Server
	mode atomic.Value // string

	mu         sync.Mutex        // protects the fields below
	tokens     map[string]string // token → installation
	regs       int
	posts      []time.Time // fake time of every POST /v1/statistics
	batches    map[string]bool
	counts     map[string]uint64 // sha256 → exec count, each batch counted once
	deletes    []string          // installation IDs deletion was asked for
	deleted    map[string]bool
	lookups    int
	verdicts   map[string]string
	gate       chan struct{} // when set, POSTs wait on it
	requests   int
	badTokens  int
	redirectTo string
	refuse     map[string]bool  // hashes refused in modeRefuseSome
	maxBody    int              // modeSmallBodies
	largest    int              // largest body posted, decoded
	onBatch    func(wire.Batch) // called with every valid batch, s.mu held
}

func newScripted(t *testing.T, clk *uploadtest.Clock) *scripted {
	s := &scripted{t: t, clk: clk, tokens: map[string]string{}, batches: map[string]bool{},
		counts: map[string]uint64{}, deleted: map[string]bool{}, verdicts: map[string]string{}}
	s.mode.Store(modeOK)
	s.srv = httptest.NewServer(s)
	t.Cleanup(s.srv.Close)
	return s
}

func (s *scripted) setMode(m string) { s.mode.Store(m) }

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func (s *scripted) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.requests++
	s.mu.Unlock()
	switch {
	case r.Method == http.MethodPost && r.URL.Path == "/v1/installations":
		s.mu.Lock()
		s.regs++
		id := fmt.Sprintf("inst-%d", s.regs)
		tok := fmt.Sprintf("tok-%d", s.regs)
		s.tokens[tok] = id
		s.mu.Unlock()
		writeJSON(w, http.StatusCreated, wire.Registration{InstallationID: id, Token: tok})
	case r.Method == http.MethodDelete && strings.HasPrefix(r.URL.Path, "/v1/installations/"):
		id := strings.TrimPrefix(r.URL.Path, "/v1/installations/")
		s.mu.Lock()
		s.deletes = append(s.deletes, id)
		mode := s.mode.Load().(string)
		s.mu.Unlock()
		if mode == mode500 {
			writeJSON(w, http.StatusInternalServerError, wire.Error{Error: "down"})
			return
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		tok := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		if s.deleted[id] {
			writeJSON(w, http.StatusNotFound, wire.Error{Error: "installation not found"})
			return
		}
		if s.tokens[tok] != id {
			writeJSON(w, http.StatusUnauthorized, wire.Error{Error: "token does not belong to this installation"})
			return
		}
		delete(s.tokens, tok)
		s.deleted[id] = true
		w.WriteHeader(http.StatusNoContent)
	case r.Method == http.MethodPost && r.URL.Path == "/v1/statistics":
		s.statistics(w, r)
	case r.Method == http.MethodPost && r.URL.Path == "/v1/reputation/sha256":
		var req wire.LookupRequest
		json.NewDecoder(r.Body).Decode(&req)
		s.mu.Lock()
		s.lookups++
		var res wire.LookupResponse
		for _, h := range req.SHA256 {
			v := s.verdicts[h]
			if v == "" {
				v = wire.VerdictUnknown
			}
			res.Results = append(res.Results, wire.Reputation{SHA256: h, Verdict: v, TTLSeconds: 3600})
		}
		s.mu.Unlock()
		writeJSON(w, http.StatusOK, res)
	default:
		writeJSON(w, http.StatusNotFound, wire.Error{Error: "no such endpoint"})
	}
}

func (s *scripted) statistics(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.posts = append(s.posts, s.clk.Now())
	gate := s.gate
	s.mu.Unlock()
	// Read the body first: only then does the server notice a client
	// that hung up, and cancel the request's context.
	body, _ := io.ReadAll(r.Body)
	r.Body = io.NopCloser(bytes.NewReader(body))
	if gate != nil {
		select {
		case <-gate:
		case <-r.Context().Done():
			return
		}
	}
	switch mode := s.mode.Load().(string); mode {
	case mode500:
		writeJSON(w, http.StatusInternalServerError, wire.Error{Error: "internal error"})
		return
	case mode429:
		w.Header().Set("Retry-After", "120")
		writeJSON(w, http.StatusTooManyRequests, wire.Error{Error: "slow down"})
		return
	case mode503Date:
		w.Header().Set("Retry-After", s.clk.Now().Add(300*time.Second).UTC().Format(http.TimeFormat))
		writeJSON(w, http.StatusServiceUnavailable, wire.Error{Error: "storage unavailable"})
		return
	case mode503:
		writeJSON(w, http.StatusServiceUnavailable, wire.Error{Error: "storage unavailable"})
		return
	case modeReset:
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			conn.Close()
		}
		return
	case modeSlow:
		select {
		case <-r.Context().Done():
		case <-time.After(10 * time.Second):
		}
		return
	case modeOversized:
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"accepted": 1, "pad": "`))
		w.Write([]byte(strings.Repeat("x", 2<<20)))
		w.Write([]byte(`"}`))
		return
	case modeWrongType:
		w.Header().Set("Content-Type", "text/html")
		w.Write([]byte(`<html>captive portal</html>`))
		return
	case modeRedirect:
		s.mu.Lock()
		to := s.redirectTo
		s.mu.Unlock()
		http.Redirect(w, r, to, http.StatusTemporaryRedirect)
		return
	case mode422:
		writeJSON(w, http.StatusUnprocessableEntity, wire.Error{Error: "invalid batch: records[0].path: empty"})
		return
	case modeSmallBodies:
		if len(body) > s.maxBody {
			writeJSON(w, http.StatusRequestEntityTooLarge, wire.Error{Error: "request entity too large"})
			return
		}
	}
	tok := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	s.mu.Lock()
	_, known := s.tokens[tok]
	if s.mode.Load().(string) == modeForgetToken {
		s.tokens = map[string]string{}
		s.mode.Store(modeOK)
		known = false
	}
	if !known {
		s.badTokens++
	}
	s.mu.Unlock()
	if !known {
		writeJSON(w, http.StatusUnauthorized, wire.Error{Error: "unknown token"})
		return
	}
	if r.Header.Get("Content-Encoding") != "gzip" {
		writeJSON(w, http.StatusUnsupportedMediaType, wire.Error{Error: "not gzip"})
		return
	}
	zr, err := gzip.NewReader(r.Body)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, wire.Error{Error: "not gzip"})
		return
	}
	plain, err := io.ReadAll(io.LimitReader(zr, wire.MaxBatchDecoded+1))
	if err != nil {
		writeJSON(w, http.StatusBadRequest, wire.Error{Error: "corrupt gzip"})
		return
	}
	if len(plain) > wire.MaxBatchDecoded {
		writeJSON(w, http.StatusRequestEntityTooLarge, wire.Error{Error: "batch decompresses to more than 8 MiB"})
		return
	}
	s.mu.Lock()
	s.largest = max(s.largest, len(plain))
	s.mu.Unlock()
	var b wire.Batch
	if err := json.Unmarshal(plain, &b); err != nil || b.BatchID != r.Header.Get("Idempotency-Key") {
		writeJSON(w, http.StatusBadRequest, wire.Error{Error: "bad batch"})
		return
	}
	if s.mode.Load().(string) == modeRefuseSome {
		s.mu.Lock()
		refuse := s.refuse
		s.mu.Unlock()
		for i, rec := range b.Records {
			if refuse[rec.SHA256] {
				writeJSON(w, http.StatusUnprocessableEntity, wire.Error{
					Error: fmt.Sprintf("invalid batch: records[%d].path: holds a user's home directory", i), Hint: "anonymise it"})
				return
			}
		}
	}
	if err := b.Validate(s.clk.Now()); err != nil {
		writeJSON(w, http.StatusUnprocessableEntity, wire.Error{Error: err.Error()})
		return
	}
	s.mu.Lock()
	if s.onBatch != nil {
		s.onBatch(b)
	}
	dup := s.batches[b.BatchID]
	if !dup {
		s.batches[b.BatchID] = true
		for _, rec := range b.Records {
			s.counts[rec.SHA256] += rec.ExecCount
		}
	}
	s.mu.Unlock()
	if s.mode.Load().(string) == modeGarbage {
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"accepted": 3`))
		return
	}
	res := wire.BatchResult{Duplicate: dup}
	if !dup {
		res.Accepted = len(b.Records)
	}
	writeJSON(w, http.StatusOK, res)
}

func (s *scripted) postCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.posts)
}

func (s *scripted) postTimes() []time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]time.Time(nil), s.posts...)
}

func (s *scripted) registrations() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.regs
}

func (s *scripted) totalRequests() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.requests
}

func (s *scripted) hashCounts() map[string]uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]uint64, len(s.counts))
	for k, v := range s.counts {
		out[k] = v
	}
	return out
}

// harness runs one Installation and one Uploader over a fake clock and
// an in-memory queue.
type harness struct {
	t    *testing.T
	clk  *uploadtest.Clock
	q    *uploadtest.Queue
	inst *cloud.Installation
	up   *upload.Uploader
	// instIdle and upIdle follow the Serve loops of inst and up.
	instIdle, upIdle *idle.Loop
	state            string
	allowed          atomic.Bool
	server           atomic.Value // string
	cancel           context.CancelFunc
	done             chan error
	opts             options
}

// options are what a test may change before the harness opens the
// installation and the uploader.
type options struct {
	upload.Options
	cloud cloud.Options
}

func newHarness(t *testing.T, serverURL string, tweak func(*options)) *harness {
	h := &harness{
		t:     t,
		clk:   uploadtest.NewClock(start),
		q:     uploadtest.NewQueue(0),
		state: filepath.Join(t.TempDir(), cloud.StateFile),
	}
	h.allowed.Store(true)
	h.server.Store(serverURL)
	logger := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	jitter := func() float64 { return 0.99 }
	h.opts.cloud = cloud.Options{
		StatePath:        h.state,
		Server:           func() string { return h.server.Load().(string) },
		Allowed:          h.allowed.Load,
		StatementVersion: func() int { return 1 },
		AgentVersion:     "test",
		Clock:            h.clk,
		Logger:           logger,
		Jitter:           jitter,
		Client: cloud.ClientOptions{
			ResponseHeaderTimeout: 10 * time.Second,
			RequestTimeout:        20 * time.Second,
		},
	}
	h.opts.Options = upload.Options{
		Queue:            h.q,
		Allowed:          h.allowed.Load,
		StatementVersion: func() int { return 1 },
		Clock:            h.clk,
		Logger:           logger,
		Jitter:           jitter,
	}
	if tweak != nil {
		tweak(&h.opts)
	}
	h.open()
	return h
}

// open makes a new Installation and Uploader over the same state file, as
// a restart does.
func (h *harness) open() {
	h.instIdle, h.upIdle = &idle.Loop{}, &idle.Loop{}
	copts := h.opts.cloud
	copts.Idle = h.instIdle
	inst, err := cloud.Open(copts)
	if err != nil {
		h.t.Fatalf("Open: %v", err)
	}
	opts := h.opts.Options
	opts.Installation = inst
	opts.Idle = h.upIdle
	up, err := upload.New(opts)
	if err != nil {
		h.t.Fatalf("New: %v", err)
	}
	h.inst, h.up = inst, up
}

// start runs the installation and the uploader until stop.
func (h *harness) start() {
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	h.done = make(chan error, 2)
	go func() { h.done <- h.inst.Serve(ctx) }()
	go func() { h.done <- h.up.Serve(ctx) }()
	h.t.Cleanup(h.stop)
}

func (h *harness) stop() {
	if h.cancel == nil {
		return
	}
	h.cancel()
	h.cancel = nil
	for range 2 {
		select {
		case err := <-h.done:
			if err != context.Canceled {
				h.t.Errorf("Serve returned %v; want context.Canceled", err)
			}
		case <-time.After(10 * time.Second):
			h.t.Fatal("Serve did not return after cancel")
		}
	}
}

// wake tells the installation and the uploader that consent changed, as
// the agent does.
func (h *harness) wake() {
	h.inst.Wake()
	h.up.Wake()
}

// runFor lets fake time pass: it waits until the installation and the
// uploader are asleep with nothing pending, moves the time to the next
// timer and fires it, waits until they have done what it woke them for,
// and repeats until d has passed. When nothing is scheduled, the time
// moves to the end at once.
func (h *harness) runFor(d time.Duration) {
	h.t.Helper()
	limit := h.clk.Now().Add(d)
	var rounds uint64
	for {
		rounds = h.settle(rounds)
		if _, fired := h.clk.AdvanceToNext(limit); !fired {
			return
		}
		rounds++ // the loop woken has not slept again yet
	}
}

// idle waits until the installation and the uploader are asleep with
// nothing pending, and checks that the uploader sleeps on a timer.
func (h *harness) idle() {
	h.t.Helper()
	h.settle(0)
	if h.clk.Timers() == 0 {
		h.t.Fatal("the uploader went back to sleep with nothing scheduled")
	}
}

// settleLimit bounds, in real time, how long settle waits for the
// installation and the uploader to finish what they were asked: only a
// loop that never sleeps again takes that long.
const settleLimit = 2 * time.Minute

// settle waits until the installation and the uploader are both asleep
// with nothing pending, after going to sleep at least rounds times in
// all, and returns how many times they have.
func (h *harness) settle(rounds uint64) uint64 {
	h.t.Helper()
	deadline := time.Now().Add(settleLimit)
	for {
		a, ra := h.instIdle.Settled()
		b, rb := h.upIdle.Settled()
		if a && b && ra+rb >= rounds {
			return ra + rb
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("the uploader never went back to sleep (installation settled %v, uploader settled %v)", a, b)
		}
		time.Sleep(time.Millisecond)
	}
}

func (h *harness) addRecords(from, n int, execs uint64) {
	for i := from; i < from+n; i++ {
		h.q.Add(uploadtest.Record(i, execs, start.Add(-time.Hour)))
	}
}

func (h *harness) sendNow() (int, error) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := h.up.SendNow(ctx)
	return res.Sent, err
}

// eventually waits until cond holds; only a condition that never comes
// true makes it wait settleLimit and fail.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(settleLimit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func newDiscardLog() *log.Logger { return log.New(io.Discard, "", 0) }
