package upload_test

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/cloud"
	"github.com/cloudprotect/cloudprotect/agent/upload/uploadtest"
	"github.com/cloudprotect/cloudprotect/server"
	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/server/verdict"
)

// realServer is the reference cloud on loopback over SQLite in a temporary
// folder. loseAnswers makes it count a batch and then drop the connection
// instead of answering, as a network failure after the server committed
// would.
type realServer struct {
	url         string
	store       store.Store
	loseAnswers atomic.Int32
}

func newRealServer(t testing.TB, now func() time.Time) *realServer {
	t.Helper()
	ctx := context.Background()
	st, err := store.Open(ctx, "sqlite:"+filepath.Join(t.TempDir(), "cloud.db"), nil)
	if err != nil {
		t.Fatalf("open store: %v", err)
	}
	t.Cleanup(func() { st.Close() })
	rs := &realServer{store: st}
	h := server.New(server.Config{Store: st, Rules: verdict.Default(), Now: now})
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/statistics" && rs.loseAnswers.Load() > 0 {
			rs.loseAnswers.Add(-1)
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, r)
			if conn, _, err := http.NewResponseController(w).Hijack(); err == nil {
				conn.Close()
			}
			return
		}
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(ts.Close)
	rs.url = ts.URL
	return rs
}

// credentials reads the current installation from the uploader's state.
func credentials(t *testing.T, path string) cloud.Credentials {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Installation *cloud.Credentials `json:"installation"`
	}
	if err := json.Unmarshal(data, &st); err != nil || st.Installation == nil {
		t.Fatalf("no installation in the state (%v): %s", err, data)
	}
	return *st.Installation
}

func TestEndToEndWithTheRealServer(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := newHarness(t, "", nil)
	rs := newRealServer(t, h.clk.Now)
	h.server.Store(rs.url)
	h.start()
	h.idle()

	// Register and send: the server holds exactly those hashes with
	// those counts.
	const n = 1200
	for i := range n {
		h.q.Add(uploadtest.Record(i, uint64(i%7+1), start.Add(-time.Hour)))
	}
	if sent, err := h.sendNow(); err != nil || sent != n {
		t.Fatalf("SendNow = %d, %v; want %d", sent, err, n)
	}
	creds := credentials(t, h.state)
	stats, err := rs.store.Stats(ctx, creds.InstallationID)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int64{}
	for i := range n {
		want[uploadtest.Record(i, 0, start).SHA256] = int64(i%7 + 1)
	}
	if len(stats) != n {
		t.Fatalf("server holds %d hashes; want %d", len(stats), n)
	}
	for _, s := range stats {
		if want[s.SHA256] != s.ExecCount {
			t.Fatalf("server counts %d executions of %s; want %d", s.ExecCount, s.SHA256, want[s.SHA256])
		}
	}

	// The answer to a batch is lost after the server counted it: the
	// retry carries the same ID and is not counted again.
	rs.loseAnswers.Store(2)
	h.q.Add(uploadtest.Record(0, 5, start))
	h.up.SendNow(ctx) // may fail: the answer was lost
	h.runFor(time.Hour)
	h.idle()
	if p := h.q.Pending(); p != 0 {
		t.Fatalf("%d records still pending after the retry", p)
	}
	stats, _ = rs.store.Stats(ctx, creds.InstallationID)
	for _, s := range stats {
		if s.SHA256 == uploadtest.Record(0, 0, start).SHA256 && s.ExecCount != 1+5 {
			t.Fatalf("after a retried batch the server counts %d executions; want 6 (counted once)", s.ExecCount)
		}
	}

	// Leave: the server confirms the deletion and holds nothing of the
	// installation.
	h.allowed.Store(false)
	if err := h.inst.Leave(); err != nil {
		t.Fatal(err)
	}
	h.q.Purge()
	eventually(t, "the deletion is confirmed", func() bool { return !h.up.Status().DeletionPending })
	stats, err = rs.store.Stats(ctx, creds.InstallationID)
	if err != nil || len(stats) != 0 {
		t.Fatalf("after leaving the server holds %d statistics (%v); want none", len(stats), err)
	}
	tok := sha256.Sum256([]byte(creds.Token))
	residue, err := rs.store.Residue(ctx, creds.InstallationID, tok[:])
	if err != nil {
		t.Fatal(err)
	}
	for table, rows := range residue {
		if rows != 0 {
			t.Errorf("table %s still holds %d rows of the installation", table, rows)
		}
	}
	if exists, _ := rs.store.InstallationExists(ctx, creds.InstallationID); exists {
		t.Error("the installation still exists")
	}
	if data, _ := os.ReadFile(h.state); strings.Contains(string(data), creds.Token) {
		t.Error("the old token is still in the state file")
	}
}

// TestEnrollSecretWithTheRealServer registers with a private network's
// enrollment secret: without it, or when the policy's file cannot be
// read, nothing is registered and nothing is sent.
func TestEnrollSecretWithTheRealServer(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	const secret = "the organisation's enrollment secret"
	for _, tc := range []struct {
		name    string
		secret  func() (string, error)
		wantErr string
	}{
		{"right secret", func() (string, error) { return secret, nil }, ""},
		{"no secret", nil, "403"},
		{"wrong secret", func() (string, error) { return "guess", nil }, "enrollment secret missing or wrong"},
		{"unreadable file", func() (string, error) { return "", os.ErrPermission }, "permission denied"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, "", func(o *options) { o.cloud.EnrollSecret = tc.secret })
			st, err := store.Open(ctx, "sqlite:"+filepath.Join(t.TempDir(), "cloud.db"), nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { st.Close() })
			ts := httptest.NewServer(server.New(server.Config{Store: st, Rules: verdict.Default(), Now: h.clk.Now, EnrollSecret: []byte(secret)}))
			t.Cleanup(ts.Close)
			h.server.Store(ts.URL)
			h.start()
			h.idle()
			h.q.Add(uploadtest.Record(1, 1, start.Add(-time.Hour)))
			sent, err := h.sendNow()
			if tc.wantErr == "" {
				if err != nil || sent != 1 {
					t.Fatalf("SendNow = %d, %v; want 1 sent", sent, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || sent != 0 {
				t.Fatalf("SendNow = %d, %v; want nothing sent and an error about %q", sent, err, tc.wantErr)
			}
			if h.up.Status().Registered || h.q.Pending() != 1 {
				t.Fatalf("registered %v, %d pending; want not registered and the record kept", h.up.Status().Registered, h.q.Pending())
			}
		})
	}
}
