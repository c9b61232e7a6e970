package faults

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
)

const nobody = 65534

// Another local user may read the status and nothing more.
func TestOtherUserRefused(t *testing.T) {
	faultCase(t)
	t.Parallel()
	a := newAgent(t, agentOpts{System: true})
	a.start()
	if got := output(t, runAs(t, nobody, nobody, a.Socket, "status", nil)); got != "state=undecided can_change=false" {
		t.Errorf("status as nobody: %q", got)
	}
	if got := output(t, runAs(t, nobody, nobody, a.Socket, "participate", nil)); got != "code=403 hint=true" {
		t.Errorf("participate as nobody: %q, want 403 with a hint", got)
	}
	if st := a.status(); st.Participation.State != "undecided" {
		t.Errorf("state after nobody's attempt: %s", st.Participation.State)
	}
}

// Requests no client sends: each gets an error answer or a closed
// connection, never a change, and the agent answers the next client.
func TestMalformedRequests(t *testing.T) {
	faultCase(t)
	t.Parallel()
	a := newAgent(t, agentOpts{System: true})
	a.start()
	big := strings.Repeat("x", 1<<20)
	cases := []struct{ name, raw string }{
		{"header of 1 MiB", "GET /v1/status HTTP/1.1\r\nHost: agent\r\nX-Big: " + big + "\r\n\r\n"},
		{"body of 1 MiB", "PUT /v1/participation HTTP/1.1\r\nHost: agent\r\nContent-Length: 1048600\r\n\r\n{\"via\":\"" + big + "\"}"},
		{"claims 10 GB, sends little", "PUT /v1/participation HTTP/1.1\r\nHost: agent\r\nContent-Length: 10000000000\r\n\r\n{\"participate\":"},
		{"chunked, never ends", "PUT /v1/participation HTTP/1.1\r\nHost: agent\r\nTransfer-Encoding: chunked\r\n\r\n10000\r\n" + strings.Repeat("{", 4096)},
		{"binary garbage", "\x00\x01\x02\xff\xfe GET / \r\n\r\n"},
		{"HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"},
		{"bad JSON types", "PUT /v1/participation HTTP/1.1\r\nHost: agent\r\nContent-Length: 52\r\n\r\n{\"participate\":\"yes\",\"statement_version\":\"1\",\"via\":1}"},
		{"deep nesting", "PUT /v1/participation HTTP/1.1\r\nHost: agent\r\nContent-Length: 16000\r\n\r\n" + strings.Repeat("[", 16000)},
		{"path traversal", "GET /v1/../../etc/shadow HTTP/1.1\r\nHost: agent\r\n\r\n"},
		{"pipelined flood", strings.Repeat("GET /v1/status HTTP/1.1\r\nHost: agent\r\n\r\n", 2000)},
		{"request line without end", "GET /" + big},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			conn, err := net.Dial("unix", a.Socket)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(30 * time.Second))
			go func() { io.WriteString(conn, c.raw) }()
			// Read whatever comes back until the agent closes or the
			// deadline (which is a failure only if the agent stops
			// answering others, checked below).
			br := bufio.NewReader(conn)
			line, _ := br.ReadString('\n')
			if strings.HasPrefix(line, "HTTP/1.1 2") && !strings.HasPrefix(c.name, "pipelined") {
				t.Errorf("answered %q to a malformed request", strings.TrimSpace(line))
			}
			conn.Close()
			st, err := a.Client.Status(t.Context())
			if err != nil || st.Participation.State != "undecided" {
				t.Fatalf("after the request: state %q, %v", st.Participation.State, err)
			}
		})
	}
	t.Cleanup(func() {
		if hwm := readProc(t, a.pid()).HWMKiB; hwm > 256<<10 {
			t.Errorf("peak memory %d KiB after malformed requests, want under 256 MiB", hwm)
		}
	})
}

// Thousands of idle connections and never-read event streams from one
// unprivileged user: the agent keeps answering root and other users, and
// its descriptors and memory stay bounded.
func TestIdleConnectionFlood(t *testing.T) {
	faultCase(t)
	t.Parallel()
	n := scale(3000, 15000)
	a := newAgent(t, agentOpts{System: true})
	a.start()
	before := readProc(t, a.pid())

	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	flood := runAs(t, nobody, nobody, a.Socket, fmt.Sprintf("hold:%d", n), r)
	out, err := flood.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	flood.Stderr = os.Stderr
	if err := flood.Start(); err != nil {
		t.Fatal(err)
	}
	r.Close()
	defer func() { w.Close(); flood.Wait() }()
	line, _ := bufio.NewReader(out).ReadString('\n')
	if !strings.HasPrefix(line, "opened ") {
		t.Fatalf("flood: %q", line)
	}
	// The agent accepts (and refuses) what was opened; root and another
	// user are answered meanwhile.
	for range 5 {
		a.status()
		if got := output(t, runAs(t, 4242, 4242, a.Socket, "status", nil)); !strings.HasPrefix(got, "state=undecided") {
			t.Fatalf("another user during the flood: %q", got)
		}
	}
	during := readProc(t, a.pid())
	// A bound on descriptors: the agent's own plus what the limits allow.
	if limit := before.FDs + localapi.MaxConns + 16; during.FDs > limit {
		t.Errorf("agent holds %d descriptors during a flood of %d connections (before: %d), want at most %d",
			during.FDs, n, before.FDs, limit)
	}
	if during.HWMKiB > 256<<10 {
		t.Errorf("peak memory %d KiB during the flood, want under 256 MiB", during.HWMKiB)
	}
	t.Logf("flood of %s connections by one user: before %v; during %v", line[len("opened "):len(line)-1], before, during)
}

// Event streams that are never read, while events are published: the
// agent answers changes at once, a client that reads gets every event,
// and memory stays bounded.
func TestSlowEventReaders(t *testing.T) {
	faultCase(t)
	t.Parallel()
	changes := scale(20, 200)
	a := newAgent(t, agentOpts{System: true})
	a.start()

	// Stuck readers: they ask for the stream and never read it.
	var stuck []net.Conn
	defer func() {
		for _, c := range stuck {
			c.Close()
		}
	}()
	for range 40 {
		c, err := net.Dial("unix", a.Socket)
		if err != nil {
			t.Fatal(err)
		}
		// A small receive buffer fills after a few events.
		c.(*net.UnixConn).SetReadBuffer(1024)
		io.WriteString(c, "GET /v1/events HTTP/1.1\r\nHost: agent\r\n\r\n")
		stuck = append(stuck, c)
	}

	// A reader that keeps up.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	var lastState string
	seen := 0
	reader := localapi.NewClient(a.Socket)
	defer reader.Close()
	done := make(chan error, 1)
	go func() {
		done <- reader.Events(ctx, func(ev api.Event) error {
			mu.Lock()
			defer mu.Unlock()
			seen++
			if ev.Status != nil {
				lastState = string(ev.Status.Participation.State)
			}
			return nil
		})
	}()

	policy := []string{`{"participation":"off"}`, `{"participation":"on"}`}
	for i := range changes {
		// Changes through the policy file (as an administrator would)
		// and through the API, alternately.
		if i%2 == 0 {
			os.WriteFile(a.Policy, []byte(policy[(i/2)%2]), 0o644)
			a.waitStatus("the policy to apply", func(s api.Status) bool { return s.Participation.Locked })
			os.Remove(a.Policy)
			a.waitStatus("the policy to go", func(s api.Status) bool { return !s.Participation.Locked })
		} else {
			a.setParticipation(i%4 == 1)
		}
	}
	a.leave()
	deadline := time.Now().Add(20 * time.Second)
	for {
		mu.Lock()
		s, n := lastState, seen
		mu.Unlock()
		if s == "declined" && n > 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the reading client's last state is %q after %d events, want declined", s, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
	ps := readProc(t, a.pid())
	if ps.HWMKiB > 256<<10 {
		t.Errorf("peak memory %d KiB with stuck readers, want under 256 MiB", ps.HWMKiB)
	}
	mu.Lock()
	t.Logf("%d changes with 40 stuck readers: the reading client got %d events; agent %v", changes, seen, ps)
	mu.Unlock()
	cancel()
	<-done
}
