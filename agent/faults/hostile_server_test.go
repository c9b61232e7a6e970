package faults

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/wire"
)

// hostileFront stands between the agent and the real reference cloud:
// in mode "good" it passes requests on, in the other modes it answers
// the way a broken or malicious server would.
type hostileFront struct {
	srv       *httptest.Server
	proxy     *httputil.ReverseProxy
	elsewhere *httptest.Server // the other host redirects point to
	reached   atomic.Int64     // requests that reached elsewhere

	mu   sync.Mutex // protects mode, arrivals and release
	mode string
	// arrivals records every request that reached the front.
	arrivals []arrival
	// release, in mode "hold", is closed to let held requests through.
	release chan struct{}
	// changed is closed when the mode changes, to end dripping answers.
	changed chan struct{}
}

func startHostileFront(t *testing.T, target string) *hostileFront {
	t.Helper()
	u, _ := url.Parse(target)
	h := &hostileFront{proxy: httputil.NewSingleHostReverseProxy(u), mode: "good", changed: make(chan struct{}), release: make(chan struct{})}
	h.elsewhere = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.reached.Add(1)
		w.WriteHeader(http.StatusOK)
	}))
	h.srv = httptest.NewServer(h)
	t.Cleanup(func() {
		h.unhold()
		h.set("good")
		h.srv.CloseClientConnections()
		h.srv.Close()
		h.elsewhere.Close()
	})
	return h
}

func (h *hostileFront) set(mode string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if mode != h.mode {
		h.mode = mode
		close(h.changed)
		h.changed = make(chan struct{})
	}
}

// unhold lets held requests through.
func (h *hostileFront) unhold() {
	h.mu.Lock()
	defer h.mu.Unlock()
	select {
	case <-h.release:
	default:
		close(h.release)
	}
}

func (h *hostileFront) get() (string, chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.mode, h.changed
}

type arrival struct {
	at     time.Time
	method string
	path   string
}

// since returns the requests that arrived after t.
func (h *hostileFront) since(t time.Time) []arrival {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []arrival
	for _, a := range h.arrivals {
		if a.at.After(t) {
			out = append(out, a)
		}
	}
	return out
}

// holding returns how many statistics requests are held.
func (h *hostileFront) holding() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, a := range h.arrivals {
		if a.path == "/v1/statistics" && a.method == "HOLD" {
			n++
		}
	}
	return n
}

func (h *hostileFront) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h.mu.Lock()
	h.arrivals = append(h.arrivals, arrival{time.Now(), r.Method, r.URL.Path})
	h.mu.Unlock()
	mode, changed := h.get()
	if mode == "hold" && r.URL.Path == "/v1/statistics" {
		h.mu.Lock()
		release := h.release
		h.arrivals = append(h.arrivals, arrival{time.Now(), "HOLD", r.URL.Path})
		h.mu.Unlock()
		<-release
		h.proxy.ServeHTTP(w, r)
		return
	}
	// Registration and deletion always go through: the attacks are on
	// the answers to statistics and lookups.
	if mode == "good" || !strings.HasPrefix(r.URL.Path, "/v1/statistics") && !strings.HasPrefix(r.URL.Path, "/v1/reputation") {
		h.proxy.ServeHTTP(w, r)
		return
	}
	switch mode {
	case "slowloris":
		// The status line and headers, one byte at a time, never done.
		conn, bw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		for _, b := range []byte("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow: ") {
			bw.WriteByte(b)
			bw.Flush()
			select {
			case <-changed:
				return
			case <-time.After(200 * time.Millisecond):
			}
		}
		for {
			bw.WriteString("a")
			bw.Flush()
			select {
			case <-changed:
				return
			case <-time.After(time.Second):
			}
		}
	case "gigantic":
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusOK)
		chunk := []byte(`{"accepted": 1, "duplicate": false, "padding": "` + strings.Repeat("x", 64<<10))
		for i := 0; i < 16<<10; i++ { // up to 1 GiB
			if _, err := w.Write(chunk); err != nil {
				return
			}
			select {
			case <-changed:
				return
			default:
			}
		}
	case "redirect":
		http.Redirect(w, r, h.elsewhere.URL+r.URL.Path, http.StatusTemporaryRedirect)
	case "wrong-type":
		w.Header().Set("Content-Type", "text/html")
		w.WriteHeader(http.StatusOK)
		fmt.Fprint(w, `<html>{"accepted": 1}</html>`)
	case "garbage-json":
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusOK)
		fmt.Fprint(w, `{"accepted": "all of them", "duplicate": [`)
	case "retry-forever":
		w.Header().Set("Retry-After", "999999999")
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprint(w, `{"error":"`+strings.Repeat("\x1b[31m", 1000)+`"}`)
	case "hang-up":
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			conn.Close()
		}
	}
}

// A hostile or broken server: answers that drip forever, never end,
// redirect to another host, have the wrong type or make no sense. The
// agent keeps answering its local clients, never follows the redirect,
// and loses nothing: once the server behaves, every execution arrives
// exactly once.
func TestHostileServer(t *testing.T) {
	faultCase(t)
	t.Parallel()
	const n = 3
	srv := startCloud(t)
	front := startHostileFront(t, srv.URL)
	work := worldDir(t, "cloudprotect-faults-hostile-")
	a := newAgent(t, agentOpts{Server: front.srv.URL})
	a.cloud = srv
	a.start()
	a.participate()
	a.waitWatching(work)
	a.drain()

	modes := []string{"slowloris", "gigantic", "redirect", "wrong-type", "garbage-json", "hang-up"}
	sums := map[string]string{}
	for _, mode := range modes {
		// A good server first: what the last mode held back is sent, and
		// the next record is the only one pending.
		front.set("good")
		a.drain()
		prog, sum := uniqueProgram(t, work, mode)
		sums[mode] = sum
		runN(t, prog, n)
		a.waitRecord(sum, "the "+mode+" program", func(r wire.Record) bool { return r.ExecCount == n })
		front.set(mode)
		// An upload against the hostile answer, in the background...
		upDone := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
			defer cancel()
			c := localapi.NewClient(a.Socket)
			defer c.Close()
			_, err := c.Upload(ctx)
			upDone <- err
		}()
		// ...while the agent keeps answering, and keeps the record.
		for range 5 {
			st := a.status()
			if !st.Participation.Collecting {
				t.Fatalf("%s: not collecting any more: %+v", mode, st.Participation)
			}
			time.Sleep(300 * time.Millisecond)
		}
		err := <-upDone
		t.Logf("%s: upload answered %v", mode, err)
		if hwm := readProc(t, a.pid()).HWMKiB; hwm > 256<<10 {
			t.Errorf("%s: peak memory %d KiB, want under 256 MiB", mode, hwm)
		}
	}
	if front.reached.Load() != 0 {
		t.Errorf("the agent followed a redirect to another host %d times", front.reached.Load())
	}
	front.set("good")
	a.drain()
	got := srv.counts(t)
	for mode, sum := range sums {
		if got[sum] != n {
			t.Errorf("%s: the cloud holds %d executions, want %d", mode, got[sum], n)
		}
	}

	// Last, a server that asks to wait for ever: the wait is capped, and
	// the statistics stay queued meanwhile.
	prog, sum := uniqueProgram(t, work, "retry-forever")
	runN(t, prog, n)
	a.waitRecord(sum, "the retry-forever program", func(r wire.Record) bool { return r.ExecCount == n })
	front.set("retry-forever")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	_, err := a.Client.Upload(ctx)
	cancel()
	t.Logf("retry-forever: upload answered %v", err)
	st := a.status()
	if st.Upload.NextAttempt == nil || time.Until(*st.Upload.NextAttempt) > 61*time.Minute {
		t.Errorf("a server asking to wait for ever holds uploads until %v, want at most an hour", st.Upload.NextAttempt)
	}
	if q, _ := a.queued(); len(q.Records) == 0 {
		t.Errorf("nothing pending after the server refused the batch")
	}
	a.waitRecord(sum, "the retry-forever program, still queued", func(r wire.Record) bool { return r.ExecCount == n })
	t.Logf("after the hostile answers: upload status %+v; agent %v", st.Upload, readProc(t, a.pid()))
}

// A server whose certificate cannot be verified: nothing is sent to it,
// the agent says why and keeps the statistics.
func TestServerTLSFailure(t *testing.T) {
	faultCase(t)
	t.Parallel()
	var reached atomic.Int64
	tlsSrv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reached.Add(1)
	}))
	defer tlsSrv.Close()
	work := worldDir(t, "cloudprotect-faults-tls-")
	a := newAgent(t, agentOpts{Server: tlsSrv.URL})
	a.start()
	a.participate()
	a.waitWatching(work)
	prog, sum := uniqueProgram(t, work, "tls")
	runN(t, prog, 2)
	a.waitRecord(sum, "the program", func(r wire.Record) bool { return r.ExecCount == 2 })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	_, err := a.Client.Upload(ctx)
	cancel()
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("upload to a server with an unverifiable certificate: %v, want a certificate error", err)
	}
	if reached.Load() != 0 {
		t.Errorf("%d requests reached the server", reached.Load())
	}
	a.waitRecord(sum, "the program, still queued", func(r wire.Record) bool { return r.ExecCount == 2 })
	if st := a.status(); st.Upload.LastError == "" {
		t.Errorf("status does not say why uploads fail: %+v", st.Upload)
	}
}

// A program at an odd path (a chroot or build tree holding "home" or
// "root" folders deep inside: /srv/chroot/home/tool) is sent with a path
// the cloud accepts, and never takes the statistics of every other
// program in its batch down with it.
func TestOddPathKeepsBatch(t *testing.T) {
	faultCase(t)
	srv := startCloud(t)
	work := worldDir(t, "cloudprotect-faults-badpath-")
	a := newAgent(t, agentOpts{Cloud: srv})
	a.start()
	a.participate()
	a.waitWatching(work)
	a.drain()

	var odd []string
	for _, dir := range []string{"chroot/home/alice", "chroot/root", "build/home"} {
		d := filepath.Join(work, dir)
		os.MkdirAll(d, 0o755)
		p, _ := uniqueProgram(t, d, "tool")
		odd = append(odd, p)
	}
	var sums []string
	for i := range 5 {
		p, sum := uniqueProgram(t, work, fmt.Sprintf("ordinary%d", i))
		runN(t, p, 2)
		sums = append(sums, sum)
	}
	for _, p := range odd {
		runN(t, p, 1)
	}
	for _, sum := range sums {
		a.waitRecord(sum, "an ordinary program", func(r wire.Record) bool { return r.ExecCount == 2 })
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	_, err := a.Client.Upload(ctx)
	cancel()
	got := srv.counts(t)
	lost := 0
	for _, sum := range sums {
		if got[sum] != 2 {
			lost++
		}
	}
	if lost > 0 {
		t.Errorf("%d of %d ordinary programs lost with the batch the cloud refused for one path: %v", lost, len(sums), err)
	}
}
