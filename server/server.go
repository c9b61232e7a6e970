// Package server is the reference Security Network cloud: an HTTP+JSON
// API over a store.Store that registers installations, ingests statistics
// batches, honours deletion requests and answers reputation lookups. The
// messages are those of package wire.
//
// Endpoints and the answers a client must handle:
//
//	POST   /v1/installations            201 wire.Registration; 400, 403 (enrollment
//	                                    secret missing or wrong), 422, 429 (too many
//	                                    registrations from this address: Retry-After)
//	POST   /v1/statistics               200 wire.BatchResult (duplicate: true for a batch
//	                                    already counted); 400, 401, 413, 415, 422,
//	                                    429 (this installation is already sending), 503
//	DELETE /v1/installations/{id}       204 deleted; 404 nothing stored under id (also
//	                                    after an earlier deletion: treat as done);
//	                                    401 id exists but the token is not its own; 403
//	                                    the token is another existing installation's
//	GET    /v1/reputation/sha256/{hash} 200 wire.Reputation; 400, 401
//	POST   /v1/reputation/sha256        200 wire.LookupResponse; 400, 401, 413
//	GET    /healthz                     200, or 503 when the database does not answer
//	GET    /metrics                     Prometheus text format
//	       /console/                    the analysts' web console (package console)
//
// Every /v1/ endpoint but registration needs "Authorization: Bearer
// <token>"; the store keeps only the token's SHA-256. Every error is a
// JSON wire.Error with a hint. A 429 or 503 carries Retry-After. Request
// logs carry the route pattern, status and duration: never a token, a
// hash, an installation ID or the client's address.
//
// A statistics batch is read in full before it takes one of the few
// slots in which batches are decoded and stored, so a client that sends
// slowly holds only its own connection; each installation may have
// MaxBodiesPerInstallation batches arriving at once.
package server

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cloudprotect/cloudprotect/server/internal/limit"
	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/server/verdict"
	"github.com/cloudprotect/cloudprotect/wire"
)

// Config configures a Server.
type Config struct {
	Store store.Store
	Rules verdict.Rules
	// Logger receives request logs; nil discards.
	Logger *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// MaxConcurrentIngest bounds the batches decoded and stored at once
	// (each may take ~10 MiB); a batch that has arrived waits up to
	// IngestWait for a slot, then gets 503 with Retry-After. 0 means 8.
	MaxConcurrentIngest int
	// IngestWait is how long an arrived batch waits for a slot; 0 means
	// 10 s.
	IngestWait time.Duration
	// MaxBodiesPerInstallation bounds the batches one installation may be
	// sending at once (0 means 2), and MaxBodies those of all
	// installations (0 means 256): together they bound the memory held by
	// bodies still arriving.
	MaxBodiesPerInstallation int
	MaxBodies                int
	// EnrollSecret, when not empty, must be sent with every registration.
	EnrollSecret []byte
	// RegisterBurst registrations may come from one address at once, then
	// one every RegisterInterval (IPv6: per /64). 0 means 20 and one a
	// minute; a negative RegisterBurst turns the limit off.
	RegisterBurst    int
	RegisterInterval time.Duration
	// TrustedProxies are the addresses of reverse proxies whose
	// X-Forwarded-For is believed when counting registrations per address.
	TrustedProxies []netip.Prefix
	// Console serves the analysts' console under /console/; nil serves
	// none.
	Console http.Handler
	// Metrics are shared with the console; nil means new ones.
	Metrics *Metrics
}

// Defaults of Config.
const (
	DefaultMaxConcurrentIngest      = 8
	DefaultIngestWait               = 10 * time.Second
	DefaultMaxBodiesPerInstallation = 2
	DefaultMaxBodies                = 256
	DefaultRegisterBurst            = 20
	DefaultRegisterInterval         = time.Minute
)

// Server is the cloud's HTTP handler.
type Server struct {
	store      store.Store
	rules      verdict.Rules
	log        *slog.Logger
	now        func() time.Time
	metrics    *Metrics
	ingest     chan struct{} // one token per batch being decoded or stored
	ingestWait time.Duration
	bodies     chan struct{} // one token per batch body arriving
	perInst    int
	secretHash [sha256.Size]byte // of Config.EnrollSecret, when set
	secret     bool
	register   *limit.Limiter
	proxies    []netip.Prefix
	mux        *http.ServeMux

	mu       sync.Mutex     // protects arriving
	arriving map[string]int // batch bodies arriving, by installation
}

// New returns a Server over cfg.Store.
func New(cfg Config) *Server {
	s := &Server{
		store:    cfg.Store,
		rules:    cfg.Rules,
		log:      cfg.Logger,
		now:      cfg.Now,
		metrics:  cfg.Metrics,
		mux:      http.NewServeMux(),
		proxies:  cfg.TrustedProxies,
		arriving: map[string]int{},
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.metrics == nil {
		s.metrics = NewMetrics()
	}
	orDefault := func(v, def int) int {
		if v <= 0 {
			return def
		}
		return v
	}
	s.ingest = make(chan struct{}, orDefault(cfg.MaxConcurrentIngest, DefaultMaxConcurrentIngest))
	s.bodies = make(chan struct{}, orDefault(cfg.MaxBodies, DefaultMaxBodies))
	s.perInst = orDefault(cfg.MaxBodiesPerInstallation, DefaultMaxBodiesPerInstallation)
	s.ingestWait = cfg.IngestWait
	if s.ingestWait <= 0 {
		s.ingestWait = DefaultIngestWait
	}
	if len(cfg.EnrollSecret) > 0 {
		s.secret, s.secretHash = true, sha256.Sum256(cfg.EnrollSecret)
	}
	if cfg.RegisterBurst >= 0 {
		interval := cfg.RegisterInterval
		if interval <= 0 {
			interval = DefaultRegisterInterval
		}
		s.register = limit.New(orDefault(cfg.RegisterBurst, DefaultRegisterBurst), interval, 100_000)
	}

	s.route("POST", "/v1/installations", s.handleRegister)
	s.route("DELETE", "/v1/installations/{id}", s.handleDelete)
	s.route("POST", "/v1/statistics", s.authed(s.handleStatistics))
	s.route("GET", "/v1/reputation/sha256/{hash}", s.authed(s.handleLookupOne))
	s.route("POST", "/v1/reputation/sha256", s.authed(s.handleLookup))
	s.route("GET", "/healthz", s.handleHealth)
	s.route("GET", "/metrics", s.handleMetrics)
	if cfg.Console != nil {
		s.mux.Handle("/console/", cfg.Console)
		s.mux.Handle("GET /console", http.RedirectHandler("/console/", http.StatusSeeOther))
	}
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, errorf(http.StatusNotFound, "see the API: /v1/installations, /v1/statistics, /v1/reputation/sha256", "no such endpoint"))
	})
	return s
}

// route registers h for method and pattern, and a JSON 405 for the other
// methods on the same path.
func (s *Server) route(method, pattern string, h http.HandlerFunc) {
	s.mux.HandleFunc(method+" "+pattern, h)
	s.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Allow", method)
		writeError(w, errorf(http.StatusMethodNotAllowed, "use "+method, "method %s not allowed here", r.Method))
	})
}

// ServeHTTP serves the API, logging and counting each request and turning
// a panic into a 500.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	rec := &recorder{ResponseWriter: w}
	_, pattern := s.mux.Handler(r)
	done := s.metrics.inFlight(pattern)
	defer done()
	defer func() {
		if v := recover(); v != nil {
			if v == http.ErrAbortHandler {
				panic(v)
			}
			s.metrics.panics.Add(1)
			s.log.Error("handler panicked", "route", r.Pattern, "panic", fmt.Sprint(v))
			if rec.status == 0 {
				writeError(rec, errorf(http.StatusInternalServerError, "try again later; report it if it repeats", "internal error"))
			}
		}
		route := r.Pattern
		if route == "" {
			route = "unmatched"
		}
		status := rec.status
		if status == 0 {
			status = http.StatusOK
		}
		d := time.Since(start)
		s.metrics.observeRequest(route, status, d)
		s.log.LogAttrs(r.Context(), slog.LevelInfo, "request",
			slog.String("route", route), slog.Int("status", status),
			slog.Duration("duration", d), slog.Int64("bytes_in", r.ContentLength), slog.Int("bytes_out", rec.written))
	}()
	s.mux.ServeHTTP(rec, r)
}

// recorder remembers the status and size of an answer.
type recorder struct {
	http.ResponseWriter
	status  int
	written int
}

func (r *recorder) WriteHeader(code int) {
	if r.status == 0 {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	n, err := r.ResponseWriter.Write(b)
	r.written += n
	return n, err
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v) // the client going away is not our error
}

func writeError(w http.ResponseWriter, err error) {
	var ae *apiError
	if !errors.As(err, &ae) {
		ae = errorf(http.StatusInternalServerError, "try again later; report it if it repeats", "internal error")
	}
	if (ae.status == http.StatusServiceUnavailable || ae.status == http.StatusTooManyRequests) && w.Header().Get("Retry-After") == "" {
		w.Header().Set("Retry-After", "60")
	}
	writeJSON(w, ae.status, wire.Error{Error: ae.msg, Hint: ae.hint})
}

// storeError logs a storage failure and answers 503, which clients retry
// after Retry-After.
func (s *Server) storeError(w http.ResponseWriter, r *http.Request, err error) {
	s.log.ErrorContext(r.Context(), "storage failed", "route", r.Pattern, "err", err)
	writeError(w, errorf(http.StatusServiceUnavailable, "try again after Retry-After seconds", "storage unavailable"))
}

func hashToken(token string) []byte {
	h := sha256.Sum256([]byte(token))
	return h[:]
}

// bearer returns the token of an "Authorization: Bearer" header, or "".
func bearer(r *http.Request) string {
	scheme, tok, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	tok = strings.TrimSpace(tok)
	if !ok || !strings.EqualFold(scheme, "Bearer") || tok == "" || len(tok) > 256 {
		return ""
	}
	return tok
}

var errNoToken = errorf(http.StatusUnauthorized, "send Authorization: Bearer <token> with the token from POST /v1/installations",
	"missing or malformed Authorization header")

var errBadToken = errorf(http.StatusUnauthorized, "register again with POST /v1/installations",
	"unknown token: the installation does not exist (any more)")

// authed wraps h so that it runs only for a known token, with the
// installation it belongs to.
func (s *Server) authed(h func(w http.ResponseWriter, r *http.Request, installation string)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		tok := bearer(r)
		if tok == "" {
			writeError(w, errNoToken)
			return
		}
		id, err := s.store.Authenticate(r.Context(), hashToken(tok))
		if errors.Is(err, store.ErrNotFound) {
			writeError(w, errBadToken)
			return
		}
		if err != nil {
			s.storeError(w, r, err)
			return
		}
		h(w, r, id)
	}
}

func (s *Server) handleRegister(w http.ResponseWriter, r *http.Request) {
	// Every attempt counts against its address, before anything else is
	// looked at: guessing the enrollment secret is as slow as registering.
	if ok, wait := s.register.Allow(limit.ClientAddr(r, s.proxies), s.now()); !ok {
		s.metrics.refused(refusedRateLimited)
		w.Header().Set("Retry-After", limit.RetryAfter(wait))
		writeError(w, errorf(http.StatusTooManyRequests, "wait for Retry-After seconds: this address registered too many installations",
			"too many registrations from this address"))
		return
	}
	raw, err := readLimited(r.Body, maxSmallBody, "send a registration of a few bytes")
	if err != nil {
		s.metrics.refused(refusedInvalid)
		writeError(w, err)
		return
	}
	var req wire.RegisterRequest
	if err := decodeStrict(raw, &req); err != nil {
		s.metrics.refused(refusedInvalid)
		writeError(w, err)
		return
	}
	if s.secret {
		given := sha256.Sum256([]byte(req.EnrollSecret))
		if req.EnrollSecret == "" || subtle.ConstantTimeCompare(given[:], s.secretHash[:]) != 1 {
			s.metrics.refused(refusedEnrollSecret)
			writeError(w, errorf(http.StatusForbidden, "this Security Network is private: set enroll_secret_file in the agent's policy to the secret its administrator gave you",
				"enrollment secret missing or wrong"))
			return
		}
	}
	if req.StatementVersion < 1 {
		s.metrics.refused(refusedInvalid)
		writeError(w, errorf(http.StatusUnprocessableEntity, "send the statement version the person accepted", "statement_version: want 1 or more"))
		return
	}
	// Neither the agent version nor the statement version is kept.
	reg := wire.Registration{InstallationID: rand.Text(), Token: "cpt_" + rand.Text()}
	if err := s.store.Register(r.Context(), reg.InstallationID, hashToken(reg.Token), s.now()); err != nil {
		s.storeError(w, r, err)
		return
	}
	s.metrics.registrations.Add(1)
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusCreated, reg)
}

// receiving takes one of the installation's and one of the overall slots
// for a batch body that is arriving; release gives them back.
func (s *Server) receiving(installation string) (release func(), err error) {
	s.mu.Lock()
	if s.arriving[installation] >= s.perInst {
		s.mu.Unlock()
		return nil, errorf(http.StatusTooManyRequests, "send one batch at a time and wait for its answer", "this installation is already sending %d batches", s.perInst)
	}
	s.arriving[installation]++
	s.mu.Unlock()
	giveBack := func() {
		s.mu.Lock()
		if s.arriving[installation]--; s.arriving[installation] <= 0 {
			delete(s.arriving, installation)
		}
		s.mu.Unlock()
	}
	select {
	case s.bodies <- struct{}{}:
	default:
		giveBack()
		return nil, errorf(http.StatusServiceUnavailable, "try again after Retry-After seconds", "too many batches arriving at once")
	}
	s.metrics.arriving.Add(1)
	return func() { s.metrics.arriving.Add(-1); <-s.bodies; giveBack() }, nil
}

func (s *Server) handleStatistics(w http.ResponseWriter, r *http.Request, installation string) {
	fail := func(err error) {
		s.metrics.batchesRejected.Add(1)
		writeError(w, err)
	}
	if enc := strings.TrimSpace(r.Header.Get("Content-Encoding")); !strings.EqualFold(enc, "gzip") {
		fail(errorf(http.StatusUnsupportedMediaType, "compress the JSON batch with gzip and send Content-Encoding: gzip",
			"statistics must be gzip-compressed"))
		return
	}
	key := r.Header.Get("Idempotency-Key")
	if !wire.ValidBatchID(key) {
		fail(errorf(http.StatusBadRequest, "send the batch_id as Idempotency-Key", "missing or malformed Idempotency-Key header"))
		return
	}
	if r.ContentLength > wire.MaxBatchCompressed {
		fail(errorf(http.StatusRequestEntityTooLarge, hintSplit, "body is larger than %d bytes", wire.MaxBatchCompressed))
		return
	}
	release, err := s.receiving(installation)
	if err != nil {
		w.Header().Set("Retry-After", "30")
		writeError(w, err)
		return
	}
	raw, err := readLimited(http.MaxBytesReader(w, r.Body, wire.MaxBatchCompressed), wire.MaxBatchCompressed, hintSplit)
	release()
	if err != nil {
		fail(err)
		return
	}
	// Only a batch that has arrived takes a slot to be decoded and stored.
	wait := time.NewTimer(s.ingestWait)
	select {
	case s.ingest <- struct{}{}:
		wait.Stop()
		defer func() { <-s.ingest }()
	case <-wait.C:
		w.Header().Set("Retry-After", "30")
		writeError(w, errorf(http.StatusServiceUnavailable, "try again after Retry-After seconds", "too many batches at once"))
		return
	case <-r.Context().Done():
		wait.Stop()
		return
	}
	now := s.now()
	batch, err := DecodeBatch(bytes.NewReader(raw), now)
	if err != nil {
		fail(err)
		return
	}
	if batch.BatchID != key {
		fail(errorf(http.StatusBadRequest, "send the batch_id as Idempotency-Key", "Idempotency-Key differs from batch_id"))
		return
	}
	dup, err := s.store.Ingest(r.Context(), installation, batch.BatchID, Aggregate(batch.Records), now)
	if errors.Is(err, store.ErrUnknownInstallation) {
		writeError(w, errBadToken)
		return
	}
	if err != nil {
		s.storeError(w, r, err)
		return
	}
	res := wire.BatchResult{Duplicate: dup}
	if dup {
		s.metrics.batchesDup.Add(1)
	} else {
		res.Accepted = len(batch.Records)
		s.metrics.batchesAccepted.Add(1)
		s.metrics.recordsIngested.Add(uint64(len(batch.Records)))
	}
	writeJSON(w, http.StatusOK, res)
}

// Aggregate turns validated records into what the store keeps, merging
// records of the same file: executions summed, loaded or'ed, first and
// last seen widened.
func Aggregate(records []wire.Record) []store.Stat {
	index := make(map[string]int, len(records))
	out := make([]store.Stat, 0, len(records))
	for _, rec := range records {
		st := store.Stat{
			SHA256:         rec.SHA256,
			Size:           rec.Size,
			Kind:           rec.Kind,
			Path:           rec.Path,
			PackageManaged: rec.PackageManaged,
			Malformed:      rec.ELF != nil && rec.ELF.Malformed != "",
			ExecCount:      int64(rec.ExecCount),
			Loaded:         rec.Loaded,
			FirstSeen:      rec.FirstSeen,
			LastSeen:       rec.LastSeen,
		}
		i, ok := index[rec.SHA256]
		if !ok {
			index[rec.SHA256] = len(out)
			out = append(out, st)
			continue
		}
		p := &out[i]
		p.Size, p.Kind, p.Path, p.PackageManaged = st.Size, st.Kind, st.Path, st.PackageManaged
		p.Malformed = p.Malformed || st.Malformed
		p.ExecCount += st.ExecCount
		p.Loaded = p.Loaded || st.Loaded
		if st.FirstSeen.Before(p.FirstSeen) {
			p.FirstSeen = st.FirstSeen
		}
		if st.LastSeen.After(p.LastSeen) {
			p.LastSeen = st.LastSeen
		}
	}
	return out
}

// validID reports whether id can be an installation ID.
func validID(id string) bool {
	return wire.ValidBatchID(id) && len(id) <= 64
}

// handleDelete removes an installation and everything it contributed.
//
//	204  deleted now
//	404  nothing is stored under this ID: it never existed or was deleted
//	     before; the deletion is complete either way
//	401  no token, or the ID exists and the token is not its own
//	403  the token belongs to another existing installation
func (s *Server) handleDelete(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if !validID(id) {
		writeError(w, errorf(http.StatusBadRequest, "send the installation_id from POST /v1/installations", "malformed installation ID"))
		return
	}
	tok := bearer(r)
	if tok == "" {
		writeError(w, errNoToken)
		return
	}
	owner, err := s.store.Authenticate(r.Context(), hashToken(tok))
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		s.storeError(w, r, err)
		return
	}
	if err == nil && owner == id {
		if _, err := s.store.DeleteInstallation(r.Context(), id); err != nil {
			s.storeError(w, r, err)
			return
		}
		s.metrics.deletions.Add(1)
		w.WriteHeader(http.StatusNoContent)
		return
	}
	exists, err := s.store.InstallationExists(r.Context(), id)
	if err != nil {
		s.storeError(w, r, err)
		return
	}
	switch {
	case !exists:
		writeError(w, errorf(http.StatusNotFound, "nothing is stored under this installation ID: treat the deletion as complete",
			"installation not found"))
	case owner == "":
		writeError(w, errorf(http.StatusUnauthorized, "send the token that was issued with this installation ID",
			"token does not belong to this installation"))
	default:
		writeError(w, errorf(http.StatusForbidden, "an installation can delete only itself", "token belongs to another installation"))
	}
}

func (s *Server) handleLookupOne(w http.ResponseWriter, r *http.Request, _ string) {
	h := r.PathValue("hash")
	if !wire.ValidSHA256(h) {
		writeError(w, errorf(http.StatusBadRequest, "a SHA-256 is 64 lowercase hex digits", "malformed SHA-256 in the path"))
		return
	}
	reps, err := s.lookup(r.Context(), []string{h})
	if err != nil {
		s.storeError(w, r, err)
		return
	}
	w.Header().Set("Cache-Control", "private, max-age="+strconv.Itoa(reps[0].TTLSeconds))
	writeJSON(w, http.StatusOK, reps[0])
}

func (s *Server) handleLookup(w http.ResponseWriter, r *http.Request, _ string) {
	if enc := strings.TrimSpace(r.Header.Get("Content-Encoding")); enc != "" && !strings.EqualFold(enc, "identity") {
		writeError(w, errorf(http.StatusUnsupportedMediaType, "send the lookup as plain JSON without Content-Encoding", "unsupported Content-Encoding"))
		return
	}
	hashes, err := DecodeLookup(http.MaxBytesReader(w, r.Body, MaxLookupBody))
	if err != nil {
		writeError(w, err)
		return
	}
	reps, err := s.lookup(r.Context(), hashes)
	if err != nil {
		s.storeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, wire.LookupResponse{Results: reps})
}

func (s *Server) lookup(ctx context.Context, hashes []string) ([]wire.Reputation, error) {
	now := s.now()
	infos, err := s.store.Lookup(ctx, hashes, s.rules.Trust(now))
	if err != nil {
		return nil, err
	}
	s.metrics.lookupRequests.Add(1)
	s.metrics.hashesLookedUp.Add(uint64(len(hashes)))
	reps := make([]wire.Reputation, len(infos))
	for i, in := range infos {
		reps[i] = s.rules.Decide(in, now)
	}
	return reps, nil
}

func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	if err := s.store.Ping(ctx); err != nil {
		s.storeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

func (s *Server) handleMetrics(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	if err := s.metrics.Write(w); err != nil {
		s.log.DebugContext(r.Context(), "write metrics", "err", err)
	}
}
