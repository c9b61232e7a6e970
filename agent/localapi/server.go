package localapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/alerts"
	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/consent"
)

// maxBody bounds request bodies; the largest legitimate one is a few dozen bytes.
const maxBody = 16 << 10

// Backend is what the local API serves. The agent implements it.
type Backend interface {
	// Status returns the status; the server fills in CanChange per caller.
	Status() api.Status
	// SetParticipation applies a decision made by uid.
	SetParticipation(req api.ParticipationRequest, uid int) (api.Status, error)
	// QueuePreview streams every record waiting to be sent to emit (the
	// batch waiting for the cloud first) and returns the rest of the
	// preview: its batch ID, statement version and totals.
	QueuePreview(ctx context.Context, emit func(api.QueueRecord) error) (api.QueuePreview, error)
	// Upload sends pending statistics now. With force (a privileged
	// caller) it ignores the backoff after failures; without, a retry
	// that is not due yet is an error.
	Upload(ctx context.Context, force bool) (api.UploadResult, error)
	// Events returns the hub status and alert events are published on.
	Events() *Hub
	// Alerts returns the recent alerts user uid may see (all: an
	// administrator), newest first.
	Alerts(uid uint32, all bool) []api.Alert
	// AlertSummary returns how many recent alerts uid may see and the
	// newest of them that reports a blocked program.
	AlertSummary(uid uint32, all bool) (int, *api.Alert)
	// Exceptions lists the local exceptions (programs allowed whatever
	// the Security Network says).
	Exceptions() (api.ExceptionList, error)
	// SetException adds or removes an exception on behalf of uid and
	// returns the list after the change.
	SetException(req api.ExceptionRequest, uid int) (api.ExceptionList, error)
}

// HTTPError is an error a Backend returns to choose the answer's status
// code and hint.
type HTTPError struct {
	Code int
	Msg  string
	Hint string
	// Upload is what a send did before it failed.
	Upload *api.UploadResult
}

func (e *HTTPError) Error() string { return e.Msg }

// Server serves the local API on a unix socket.
type Server struct {
	backend Backend
	// privileged says who may change participation and read what was
	// collected.
	privileged Authorizer
	log        *slog.Logger
	ln         net.Listener
	lim        *limits
	// writeTimeout bounds each write of an answer to its client.
	writeTimeout time.Duration
	// large admits one large answer (the queue's contents) at a time:
	// whatever clients do, one such answer is being built at once.
	large chan struct{}
	// largeWait is how long a large answer waits for its turn.
	largeWait time.Duration
}

// Timeouts of the local API.
const (
	// WriteTimeout bounds each write to a client: a client that asks and
	// does not read is dropped after it.
	WriteTimeout = 10 * time.Second
	// largeWait is how long a request for a large answer waits for the
	// one being written to another client.
	largeWait = 5 * time.Second
)

// ErrAlreadyRunning is returned by Listen when another agent answers on
// the socket.
var ErrAlreadyRunning = errors.New("another agent is already serving this socket")

// Listen opens the socket at path, refusing when another agent answers on
// it and replacing a stale socket file left by one that died. world says
// whether every local user may connect (system mode) or only the owner.
// The socket's folder must be the agent's own, and no one else may be
// able to replace it (see checkSocketDir): a folder another user made
// first in a place everyone can write to (/tmp) is refused.
func Listen(path string, world bool) (net.Listener, error) {
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("listen on %s: %w", path, ErrAlreadyRunning)
	}
	dirMode := os.FileMode(0o700)
	if world {
		dirMode = 0o755
	}
	if err := os.MkdirAll(filepath.Dir(path), dirMode); err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := checkSocketDir(filepath.Dir(path), dirMode); err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("listen on %s: a file that is not a socket is in the way", path)
		}
		os.Remove(path)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	mode := os.FileMode(0o600)
	if world {
		mode = 0o666
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	return ln, nil
}

// NewServer returns a server for backend on ln. privileged decides who
// may change participation and read the queue's contents and every alert;
// a nil logger discards.
func NewServer(ln net.Listener, backend Backend, privileged Authorizer, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{
		backend:      backend,
		privileged:   privileged,
		log:          log,
		ln:           ln,
		lim:          newLimits(MaxConnsPerUser, MaxConns),
		writeTimeout: WriteTimeout,
		large:        make(chan struct{}, 1),
		largeWait:    largeWait,
	}
}

// route is one endpoint: the method it takes and what answers it.
type route struct {
	method string
	handle http.HandlerFunc
}

// Handler returns the API's HTTP handler.
func (s *Server) Handler() http.Handler {
	routes := map[string]route{
		"/v1/status":        {http.MethodGet, s.status},
		"/v1/statement":     {http.MethodGet, s.statement},
		"/v1/participation": {http.MethodPut, s.participation},
		"/v1/queue":         {http.MethodGet, s.queue},
		"/v1/upload":        {http.MethodPost, s.upload},
		"/v1/events":        {http.MethodGet, s.events},
		"/v1/alerts":        {http.MethodGet, s.alerts},
		"/v1/exceptions":    {http.MethodGet + ", " + http.MethodPut, s.exceptions},
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rt, ok := routes[r.URL.Path]
		switch {
		case !ok:
			writeError(w, http.StatusNotFound, fmt.Sprintf("no such endpoint: %s", r.URL.Path),
				"the API has GET /v1/status, /v1/statement, /v1/queue, /v1/events, /v1/alerts, PUT /v1/participation, POST /v1/upload and GET or PUT /v1/exceptions")
		case !takes(rt.method, r.Method):
			w.Header().Set("Allow", rt.method)
			writeError(w, http.StatusMethodNotAllowed, fmt.Sprintf("%s does not take %s", r.URL.Path, r.Method),
				fmt.Sprintf("use %s %s", rt.method, r.URL.Path))
		default:
			rt.handle(w, r)
		}
	})
}

// takes reports whether a route for methods (one, or several separated by
// ", ") takes method; HEAD goes with GET.
func takes(methods, method string) bool {
	for _, m := range strings.Split(methods, ", ") {
		if m == method || (m == http.MethodGet && method == http.MethodHead) {
			return true
		}
	}
	return false
}

// Serve answers requests until ctx is cancelled, then closes the socket,
// ends open event streams and returns ctx.Err().
func (s *Server) Serve(ctx context.Context) error {
	srv := &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		// Small answers must be written within this; large ones and the
		// event stream set a deadline for each write instead.
		WriteTimeout:   s.writeTimeout,
		IdleTimeout:    60 * time.Second,
		MaxHeaderBytes: 16 << 10,
		ConnContext:    connCred,
		BaseContext:    func(net.Listener) context.Context { return ctx },
		ErrorLog:       slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(&limitListener{Listener: s.ln, lim: s.lim}) }()
	select {
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			srv.Close()
		}
		<-errc
		return ctx.Err()
	case err := <-errc:
		return fmt.Errorf("serve local API: %w", err)
	}
}

func (s *Server) caller(r *http.Request) (Cred, bool) { return CredFrom(r.Context()) }

// isPrivileged reports whether the caller may change participation and
// read what was collected.
func (s *Server) isPrivileged(r *http.Request) bool {
	c, ok := s.caller(r)
	return ok && s.privileged(c)
}

// viewer returns who the caller is for what it may see of the alerts: its
// uid, and whether it sees all of them. A caller without credentials
// sees none.
func (s *Server) viewer(r *http.Request) (uid uint32, all bool) {
	c, ok := s.caller(r)
	if !ok {
		return unknownUID, false
	}
	return c.UID, s.privileged(c)
}

// statusFor fills in the parts of the status that depend on the caller:
// whether it may change participation, how many alerts it may see, and
// the last block among them (which program was blocked, and where, is an
// alert's detail).
func (s *Server) statusFor(r *http.Request, st api.Status) api.Status {
	uid, all := s.viewer(r)
	st.CanChange = all
	n, last := s.backend.AlertSummary(uid, all)
	st.Alerts = n
	if !all {
		st.Protection.LastBlock = last
	}
	return st
}

// alerts answers with the recent alerts the caller may see: all of them
// for administrators, those of programs it ran for everyone else.
func (s *Server) alerts(w http.ResponseWriter, r *http.Request) {
	uid, all := s.viewer(r)
	list := s.backend.Alerts(uid, all)
	if list == nil {
		list = []api.Alert{}
	}
	writeJSON(w, http.StatusOK, api.AlertList{Alerts: list})
}

func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.statusFor(r, s.backend.Status()))
}

func (s *Server) statement(w http.ResponseWriter, r *http.Request) {
	// ?lang=de picks a translation; all carry the same version.
	t := consent.StatementIn(r.URL.Query().Get("lang"))
	writeJSON(w, http.StatusOK, api.Statement{
		Version: consent.StatementVersion,
		Lang:    t.Lang,
		Title:   t.Title,
		Summary: t.Summary,
		Text:    t.Text,
	})
}

func (s *Server) participation(w http.ResponseWriter, r *http.Request) {
	c, ok := s.caller(r)
	if !ok {
		writeError(w, http.StatusForbidden, "the caller's identity is unknown", "connect over the agent's unix socket")
		return
	}
	if !s.privileged(c) {
		s.log.Warn("participation change refused", "uid", c.UID, "pid", c.PID)
		writeError(w, http.StatusForbidden,
			fmt.Sprintf("user %d may not change participation on this computer", c.UID),
			"run the command as root (sudo) or as a member of the administrators' group")
		return
	}
	var req api.ParticipationRequest
	if !decodeBody(w, r, &req) {
		return
	}
	st, err := s.backend.SetParticipation(req, int(c.UID))
	if err != nil {
		writeBackendError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, s.statusFor(r, st))
}

// queue answers with the queue's contents: program paths, hashes and
// times of everyone's programs, so only for privileged callers. The
// answer can be large: it is written a record at a time, one such answer
// at once.
func (s *Server) queue(w http.ResponseWriter, r *http.Request) {
	if !s.isPrivileged(r) {
		writeError(w, http.StatusForbidden,
			"the queue's contents (which programs everyone on this computer ran) are shown only to root and the administrators",
			"`cloudprotect status` shows how many records are waiting; run `sudo cloudprotect queue` to see them")
		return
	}
	wait := time.NewTimer(s.largeWait)
	defer wait.Stop()
	select {
	case s.large <- struct{}{}:
		defer func() { <-s.large }()
	case <-wait.C:
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusServiceUnavailable, "the agent is busy showing the queue to another client", "try again in a moment")
		return
	case <-r.Context().Done():
		return
	}
	started, err := streamQueue(r.Context(), w, s.writeTimeout, s.backend)
	switch {
	case err != nil && !started:
		writeBackendError(w, err)
	case err != nil:
		s.log.Debug("queue answer not delivered", "err", err)
	}
}

// exceptions lists (GET) or changes (PUT) the local exceptions; both are
// for root and the administrators only, since the list says which
// programs run on this computer despite the Security Network.
func (s *Server) exceptions(w http.ResponseWriter, r *http.Request) {
	c, ok := s.caller(r)
	if !ok || !s.privileged(c) {
		writeError(w, http.StatusForbidden, "only administrators may see or change the exceptions",
			"run the command as root (sudo) or as a member of the administrators' group")
		return
	}
	var list api.ExceptionList
	var err error
	if r.Method == http.MethodPut {
		var req api.ExceptionRequest
		if !decodeBody(w, r, &req) {
			return
		}
		s.log.Info("exception change", "uid", c.UID, "sha256", req.SHA256, "remove", req.Remove)
		list, err = s.backend.SetException(req, int(c.UID))
	} else {
		list, err = s.backend.Exceptions()
	}
	if err != nil {
		writeBackendError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, list)
}

// upload sends now. A privileged caller's request ignores the backoff
// after failures; anyone else's waits for the retry that is due.
func (s *Server) upload(w http.ResponseWriter, r *http.Request) {
	res, err := s.backend.Upload(r.Context(), s.isPrivileged(r))
	if err != nil {
		writeBackendError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// events streams newline-delimited JSON: the current status first, then
// every status change and alert as it happens. No polling, no timers.
func (s *Server) events(w http.ResponseWriter, r *http.Request) {
	ch, cancel := s.backend.Events().Subscribe()
	defer cancel()
	rc := http.NewResponseController(w)
	// The stream lives as long as the client wants; only writes have a deadline.
	rc.SetReadDeadline(time.Time{})
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	enc := json.NewEncoder(w)
	uid, all := s.viewer(r)
	send := func(ev api.Event) bool {
		if ev.Status != nil {
			st := s.statusFor(r, *ev.Status)
			ev.Status = &st
		}
		if ev.Alert != nil && !alerts.Visible(ev.Users, uid, all) {
			return true // another user's program: not this caller's to see
		}
		// A reader that takes too long for one event is dropped.
		rc.SetWriteDeadline(time.Now().Add(10 * time.Second))
		if err := enc.Encode(ev); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	st := s.backend.Status()
	if !send(api.Event{Type: api.EventStatus, Time: time.Now().UTC(), Status: &st}) {
		return
	}
	for {
		select {
		case <-r.Context().Done():
			return
		case ev, ok := <-ch:
			if !ok || !send(ev) {
				return
			}
		}
	}
}

func decodeBody(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeError(w, http.StatusRequestEntityTooLarge,
				fmt.Sprintf("request body larger than %d bytes", maxBody), "send a small JSON object")
			return false
		}
		writeError(w, http.StatusBadRequest, "malformed request body: "+err.Error(),
			`send JSON such as {"participate": true, "statement_version": 1, "via": "cli"}`)
		return false
	}
	if _, err := dec.Token(); err != io.EOF {
		writeError(w, http.StatusBadRequest, "malformed request body: extra data after the JSON object", "send one JSON object")
		return false
	}
	return true
}

func writeBackendError(w http.ResponseWriter, err error) {
	var he *HTTPError
	var le *consent.LockedError
	var ve *consent.VersionError
	switch {
	case errors.As(err, &he):
		writeJSON(w, he.Code, api.Error{Error: he.Msg, Hint: he.Hint, Upload: he.Upload})
	case errors.As(err, &le):
		writeError(w, http.StatusForbidden, le.Error(),
			"participation is managed by your organisation; ask your administrator to change "+le.Policy)
	case errors.As(err, &ve):
		writeError(w, http.StatusConflict, ve.Error(),
			fmt.Sprintf("read the current statement (cloudprotect statement) and agree to version %d", ve.Current))
	case errors.Is(err, consent.ErrSave):
		writeError(w, http.StatusInternalServerError, err.Error(),
			"the agent could not save the choice; check free space and permissions of its state folder")
	default:
		writeError(w, http.StatusInternalServerError, err.Error(), "see the agent's log (journalctl -u cloudprotectd)")
	}
}

func writeError(w http.ResponseWriter, code int, msg, hint string) {
	writeJSON(w, code, api.Error{Error: msg, Hint: hint})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}
