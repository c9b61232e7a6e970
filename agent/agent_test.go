package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/internal/spawn"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/agent/testenv"
)

func TestMain(m *testing.M) {
	spawn.MaybeChild()
	// A copy of this binary run as another user is an agent.
	if dir := os.Getenv(agentAsUserEnv); dir != "" {
		os.Exit(agentAsUser(dir))
	}
	// A copy of this binary serves as a slow proxy in front of the cloud.
	if spec := os.Getenv(proxyEnv); spec != "" {
		os.Exit(lookupProxy(spec))
	}
	// A copy of this binary run as another user acts as a client.
	if sock := os.Getenv("CLOUDPROTECT_TEST_CLIENT"); sock != "" {
		os.Exit(clientChild(sock, os.Args[len(os.Args)-1]))
	}
	goleak.VerifyTestMain(m, goleak.Cleanup(func(code int) {
		if daemonDir != "" {
			os.RemoveAll(daemonDir)
		}
		testenv.RemoveSelfCopy()
		os.Exit(code)
	}))
}

func clientChild(sock, op string) int {
	c := localapi.NewClient(sock)
	ctx := context.Background()
	var err error
	switch op {
	case "status":
		var st api.Status
		st, err = c.Status(ctx)
		if err == nil {
			fmt.Printf("state=%s can_change=%v\n", st.Participation.State, st.CanChange)
			return 0
		}
	case "participate":
		_, err = c.SetParticipation(ctx, api.ParticipationRequest{Participate: true, StatementVersion: consent.StatementVersion, Via: "cli"})
	}
	var ae *localapi.APIError
	if errors.As(err, &ae) {
		fmt.Printf("code=%d error=%s hint=%s\n", ae.StatusCode, ae.Message, ae.Hint)
		return 0
	}
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	fmt.Println("ok")
	return 0
}

type testAgent struct {
	*Agent
	dir    string
	socket string
	client *localapi.Client
	stop   func()
}

// startAgent runs a real agent with its state, socket and policy in a
// fresh folder that every local user can traverse.
func startAgent(t *testing.T, mode string, policy string) *testAgent {
	t.Helper()
	return startAgentWith(t, mode, policy, nil)
}

func startAgentWith(t *testing.T, mode string, policy string, edit func(*Config)) *testAgent {
	t.Helper()
	dir, err := os.MkdirTemp("", "cloudprotect-agent-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	if policy != "" {
		os.WriteFile(filepath.Join(dir, "policy.json"), []byte(policy), 0o644)
	}
	cfg := Config{
		Mode:       mode,
		StateDir:   filepath.Join(dir, "state"),
		Socket:     filepath.Join(dir, "run", "cloudprotectd.sock"),
		PolicyPath: filepath.Join(dir, "policy.json"),
		Server:     "http://127.0.0.1:1",
		// Never a permission group in the test process itself.
		NoBlocking: true,
	}
	if edit != nil {
		edit(&cfg)
	}
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	ta := &testAgent{Agent: a, dir: dir, socket: cfg.Socket, client: localapi.NewClient(cfg.Socket)}
	ta.stop = func() {
		cancel()
		ta.client.Close()
		if err := <-done; err != nil {
			t.Errorf("agent Run: %v", err)
		}
	}
	t.Cleanup(func() {
		if ta.stop != nil {
			ta.stop()
		}
	})
	return ta
}

func TestParticipationOverSocket(t *testing.T) {
	a := startAgent(t, ModeUser, "")
	ctx := context.Background()
	tests := []struct {
		name      string
		req       api.ParticipationRequest
		wantCode  int
		wantState string
	}{
		{"wrong statement version", api.ParticipationRequest{Participate: true, StatementVersion: 99, Via: "cli"}, 409, "undecided"},
		{"no via", api.ParticipationRequest{Participate: true, StatementVersion: consent.StatementVersion}, 400, "undecided"},
		{"via policy is not for clients", api.ParticipationRequest{Participate: true, StatementVersion: consent.StatementVersion, Via: "policy"}, 400, "undecided"},
		{"participate", api.ParticipationRequest{Participate: true, StatementVersion: consent.StatementVersion, Via: "cli"}, 200, "participating"},
		{"leave", api.ParticipationRequest{Participate: false, Via: "tray"}, 200, "declined"},
		{"participate again", api.ParticipationRequest{Participate: true, StatementVersion: consent.StatementVersion, Via: "tray"}, 200, "participating"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := a.client.SetParticipation(ctx, tt.req)
			code := 200
			var ae *localapi.APIError
			if errors.As(err, &ae) {
				code = ae.StatusCode
				if ae.Hint == "" {
					t.Errorf("error %q has no hint", ae.Message)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			if code != tt.wantCode {
				t.Errorf("code = %d (%v), want %d", code, err, tt.wantCode)
			}
			st, err := a.client.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if string(st.Participation.State) != tt.wantState {
				t.Errorf("state = %s, want %s", st.Participation.State, tt.wantState)
			}
			if !st.CanChange {
				t.Errorf("the owner cannot change participation in user mode")
			}
		})
	}
}

func TestPolicyLockOverSocket(t *testing.T) {
	a := startAgent(t, ModeUser, `{"participation":"off"}`)
	_, err := a.client.SetParticipation(context.Background(), api.ParticipationRequest{
		Participate: true, StatementVersion: consent.StatementVersion, Via: "cli"})
	var ae *localapi.APIError
	if !errors.As(err, &ae) || ae.StatusCode != 403 || !strings.Contains(ae.Message, filepath.Join(a.dir, "policy.json")) {
		t.Fatalf("err = %v, want 403 naming the policy", err)
	}
	st, _ := a.client.Status(context.Background())
	if !st.Participation.Locked || st.Participation.State != "declined" || st.Participation.Collecting {
		t.Errorf("status = %+v", st.Participation)
	}
}

func TestEventsFollowChanges(t *testing.T) {
	a := startAgent(t, ModeUser, "")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events := make(chan api.Event, 16)
	done := make(chan error, 1)
	go func() {
		done <- a.client.Events(ctx, func(ev api.Event) error { events <- ev; return nil })
	}()
	next := func() api.Event {
		t.Helper()
		select {
		case ev := <-events:
			return ev
		case <-time.After(5 * time.Second):
			t.Fatal("no event within 5s")
		}
		return api.Event{}
	}
	if ev := next(); ev.Type != api.EventStatus || ev.Status.Participation.State != "undecided" {
		t.Fatalf("first event = %+v, want the current status", ev)
	}
	// A change made by another client (the CLI, say) arrives on the stream.
	other := localapi.NewClient(a.socket)
	defer other.Close()
	if _, err := other.SetParticipation(ctx, api.ParticipationRequest{Participate: true, StatementVersion: consent.StatementVersion, Via: "cli"}); err != nil {
		t.Fatal(err)
	}
	for ev := next(); ev.Status == nil || ev.Status.Participation.State != "participating"; ev = next() {
	}
	// A policy written by the administrator arrives too.
	os.WriteFile(filepath.Join(a.dir, "policy.json"), []byte(`{"participation":"off"}`), 0o644)
	for ev := next(); ev.Status == nil || !ev.Status.Participation.Locked; ev = next() {
	}
	// The stream ends when the agent stops.
	a.stop()
	a.stop = nil
	if err := <-done; !errors.Is(err, localapi.ErrUnreachable) {
		t.Errorf("Events after the agent stopped: %v, want ErrUnreachable", err)
	}
}

func TestSecondAgentRefused(t *testing.T) {
	a := startAgent(t, ModeUser, "")
	_, err := New(Config{Mode: ModeUser, StateDir: filepath.Join(a.dir, "state2"), Socket: a.socket, PolicyPath: filepath.Join(a.dir, "policy.json")})
	if !errors.Is(err, localapi.ErrAlreadyRunning) {
		t.Fatalf("second agent: %v, want ErrAlreadyRunning", err)
	}
	// The first one still answers.
	if _, err := a.client.Status(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestStaleSocketReplaced(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "s.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close() // leaves the file, as a killed agent does
	a, err := New(Config{Mode: ModeUser, StateDir: filepath.Join(dir, "state"), Socket: sock, PolicyPath: filepath.Join(dir, "p.json")})
	if err != nil {
		t.Fatalf("agent over a stale socket: %v", err)
	}
	a.ln.Close()
}

func TestBadRequests(t *testing.T) {
	a := startAgent(t, ModeUser, "")
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", a.socket)
	}}}
	defer hc.CloseIdleConnections()
	tests := []struct {
		name, method, path, body string
		wantCode                 int
	}{
		{"malformed JSON", "PUT", "/v1/participation", `{"participate": tru`, 400},
		{"unknown field", "PUT", "/v1/participation", `{"participate": true, "force": true}`, 400},
		{"two objects", "PUT", "/v1/participation", `{"participate": false, "via": "cli"}{}`, 400},
		{"oversized body", "PUT", "/v1/participation", `{"via": "` + strings.Repeat("x", 1<<20) + `"}`, 413},
		{"unknown endpoint", "GET", "/v1/nothing", "", 404},
		{"wrong method", "DELETE", "/v1/status", "", 405},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequest(tt.method, "http://agent"+tt.path, strings.NewReader(tt.body))
			resp, err := hc.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.wantCode {
				t.Errorf("code = %d, want %d (%s)", resp.StatusCode, tt.wantCode, b)
			}
			if !strings.Contains(string(b), `"error"`) {
				t.Errorf("answer is not a JSON error: %s", b)
			}
		})
	}
	if st, _ := a.client.Status(context.Background()); st.Participation.State != "undecided" {
		t.Errorf("bad requests changed the state: %s", st.Participation.State)
	}
}

// A local user who is neither root nor an administrator may read the
// status but not change participation.
func TestNonAdminRefused(t *testing.T) {
	testenv.NeedRoot(t)
	a := startAgent(t, ModeSystem, `{"admin_group":"cpadmins"}`)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(a.dir, "client")
	b, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	run := func(op string) string {
		cmd := exec.Command(bin, "-test.run=^$", op)
		cmd.Env = []string{"CLOUDPROTECT_TEST_CLIENT=" + a.socket}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("client as nobody: %v\n%s", err, out)
		}
		return strings.TrimSpace(string(out))
	}
	if got := run("status"); got != "state=undecided can_change=false" {
		t.Errorf("status as nobody: %q", got)
	}
	if got := run("participate"); !strings.HasPrefix(got, "code=403 ") || !strings.Contains(got, "hint=") {
		t.Errorf("participate as nobody: %q, want 403 with a hint", got)
	}
	if st, _ := a.client.Status(context.Background()); st.Participation.State != "undecided" || !st.CanChange {
		t.Errorf("after nobody's attempt: %+v can_change=%v", st.Participation, st.CanChange)
	}
}
