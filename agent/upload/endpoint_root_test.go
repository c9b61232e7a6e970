package upload_test

import (
	"context"
	"encoding/pem"
	"errors"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/cloud"
	"github.com/cloudprotect/cloudprotect/agent/testenv"
)

const nobody = 65534

// newScriptedOn is newScripted on a listener of the test's choosing.
func newScriptedOn(t *testing.T, ln net.Listener) *scripted {
	s := &scripted{t: t, tokens: map[string]string{}, batches: map[string]bool{},
		counts: map[string]uint64{}, deleted: map[string]bool{}, verdicts: map[string]string{}}
	s.setMode(modeOK)
	s.srv = httptest.NewUnstartedServer(s)
	s.srv.Listener.Close()
	s.srv.Listener = ln
	s.srv.Start()
	t.Cleanup(s.srv.Close)
	return s
}

// A plain-HTTP server on loopback that another user listens on receives
// nothing: the user-mode agent checks who owns the socket that accepted
// each connection, and the system agent does not use loopback ports an
// ordinary user can take at all.
func TestLoopbackServerOfAnotherUserRefused(t *testing.T) {
	ln, err := testenv.ListenAs(t, nobody, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := newScriptedOn(t, ln)
	for _, system := range []bool{false, true} {
		h := newHarness(t, s.srv.URL, func(o *options) { o.cloud.Client.System = system })
		s.clk = h.clk
		h.addRecords(0, 10, 1)
		h.start()
		_, err := h.sendNow()
		var ee *cloud.EndpointError
		switch {
		case system && !errors.As(err, &ee):
			t.Errorf("system agent: send to %s = %v; want an EndpointError", s.srv.URL, err)
		case !system && (err == nil || !strings.Contains(err.Error(), "belongs to uid 65534")):
			t.Errorf("user-mode agent: send to a server of uid %d = %v; want it refused", nobody, err)
		}
		if st := h.up.Status(); system && (st.Problem == "" || st.ProblemHint == "") {
			t.Errorf("system agent: status %+v; want the problem and a hint", st)
		}
		h.stop()
	}
	if n := s.totalRequests(); n != 0 {
		t.Fatalf("the other user's server received %d requests; want none", n)
	}
}

// A server on a unix socket is used when root owns the socket and the
// folders above it; a socket another user made is refused.
func TestUnixSocketServer(t *testing.T) {
	testenv.NeedRoot(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	s := newScriptedOn(t, ln)
	h := newHarness(t, "unix://"+sock, func(o *options) { o.cloud.Client.System = true })
	s.clk = h.clk
	h.addRecords(0, 10, 1)
	h.start()
	if _, err := h.sendNow(); err != nil {
		t.Fatalf("send over root's socket: %v", err)
	}
	wantAllDelivered(t, s, h, 10, 1)
	h.stop()

	// Another user's socket in a sticky folder every user may write to.
	top, err := os.MkdirTemp("", "cloudprotect-upload-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(top)
	os.Chmod(top, 0o755)
	shared := filepath.Join(top, "shared")
	if err := os.Mkdir(shared, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod(shared, 0o1777)
	theirs := filepath.Join(shared, "api.sock")
	ln2, err := testenv.ListenAs(t, nobody, "unix", theirs)
	if err != nil {
		t.Fatal(err)
	}
	s2 := newScriptedOn(t, ln2)
	for _, system := range []bool{false, true} {
		h := newHarness(t, "unix://"+theirs, func(o *options) { o.cloud.Client.System = system })
		s2.clk = h.clk
		h.addRecords(0, 10, 1)
		h.start()
		if _, err := h.sendNow(); err == nil || !strings.Contains(err.Error(), "belongs to uid 65534") {
			t.Errorf("system %v: send over another user's socket = %v; want it refused", system, err)
		}
		h.stop()
	}
	if n := s2.totalRequests(); n != 0 {
		t.Errorf("the other user's socket received %d requests; want none", n)
	}
}

// The policy's ca_file names the authorities the server's certificate is
// verified against.
func TestCAFile(t *testing.T) {
	t.Parallel()
	s := &scripted{t: t, tokens: map[string]string{}, batches: map[string]bool{},
		counts: map[string]uint64{}, deleted: map[string]bool{}, verdicts: map[string]string{}}
	s.setMode(modeOK)
	s.srv = httptest.NewTLSServer(s)
	s.srv.Config.ErrorLog = newDiscardLog()
	defer s.srv.Close()
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.srv.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	caPath := ca
	h := newHarness(t, s.srv.URL, func(o *options) { o.cloud.CAFile = func() string { return caPath } })
	s.clk = h.clk
	h.addRecords(0, 10, 1)
	h.start()
	if _, err := h.sendNow(); err != nil {
		t.Fatalf("send with the server's authority in ca_file: %v", err)
	}
	wantAllDelivered(t, s, h, 10, 1)
	h.stop()

	// A file without a certificate is an error that names it.
	empty := filepath.Join(dir, "empty.pem")
	os.WriteFile(empty, []byte("not a certificate\n"), 0o644)
	caPath = empty
	h.open()
	h.addRecords(10, 5, 1)
	h.start()
	if _, err := h.sendNow(); err == nil || !strings.Contains(err.Error(), "no PEM certificate") {
		t.Errorf("send with an empty ca_file = %v; want an error naming it", err)
	}
}

// With no server configured nothing is sent, and the status says so and
// how to set one.
func TestNoServerSendsNothing(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", nil)
	h.addRecords(0, 10, 1)
	h.start()
	if _, err := h.sendNow(); !errors.Is(err, cloud.ErrNoServer) {
		t.Errorf("send without a server = %v; want ErrNoServer", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := h.inst.Lookup(ctx, []string{strings.Repeat("a", 64)}); !errors.Is(err, cloud.ErrNoServer) {
		t.Errorf("lookup without a server = %v; want ErrNoServer", err)
	}
	st := h.up.Status()
	if !strings.Contains(st.Problem, "no Security Network server") || !strings.Contains(st.ProblemHint, "policy.json") {
		t.Errorf("status %+v; want the problem and how to set a server", st)
	}
	if st.Registered || st.NextAttempt != nil {
		t.Errorf("status %+v; want nothing registered or scheduled", st)
	}
}
