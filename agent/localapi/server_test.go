package localapi

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeBackend answers with fixed values and records participation calls.
type fakeBackend struct {
	hub *Hub

	mu    sync.Mutex // protects calls
	calls []api.ParticipationRequest
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

func (b *fakeBackend) QueuePreview(context.Context) (api.QueuePreview, error) {
	return api.QueuePreview{}, nil
}

func (b *fakeBackend) Upload(context.Context) (api.UploadResult, error) {
	return api.UploadResult{}, errors.New("nothing")
}

func (b *fakeBackend) Events() *Hub { return b.hub }

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
	alice, bob, root := Cred{UID: 1000}, Cred{UID: 1001}, Cred{UID: 0}
	steps := []struct {
		name string
		c    Cred
		want bool
	}{
		{"alice 1", alice, true},
		{"alice 2", alice, true},
		{"alice 3 over her bound", alice, false},
		{"bob 1", bob, true},
		{"bob 2 over the total", bob, false},
		{"root is not limited", root, true},
	}
	for _, s := range steps {
		if got := l.acquire(s.c); got != s.want {
			t.Errorf("%s: acquire = %v, want %v", s.name, got, s.want)
		}
	}
	l.release(alice)
	if !l.acquire(bob) {
		t.Errorf("bob refused after alice gave one back")
	}
	l.release(root)
	if l.open != 3 {
		t.Errorf("open = %d, want 3", l.open)
	}
}
