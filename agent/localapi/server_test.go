package localapi

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/alerts"
	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/testenv"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	if op := os.Getenv(childEnv); op != "" {
		os.Exit(child(op))
	}
	if os.Geteuid() == 0 {
		testenv.PrepareSelfCopy()
	}
	goleak.VerifyTestMain(m, goleak.Cleanup(func(code int) {
		testenv.RemoveSelfCopy()
		os.Exit(code)
	}))
}

// fakeBackend answers with fixed values and records participation calls.
type fakeBackend struct {
	hub        *Hub
	preview    api.QueuePreview
	previewErr error
	alerts     []api.Alert // newest first
	users      [][]uint32  // who may see each of alerts

	mu     sync.Mutex // protects calls and forced
	calls  []api.ParticipationRequest
	forced []bool
}

func newFakeBackend() *fakeBackend { return &fakeBackend{hub: NewHub()} }

func (b *fakeBackend) Status() api.Status {
	return api.Status{Participation: api.Participation{State: "undecided", StatementVersion: 1}}
}

func (b *fakeBackend) SetParticipation(req api.ParticipationRequest, uid int) (api.Status, error) {
	b.mu.Lock()
	b.calls = append(b.calls, req)
	b.mu.Unlock()
	if req.Via == "" {
		return api.Status{}, &HTTPError{Code: http.StatusBadRequest, Msg: "via is missing", Hint: "send via"}
	}
	return b.Status(), nil
}

func (b *fakeBackend) QueuePreview(ctx context.Context, emit func(api.QueueRecord) error) (api.QueuePreview, error) {
	if b.previewErr != nil {
		return api.QueuePreview{}, b.previewErr
	}
	for _, r := range b.preview.Records {
		if err := emit(r); err != nil {
			return api.QueuePreview{}, err
		}
	}
	p := b.preview
	p.Records = nil
	return p, nil
}

func (b *fakeBackend) Upload(_ context.Context, force bool) (api.UploadResult, error) {
	b.mu.Lock()
	b.forced = append(b.forced, force)
	b.mu.Unlock()
	return api.UploadResult{}, errors.New("nothing")
}

func (b *fakeBackend) Events() *Hub { return b.hub }

func (b *fakeBackend) Alerts(uid uint32, all bool) []api.Alert {
	var out []api.Alert
	for i, al := range b.alerts {
		if alerts.Visible(b.users[i], uid, all) {
			out = append(out, al)
		}
	}
	return out
}

func (b *fakeBackend) AlertSummary(uid uint32, all bool) (int, *api.Alert) {
	list := b.Alerts(uid, all)
	for _, al := range list {
		if al.Action == api.AlertActionBlocked {
			return len(list), &al
		}
	}
	return len(list), nil
}

func (b *fakeBackend) Exceptions() (api.ExceptionList, error) {
	return api.ExceptionList{Exceptions: []api.Exception{{SHA256: "ab", Reason: "listed"}}}, nil
}

func (b *fakeBackend) SetException(req api.ExceptionRequest, uid int) (api.ExceptionList, error) {
	return api.ExceptionList{Exceptions: []api.Exception{{SHA256: req.SHA256, Reason: req.Reason, UID: uid}}}, nil
}

func (b *fakeBackend) nCalls() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.calls)
}

// serve runs a server on a fresh socket and returns its path and the
// server; it stops when the test ends.
func serve(t *testing.T, edit func(*Server)) (string, *Server) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "api.sock")
	ln, err := Listen(sock, false)
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(ln, newFakeBackend(), func(Cred) bool { return true }, nil)
	if edit != nil {
		edit(s)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Serve: %v", err)
		}
	})
	return sock, s
}

// closedByPeer reports whether the agent closed c without answering.
func closedByPeer(t *testing.T, c net.Conn) bool {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return false
	}
	return errors.Is(err, io.EOF) || err != nil
}

// A user holding as many connections as allowed gets the next one closed
// at once; a connection given back makes room again.
func TestConnectionsPerUserBounded(t *testing.T) {
	const perUser = 4
	sock, s := serve(t, func(s *Server) {
		s.lim = newLimits(perUser, 100)
		s.lim.exempt = func(Cred) bool { return false } // the test runs as one user, maybe root
	})
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for range perUser {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	// A connection is counted once it was accepted: wait for the server.
	over, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer over.Close()
	if !closedByPeer(t, over) {
		t.Fatalf("connection %d of one user was kept open; want it closed (limit %d)", perUser+1, perUser)
	}
	if s.lim.Refused() != 1 {
		t.Errorf("refused = %d, want 1", s.lim.Refused())
	}
	// The held connections still work.
	if _, err := held[0].Write([]byte("GET /v1/status HTTP/1.1\r\nHost: agent\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	held[0].SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 12)
	if _, err := io.ReadFull(held[0], b); err != nil || string(b) != "HTTP/1.1 200" {
		t.Fatalf("held connection: %q %v", b, err)
	}
	// Give one back: a new one is accepted once the server saw the close.
	held[1].Close()
	held = append(held[:1], held[2:]...)
	deadline := time.Now().Add(5 * time.Second)
	for {
		c := NewClient(sock)
		_, err := c.Status(context.Background())
		c.Close()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no connection accepted after one was closed: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestLimitsCountAndRelease(t *testing.T) {
	l := newLimits(2, 3)
	l.account = func(uid uint32) bool { return uid < 100000 }
	alice, bob, carol, root := Cred{UID: 1000}, Cred{UID: 1001}, Cred{UID: 1002}, Cred{UID: 0}
	sub := func(i uint32) Cred { return Cred{UID: 100000 + i} }
	l.noAccount, l.reserve = 2, 1
	steps := []struct {
		name string
		c    Cred
		want bool
	}{
		{"alice 1", alice, true},
		{"alice 2", alice, true},
		{"alice 3 over her bound", alice, false},
		{"a uid without account", sub(1), true},
		{"another uid without account", sub(2), false}, // the total is reached
		{"bob 1 from his reserve", bob, true},
		{"bob 2 beyond his reserve", bob, false},
		{"root is not limited", root, true},
	}
	for _, s := range steps {
		if got, _ := l.acquire(s.c); got != s.want {
			t.Errorf("%s: acquire = %v, want %v", s.name, got, s.want)
		}
	}
	l.release(alice, true)
	l.release(alice, true)
	// Room in the total again, but the uids without account share 2.
	if ok, _ := l.acquire(sub(3)); !ok {
		t.Errorf("a second uid without account refused below the pool's bound")
	}
	if ok, _ := l.acquire(sub(4)); ok {
		t.Errorf("a third uid without account admitted beyond the pool's bound of 2")
	}
	if ok, _ := l.acquire(carol); !ok {
		t.Errorf("carol refused although her reserve is free")
	}
	l.release(root, true)
	if l.open != 4 || l.openNoAccount != 2 {
		t.Errorf("open = %d, without account %d; want 4 and 2", l.open, l.openNoAccount)
	}
}

// The statement comes in the language asked for, with one version for all.
func TestStatementLanguages(t *testing.T) {
	sock, _ := serve(t, nil)
	c := NewClient(sock)
	defer c.Close()
	for _, tt := range []struct{ ask, want, title string }{
		{"", "en", "Security Network Statement"},
		{"de", "de", "Erklärung zum Security Network"},
		{"ru-RU", "ru", "Положение о Security Network"},
		{"fr", "en", "Security Network Statement"},
	} {
		st, err := c.StatementIn(context.Background(), tt.ask)
		if err != nil {
			t.Fatal(err)
		}
		if st.Lang != tt.want || st.Title != tt.title || st.Version != consent.StatementVersion || st.Summary == "" {
			t.Errorf("lang %q: got %s %q version %d", tt.ask, st.Lang, st.Title, st.Version)
		}
	}
}

// The exceptions are read and changed by administrators only; other
// methods are refused with the ones the endpoint takes.
func TestExceptionsForAdministratorsOnly(t *testing.T) {
	admin := true
	sock, _ := serve(t, func(s *Server) { s.privileged = func(Cred) bool { return admin } })
	c := NewClient(sock)
	defer c.Close()
	ctx := context.Background()
	l, err := c.SetException(ctx, api.ExceptionRequest{SHA256: "cd", Reason: "tool"})
	if err != nil || len(l.Exceptions) != 1 || l.Exceptions[0].SHA256 != "cd" || l.Exceptions[0].UID != os.Getuid() {
		t.Fatalf("admin PUT: %+v %v", l, err)
	}
	if l, err := c.Exceptions(ctx); err != nil || len(l.Exceptions) != 1 {
		t.Fatalf("admin GET: %+v %v", l, err)
	}
	admin = false
	var ae *APIError
	if _, err := c.Exceptions(ctx); !errors.As(err, &ae) || ae.StatusCode != http.StatusForbidden || ae.Hint == "" {
		t.Errorf("GET by a non-admin: %v", err)
	}
	if _, err := c.SetException(ctx, api.ExceptionRequest{SHA256: "cd", Reason: "x"}); !errors.As(err, &ae) || ae.StatusCode != http.StatusForbidden {
		t.Errorf("PUT by a non-admin: %v", err)
	}
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Post("http://agent/v1/exceptions", "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed || resp.Header.Get("Allow") != "GET, PUT" {
		t.Errorf("POST: %s, Allow %q", resp.Status, resp.Header.Get("Allow"))
	}
}
