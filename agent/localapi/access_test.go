package localapi

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/wire"
)

// request runs one request through the handler as the caller with uid.
func request(s *Server, uid uint32, method, path string) *http.Response {
	ctx := context.WithValue(context.Background(), credKey{}, Cred{UID: uid, GID: uid})
	req := httptest.NewRequestWithContext(ctx, method, "http://agent"+path, strings.NewReader("{}"))
	rec := httptest.NewRecorder()
	s.Handler().ServeHTTP(rec, req)
	return rec.Result()
}

func bigPreview(n, pathLen int) api.QueuePreview {
	recs := make([]api.QueueRecord, n)
	for i := range recs {
		recs[i].InBatch = i < n/2
		recs[i].Record = wire.Record{Facts: wire.Facts{
			SHA256: fmt.Sprintf("%064x", i),
			Path:   "/opt/" + strings.Repeat("p", pathLen),
			Kind:   wire.KindELF,
			ELF:    &wire.ELF{Machine: "x86_64", Type: "dyn"},
		}, ExecCount: uint64(i), FirstSeen: time.Unix(1700000000, 0).UTC(), LastSeen: time.Unix(1700000000, 0).UTC()}
	}
	return api.QueuePreview{Records: recs, BatchID: "b1", StatementVersion: 1,
		Totals: api.QueueTotals{Programs: n, Records: n, BatchRecords: n / 2}}
}

// The queue's contents say which programs everyone ran: only a
// privileged caller reads them; anyone else gets a 403 with a hint, and
// the status (with the counts) as before.
func TestQueueOnlyForPrivileged(t *testing.T) {
	b := newFakeBackend()
	b.preview = bigPreview(3, 10)
	s := NewServer(nil, b, func(c Cred) bool { return c.UID == 0 || c.UID == 1000 }, nil)
	for _, tc := range []struct {
		name string
		uid  uint32
		want int
	}{
		{"root", 0, http.StatusOK},
		{"administrator", 1000, http.StatusOK},
		{"another user", 1001, http.StatusForbidden},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := request(s, tc.uid, http.MethodGet, "/v1/queue")
			if res.StatusCode != tc.want {
				t.Fatalf("GET /v1/queue as %d: %d, want %d", tc.uid, res.StatusCode, tc.want)
			}
			if tc.want == http.StatusForbidden {
				var e api.Error
				if err := json.NewDecoder(res.Body).Decode(&e); err != nil || e.Hint == "" || strings.Contains(e.Error, "/opt/") {
					t.Errorf("refusal %+v %v: want an error with a hint and no contents", e, err)
				}
				return
			}
			var q api.QueuePreview
			if err := json.NewDecoder(res.Body).Decode(&q); err != nil || len(q.Records) != 3 {
				t.Errorf("preview: %d records, %v", len(q.Records), err)
			}
			if st := request(s, tc.uid, http.MethodGet, "/v1/status"); st.StatusCode != http.StatusOK {
				t.Errorf("status: %d", st.StatusCode)
			}
		})
	}
}

// Only a privileged caller's "send now" ignores the backoff after
// failures.
func TestUploadForcedOnlyForPrivileged(t *testing.T) {
	b := newFakeBackend()
	s := NewServer(nil, b, func(c Cred) bool { return c.UID == 0 }, nil)
	request(s, 0, http.MethodPost, "/v1/upload")
	request(s, 1001, http.MethodPost, "/v1/upload")
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.forced) != 2 || !b.forced[0] || b.forced[1] {
		t.Errorf("force per call (root, user) = %v, want [true false]", b.forced)
	}
}

// A streamed answer is byte for byte what encoding/json writes.
func TestStreamJSONMatchesEncodingJSON(t *testing.T) {
	now := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	type inner struct {
		A []int    `json:"a,omitempty"`
		B *string  `json:"b"`
		C []string `json:"c"`
	}
	type odd struct {
		Name    string         `json:"name,omitempty"`
		Skip    int            `json:"-"`
		Z       time.Time      `json:"z,omitzero"`
		T       time.Time      `json:"t"`
		M       map[string]int `json:"m"`
		Raw     []byte         `json:"raw"`
		In      inner          `json:"in"`
		List    []inner        `json:"list"`
		Any     any            `json:"any"`
		Esc     string         `json:"esc<&>"`
		Arr     [2]int         `json:"arr"`
		Ptr     *inner         `json:"ptr,omitempty"`
		NumStr  int            `json:"num_str,string"`
		hidden  int
		Untaged int
		Set     map[string]string `json:"set,omitempty"`
	}
	s := "x"
	values := []any{
		bigPreview(5, 30),
		api.QueuePreview{},
		api.Status{Participation: api.Participation{State: "participating"}, Upload: api.UploadInfo{LastUpload: &now}},
		api.AlertList{Alerts: []api.Alert{{ID: 1, Time: now, SHA256: "ab", Path: "~/x"}, {SHA256: "cd"}}},
		odd{Name: "<b>", T: now, M: map[string]int{"b": 2, "a": 1}, Raw: []byte{1, 2}, In: inner{B: &s},
			List: []inner{{A: []int{1}}, {}}, Any: map[string]any{"k": []int{1}}, Esc: "\u2028", NumStr: 5, hidden: 1},
		odd{Z: now},
		[]wire.Record{{ExecCount: 1}},
	}
	for i, v := range values {
		want, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		rec := httptest.NewRecorder()
		if err := streamJSON(rec, time.Second, v); err != nil {
			t.Fatalf("value %d: %v", i, err)
		}
		if got := strings.TrimSuffix(rec.Body.String(), "\n"); got != string(want) {
			t.Errorf("value %d:\n got %s\nwant %s", i, got, want)
		}
	}
}

// A client that asks for a large answer and never reads is dropped once a
// write has waited the write timeout: the connection is closed and the
// next large answer is served.
func TestSlowReaderOfLargeAnswerDropped(t *testing.T) {
	sock, s := serve(t, func(s *Server) {
		s.lim.exempt = func(Cred) bool { return false } // count the test's own connections
		s.writeTimeout = 2 * time.Second
		s.largeWait = time.Minute
		s.backend.(*fakeBackend).preview = bigPreview(2000, 2000) // about 4 MB
	})
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.(*net.UnixConn).SetReadBuffer(4096)
	if _, err := c.Write([]byte("GET /v1/queue HTTP/1.1\r\nHost: agent\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	// Never read: the server must give up and close its side, once it
	// took the request.
	deadline := time.Now().Add(30 * time.Second)
	for len(s.large) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the server never started the answer")
		}
		time.Sleep(time.Millisecond)
	}
	for openConns(s) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the server still holds the connection of a client that never reads, 30 s after it asked")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Whatever the stuck client gets is cut short.
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	res, err := http.ReadResponse(br, nil)
	if err == nil {
		var q api.QueuePreview
		if json.NewDecoder(res.Body).Decode(&q) == nil {
			t.Errorf("the dropped client still got the whole answer")
		}
	}
	// The next client is served.
	cl := NewClient(sock)
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	q, err := cl.Queue(ctx)
	if err != nil || len(q.Records) != 2000 {
		t.Fatalf("next client: %d records, %v", len(q.Records), err)
	}
}

func openConns(s *Server) int {
	s.lim.mu.Lock()
	defer s.lim.mu.Unlock()
	return s.lim.open
}

// Alert details say which programs someone ran: each user sees the
// alerts of programs they ran, administrators see all, in the alert list,
// in the status (count and last block) and on the event stream.
func TestAlertsPerCaller(t *testing.T) {
	b := newFakeBackend()
	b.alerts = []api.Alert{
		{ID: 3, SHA256: "c", Path: "~/shared", Action: api.AlertActionAlerted},
		{ID: 2, SHA256: "b", Path: "~/bob-tool", Action: api.AlertActionBlocked},
		{ID: 1, SHA256: "a", Path: "~/alice-tool", Action: api.AlertActionBlocked},
	}
	b.users = [][]uint32{{1000, 1001}, {1001}, {1000}}
	s := NewServer(nil, b, func(c Cred) bool { return c.UID == 0 }, nil)
	for _, tc := range []struct {
		name      string
		uid       uint32
		want      []uint64
		lastBlock uint64
	}{
		{"root", 0, []uint64{3, 2, 1}, 0},
		{"alice", 1000, []uint64{3, 1}, 1},
		{"bob", 1001, []uint64{3, 2}, 2},
		{"someone else", 1002, nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := request(s, tc.uid, http.MethodGet, "/v1/alerts")
			var l api.AlertList
			if err := json.NewDecoder(res.Body).Decode(&l); err != nil || res.StatusCode != 200 {
				t.Fatalf("GET /v1/alerts: %d %v", res.StatusCode, err)
			}
			var got []uint64
			for _, al := range l.Alerts {
				got = append(got, al.ID)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("alerts %v, want %v", got, tc.want)
			}
			var st api.Status
			json.NewDecoder(request(s, tc.uid, http.MethodGet, "/v1/status").Body).Decode(&st)
			if st.Alerts != len(tc.want) {
				t.Errorf("status counts %d alerts, want %d", st.Alerts, len(tc.want))
			}
			if tc.uid != 0 {
				switch {
				case tc.lastBlock == 0 && st.Protection.LastBlock != nil:
					t.Errorf("status shows another user's block %+v", st.Protection.LastBlock)
				case tc.lastBlock != 0 && (st.Protection.LastBlock == nil || st.Protection.LastBlock.ID != tc.lastBlock):
					t.Errorf("status shows last block %+v, want alert %d", st.Protection.LastBlock, tc.lastBlock)
				}
			}

			// The event stream carries the same alerts and no others.
			ctx, cancel := context.WithCancel(context.WithValue(context.Background(), credKey{}, Cred{UID: tc.uid, GID: tc.uid}))
			req := httptest.NewRequestWithContext(ctx, http.MethodGet, "http://agent/v1/events", nil)
			rec := &syncRecorder{header: http.Header{}}
			done := make(chan struct{})
			go func() { s.Handler().ServeHTTP(rec, req); close(done) }()
			for b.hub.Len() == 0 {
				time.Sleep(time.Millisecond)
			}
			for i := len(b.alerts) - 1; i >= 0; i-- {
				al := b.alerts[i]
				b.hub.Publish(api.Event{Type: api.EventAlert, Alert: &al, Users: b.users[i]})
			}
			// A status event after the alerts: once it is written, every
			// alert before it was written or left out.
			st0 := b.Status()
			b.hub.Publish(api.Event{Type: api.EventStatus, Status: &st0})
			deadline := time.Now().Add(10 * time.Second)
			for strings.Count(rec.String(), `"type":"status"`) < 2 {
				if time.Now().After(deadline) {
					t.Fatalf("the stream did not carry the status after the alerts:\n%s", rec.String())
				}
				time.Sleep(time.Millisecond)
			}
			cancel()
			<-done
			got = nil
			for _, line := range strings.Split(strings.TrimSpace(rec.String()), "\n") {
				var ev api.Event
				if err := json.Unmarshal([]byte(line), &ev); err != nil {
					t.Fatalf("event %q: %v", line, err)
				}
				if ev.Alert != nil {
					got = append(got, ev.Alert.ID)
				}
			}
			slices.Reverse(got)
			if !slices.Equal(got, tc.want) {
				t.Errorf("alert events %v, want %v", got, tc.want)
			}
			if strings.Contains(rec.String(), "users") {
				t.Errorf("the stream shows who ran a program: %s", rec.String())
			}
		})
	}
}

// syncRecorder is an http.ResponseWriter whose body a test may read while
// the handler writes.
type syncRecorder struct {
	header http.Header
	mu     sync.Mutex // protects body
	body   strings.Builder
}

func (r *syncRecorder) Header() http.Header { return r.header }
func (r *syncRecorder) WriteHeader(int)     {}
func (r *syncRecorder) Flush()              {}
func (r *syncRecorder) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.body.Write(p)
}
func (r *syncRecorder) String() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.body.String()
}
