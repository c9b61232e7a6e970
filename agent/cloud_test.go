package agent

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/cloud"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/internal/spawn"
	"github.com/cloudprotect/cloudprotect/agent/testenv"
	"github.com/cloudprotect/cloudprotect/server"
	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/server/verdict"
	"github.com/cloudprotect/cloudprotect/wire"
)

// installation reads the agent's registered installation from its state.
func installation(t *testing.T, stateDir string) (id, token string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(stateDir, cloud.StateFile))
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Installation *struct {
			InstallationID string `json:"installation_id"`
			Token          string `json:"token"`
		} `json:"installation"`
	}
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	if st.Installation == nil {
		return "", ""
	}
	return st.Installation.InstallationID, st.Installation.Token
}

// The whole round trip of issue 5 on loopback: participate, run programs,
// send, and the real server holds exactly those hashes and counts; a file
// the network knows as malicious raises an alert; leaving deletes
// everything the server holds from this installation.
func TestCloudRoundTrip(t *testing.T) {
	testenv.NeedRoot(t)
	ctx := context.Background()
	st, err := store.Open(ctx, "sqlite:"+filepath.Join(t.TempDir(), "cloud.db"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	cloud := httptest.NewServer(server.New(server.Config{Store: st, Rules: verdict.Default()}))
	defer cloud.Close()

	work := t.TempDir()
	progA, sumA := uniqueProgram(t, work, "alpha")
	progB, sumB := uniqueProgram(t, work, "beta")
	bad, sumBad := uniqueProgram(t, work, "dropper")
	if _, err := st.ImportLists(ctx, "test feed", map[string][]string{store.ListMalicious: {sumBad}}, false, time.Now()); err != nil {
		t.Fatal(err)
	}

	a := startAgentWith(t, ModeUser, "", func(c *Config) { c.Server = cloud.URL })
	evctx, stopEvents := context.WithCancel(ctx)
	defer stopEvents()
	alerts := make(chan api.Alert, 8)
	go a.client.Events(evctx, func(ev api.Event) error {
		if ev.Alert != nil {
			alerts <- *ev.Alert
		}
		return nil
	})
	if _, err := a.client.SetParticipation(ctx, api.ParticipationRequest{Participate: true, StatementVersion: consent.StatementVersion, Via: "cli"}); err != nil {
		t.Fatal(err)
	}
	runN(t, progA, 4)
	runN(t, progB, 2)
	waitRecord(t, a.client, "alpha ×4", func(r wire.Record) bool { return r.SHA256 == sumA && r.ExecCount == 4 })
	waitRecord(t, a.client, "beta ×2", func(r wire.Record) bool { return r.SHA256 == sumB && r.ExecCount == 2 })

	res, err := a.client.Upload(ctx)
	if err != nil {
		t.Fatalf("send: %v", err)
	}
	if res.Sent == 0 {
		t.Fatalf("send: %+v", res)
	}
	id, token := installation(t, filepath.Join(a.dir, "state"))
	if id == "" {
		t.Fatal("no installation registered after sending")
	}
	stats, err := st.Stats(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]int64{}
	for _, s := range stats {
		got[s.SHA256] = s.ExecCount
	}
	if got[sumA] != 4 || got[sumB] != 2 {
		t.Errorf("server holds alpha×%d beta×%d, want 4 and 2", got[sumA], got[sumB])
	}
	// Sending again sends nothing new and counts nothing twice.
	if _, err := a.client.Upload(ctx); err != nil {
		t.Fatal(err)
	}
	stats, _ = st.Stats(ctx, id)
	for _, s := range stats {
		if s.SHA256 == sumA && s.ExecCount != 4 {
			t.Errorf("after a second send alpha×%d", s.ExecCount)
		}
	}

	// A program the network knows as malicious raises an alert.
	runN(t, bad, 1)
	select {
	case al := <-alerts:
		if al.SHA256 != sumBad || al.Verdict != wire.VerdictMalicious || al.Program != "dropper" {
			t.Errorf("alert = %+v", al)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("no alert for the malicious program within 15s")
	}

	// Leaving: the local queue is empty, and the server forgets us.
	if _, err := a.client.SetParticipation(ctx, api.ParticipationRequest{Participate: false, Via: "cli"}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		s, _ := a.client.Status(ctx)
		if !s.Upload.DeletionPending && s.Queue.Records == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after leaving: deletion pending %v, queue %+v, last error %q", s.Upload.DeletionPending, s.Queue, s.Upload.LastError)
		}
		time.Sleep(50 * time.Millisecond)
	}
	th := sha256.Sum256([]byte(token))
	residue, err := st.Residue(ctx, id, th[:])
	if err != nil {
		t.Fatal(err)
	}
	for table, n := range residue {
		if n != 0 {
			t.Errorf("after deletion the server still holds %d rows of the installation in %s", n, table)
		}
	}
	if exists, err := st.InstallationExists(ctx, id); err != nil || exists {
		t.Errorf("installation still exists after leaving (%v)", err)
	}
	if stats, _ := st.Stats(ctx, id); len(stats) != 0 {
		t.Errorf("server still holds %d records of the installation", len(stats))
	}
	if nid, _ := installation(t, filepath.Join(a.dir, "state")); nid != "" {
		t.Errorf("the installation ID was kept after leaving: %s", nid)
	}
}

// With the cloud refusing batches, a program run 1,001 times before and
// 1,001 times after the batch was cut shows in the queue twice: in the
// batch waiting for the cloud, and after it; the status counts both, and
// once the cloud takes batches again it receives all 2,002.
func TestQueueShowsEverythingWaiting(t *testing.T) {
	testenv.NeedRoot(t)
	ctx := context.Background()
	st, err := store.Open(ctx, "sqlite:"+filepath.Join(t.TempDir(), "cloud.db"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var refuse atomic.Bool
	refuse.Store(true)
	srv := server.New(server.Config{Store: st, Rules: verdict.Default()})
	cloud := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if refuse.Load() && r.URL.Path == "/v1/statistics" {
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return
		}
		srv.ServeHTTP(w, r)
	}))
	defer cloud.Close()
	a := startAgentWith(t, ModeUser, "", func(c *Config) { c.Server = cloud.URL })
	participateAndWatch(t, a)
	prog, sum := tiny(t, t.TempDir(), "twice", false)
	run := func() {
		t.Helper()
		if res, err := spawn.Run(ctx, spawn.Config{Path: prog, Workers: 1, Count: 1001}); err != nil || res.Execs != 1001 {
			t.Fatalf("run: %+v, %v", res, err)
		}
	}
	run()
	waitExecs(t, a.queue, sum, 1001, "the first 1,001 runs")
	if _, err := a.client.Upload(ctx); err == nil {
		t.Fatal("the cloud took a batch while refusing them")
	}
	if s := a.Status().Queue; s.Batch == 0 {
		t.Fatalf("no batch waiting after a refused upload: %+v", s)
	}
	run()
	waitExecs(t, a.queue, sum, 2002, "all 2,002 runs")

	q, err := a.client.Queue(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var inBatch, after uint64
	var execs uint64
	for _, r := range q.Records {
		execs += r.ExecCount
		if r.SHA256 != sum {
			continue
		}
		if r.InBatch {
			inBatch += r.ExecCount
		} else {
			after += r.ExecCount
		}
	}
	if inBatch != 1001 || after != 1001 || q.BatchID == "" {
		t.Errorf("preview: %d in the batch %q, %d after it; want 1,001 and 1,001", inBatch, q.BatchID, after)
	}
	status := a.Status().Queue
	if q.Totals.Executions != execs || status.Executions != execs || status.BatchExecutions != q.Totals.BatchExecutions ||
		status.Pending != q.Totals.Programs || status.Batch != q.Totals.BatchRecords {
		t.Errorf("status %+v and totals %+v disagree with the %d executions listed", status, q.Totals, execs)
	}

	refuse.Store(false)
	for range 2 { // the batch waiting, then the rest
		if _, err := a.client.Upload(ctx); err != nil {
			t.Fatalf("send: %v", err)
		}
	}
	id, _ := installation(t, filepath.Join(a.dir, "state"))
	stats, err := st.Stats(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	var cloudRuns int64
	for _, s := range stats {
		if s.SHA256 == sum {
			cloudRuns = s.ExecCount
		}
	}
	if cloudRuns != 2002 {
		t.Errorf("the cloud counts %d runs, want 2,002", cloudRuns)
	}
	if q, err := a.client.Queue(ctx); err != nil || len(q.Records) != 0 {
		t.Errorf("after sending: %d records waiting (%v)", len(q.Records), err)
	}
}
