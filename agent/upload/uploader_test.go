package upload_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/cloud"
	"github.com/cloudprotect/cloudprotect/agent/upload"
	"github.com/cloudprotect/cloudprotect/agent/upload/uploadtest"
	"github.com/cloudprotect/cloudprotect/wire"
)

// wantAllDelivered checks that the server counted every record of the
// first n files exactly once with execs executions, and that the queue
// holds nothing.
func wantAllDelivered(t *testing.T, s *scripted, h *harness, n int, execs uint64) {
	t.Helper()
	counts := s.hashCounts()
	if len(counts) != n {
		t.Errorf("server holds %d hashes; want %d", len(counts), n)
	}
	for i := range n {
		r := uploadtest.Record(i, execs, start)
		if got := counts[r.SHA256]; got != execs {
			t.Errorf("server counted %d executions of file %d; want %d", got, i, execs)
			break
		}
	}
	if p := h.q.Pending(); p != 0 {
		t.Errorf("queue still holds %d records", p)
	}
	if d := h.q.Dropped(); d != 0 {
		t.Errorf("queue dropped %d records; want none", d)
	}
}

func TestSendNowSendsEverythingInBatches(t *testing.T) {
	t.Parallel()
	s := newScripted(t, nil)
	h := newHarness(t, s.srv.URL, nil)
	s.clk = h.clk
	h.start()
	h.idle()
	h.addRecords(0, 10_500, 2)

	sent, err := h.sendNow()
	if err != nil || sent != 10_500 {
		t.Fatalf("SendNow = %d, %v; want 10500, nil", sent, err)
	}
	wantAllDelivered(t, s, h, 10_500, 2)
	if got := s.postCount(); got != 3 {
		t.Errorf("%d batches posted; want 3 (at most 5,000 records each)", got)
	}
	if got := s.registrations(); got != 1 {
		t.Errorf("%d registrations; want 1", got)
	}
	st := h.up.Status()
	if !st.Registered || st.RecordsSent != 10_500 || st.LastUpload == nil || st.LastError != "" {
		t.Errorf("Status = %+v; want registered, 10500 sent, a last upload, no error", st)
	}
	fi, err := os.Stat(h.state)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("state file: %v, mode %v; want 0600", err, fi.Mode())
	}

	// A restart keeps the registration.
	h.stop()
	h.open()
	h.start()
	h.idle()
	h.addRecords(10_500, 10, 1)
	if sent, err := h.sendNow(); err != nil || sent != 10 {
		t.Fatalf("SendNow after restart = %d, %v", sent, err)
	}
	if got := s.registrations(); got != 1 {
		t.Errorf("%d registrations after a restart; want 1", got)
	}
}

func TestFaultsLoseNothingAndDoNotBusyLoop(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		mode string
		// maxPosts bounds the requests during the two hours of the fault.
		minPosts, maxPosts int
		// minGap is the least fake time between two attempts.
		minGap time.Duration
	}{
		// Backoff 30 s, 1, 2, 4, 8, 16, 30, 30 min... (jitter near the top).
		{name: "500", mode: mode500, minPosts: 6, maxPosts: 10, minGap: 29 * time.Second},
		{name: "503 without Retry-After", mode: mode503, minPosts: 6, maxPosts: 10, minGap: 29 * time.Second},
		{name: "connection reset", mode: modeReset, minPosts: 6, maxPosts: 10, minGap: 29 * time.Second},
		{name: "slow answers", mode: modeSlow, minPosts: 6, maxPosts: 10, minGap: 29 * time.Second},
		{name: "garbage body", mode: modeGarbage, minPosts: 6, maxPosts: 10, minGap: 29 * time.Second},
		{name: "oversized body", mode: modeOversized, minPosts: 6, maxPosts: 10, minGap: 29 * time.Second},
		{name: "wrong content type", mode: modeWrongType, minPosts: 6, maxPosts: 10, minGap: 29 * time.Second},
		{name: "429 Retry-After seconds", mode: mode429, minPosts: 50, maxPosts: 61, minGap: 120 * time.Second},
		{name: "503 Retry-After date", mode: mode503Date, minPosts: 20, maxPosts: 25, minGap: 300 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			s := newScripted(t, nil)
			h := newHarness(t, s.srv.URL, func(o *options) {
				if tt.mode == modeSlow {
					o.cloud.Client.ResponseHeaderTimeout = 2 * time.Second
				}
			})
			s.clk = h.clk
			h.start()
			h.idle()
			// Registered and one batch through before the fault.
			h.addRecords(0, 10, 1)
			if _, err := h.sendNow(); err != nil {
				t.Fatal(err)
			}
			s.setMode(tt.mode)
			h.addRecords(10, 1200, 3)
			before := s.postCount()
			h.up.Nudge()
			h.runFor(2 * time.Hour)
			// The HTTP client may resend a request with an Idempotency-Key
			// once at the same moment when the connection died before
			// any answer: one attempt.
			posts := slices.Compact(s.postTimes()[before:])
			if len(posts) < tt.minPosts || len(posts) > tt.maxPosts {
				t.Errorf("%d attempts in two hours of %s; want %d to %d", len(posts), tt.mode, tt.minPosts, tt.maxPosts)
			}
			for i := 1; i < len(posts); i++ {
				if gap := posts[i].Sub(posts[i-1]); gap < tt.minGap {
					t.Errorf("attempt %d came %s after the previous one; want at least %s", i, gap, tt.minGap)
					break
				}
			}
			st := h.up.Status()
			if st.LastError == "" || st.NextAttempt == nil || !st.NextAttempt.After(h.clk.Now().Add(-time.Second)) {
				t.Errorf("Status during the fault = %+v; want the error and a next attempt", st)
			}

			s.setMode(modeOK)
			h.runFor(2 * time.Hour)
			h.idle()
			for i := range 10 {
				if got := s.hashCounts()[uploadtest.Record(i, 1, start).SHA256]; got != 1 {
					t.Fatalf("file %d counted %d times; want 1", i, got)
				}
			}
			counts := s.hashCounts()
			if len(counts) != 1210 {
				t.Errorf("server holds %d hashes; want 1210", len(counts))
			}
			for i := 10; i < 1210; i++ {
				if got := counts[uploadtest.Record(i, 3, start).SHA256]; got != 3 {
					t.Fatalf("file %d: %d executions counted; want 3 (a retried batch is counted once)", i, got)
				}
			}
			if h.q.Pending() != 0 || h.q.Dropped() != 0 {
				t.Errorf("queue: %d pending, %d dropped; want none", h.q.Pending(), h.q.Dropped())
			}
			if st := h.up.Status(); st.LastError != "" || st.BatchesDropped != 0 {
				t.Errorf("Status after recovery = %+v; want no error, nothing dropped", st)
			}
		})
	}
}

func TestServerDownThenBack(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens: connections are refused

	h := newHarness(t, "http://"+addr, nil)
	h.addRecords(0, 100, 1)
	h.start()
	if _, err := h.sendNow(); err == nil {
		t.Fatal("SendNow to a closed port succeeded")
	}
	h.runFor(3 * time.Hour)
	st := h.up.Status()
	if st.Registered || st.LastError == "" || st.NextAttempt == nil {
		t.Fatalf("Status while down = %+v; want unregistered, an error, a next attempt", st)
	}
	if wait := st.NextAttempt.Sub(h.clk.Now()); wait > 31*time.Minute {
		t.Errorf("next attempt in %s; want at most 30 min", wait)
	}

	ln, err = net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("cannot listen again on %s: %v", addr, err)
	}
	s := &scripted{t: t, clk: h.clk, tokens: map[string]string{}, batches: map[string]bool{},
		counts: map[string]uint64{}, deleted: map[string]bool{}, verdicts: map[string]string{}}
	s.setMode(modeOK)
	s.srv = httptest.NewUnstartedServer(s)
	s.srv.Listener.Close()
	s.srv.Listener = ln
	s.srv.Start()
	t.Cleanup(s.srv.Close)
	h.runFor(time.Hour)
	h.idle()
	wantAllDelivered(t, s, h, 100, 1)
}

func TestRedirectIsNotFollowed(t *testing.T) {
	t.Parallel()
	var elsewhere atomic.Int32
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		elsewhere.Add(1)
	}))
	defer other.Close()
	s := newScripted(t, nil)
	h := newHarness(t, s.srv.URL, nil)
	s.clk = h.clk
	s.redirectTo = other.URL + "/steal"
	h.start()
	h.idle()
	h.addRecords(0, 10, 1)
	if _, err := h.sendNow(); err != nil {
		t.Fatal(err)
	}
	s.setMode(modeRedirect)
	h.addRecords(10, 10, 1)
	_, err := h.sendNow()
	var se *cloud.StatusError
	if !errors.As(err, &se) || se.Code != http.StatusTemporaryRedirect {
		t.Fatalf("SendNow with a redirect = %v; want a StatusError 307", err)
	}
	h.runFor(time.Hour)
	if n := elsewhere.Load(); n != 0 {
		t.Fatalf("the other host received %d requests; want none", n)
	}
	s.setMode(modeOK)
	h.runFor(time.Hour)
	h.idle()
	wantAllDelivered(t, s, h, 20, 1)
}

func TestUntrustedCertificateIsRefused(t *testing.T) {
	t.Parallel()
	s := &scripted{t: t, tokens: map[string]string{}, batches: map[string]bool{},
		counts: map[string]uint64{}, deleted: map[string]bool{}, verdicts: map[string]string{}}
	s.setMode(modeOK)
	s.srv = httptest.NewTLSServer(s)
	s.srv.Config.ErrorLog = newDiscardLog()
	defer s.srv.Close()

	h := newHarness(t, s.srv.URL, nil)
	s.clk = h.clk
	h.start()
	h.idle()
	h.addRecords(0, 10, 1)
	_, err := h.sendNow()
	var ue *tls.CertificateVerificationError
	if !errors.As(err, &ue) {
		t.Fatalf("SendNow to an untrusted certificate = %v; want a certificate verification error", err)
	}
	if n := s.totalRequests(); n != 0 {
		t.Fatalf("the server received %d requests; want none", n)
	}
	h.stop()

	// With the server's root trusted, the same records go through.
	roots := x509.NewCertPool()
	roots.AddCert(s.srv.Certificate())
	h.opts.cloud.Client.TLS = &tls.Config{RootCAs: roots}
	h.open()
	h.start()
	if _, err := h.sendNow(); err != nil {
		t.Fatalf("SendNow with the root trusted: %v", err)
	}
	wantAllDelivered(t, s, h, 10, 1)

	// Turning verification off is refused.
	if _, err := cloud.NewClient(s.srv.URL, cloud.ClientOptions{TLS: &tls.Config{InsecureSkipVerify: true}}); err == nil {
		t.Error("NewClient with InsecureSkipVerify succeeded")
	}
}

// A record the server refuses is singled out: the batches holding it are
// sent again in halves until it is alone, and only it is dropped; every
// other record arrives, and the send reports exactly what was sent and
// what was refused.
func TestRefusedRecordsAreSingledOut(t *testing.T) {
	t.Parallel()
	s := newScripted(t, nil)
	h := newHarness(t, s.srv.URL, nil)
	s.clk = h.clk
	const n = 300
	bad := map[string]bool{
		uploadtest.Record(37, 1, start).SHA256:  true,
		uploadtest.Record(250, 1, start).SHA256: true,
	}
	s.mu.Lock()
	s.refuse = bad
	s.mu.Unlock()
	s.setMode(modeRefuseSome)
	h.start()
	h.idle()
	h.addRecords(0, n, 1)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	res, err := h.up.SendNow(ctx)
	if err != nil {
		t.Fatalf("SendNow = %v; a refused record is not an error of the upload", err)
	}
	if res.Sent != n-2 || res.Refused != 2 || !strings.Contains(res.RefusedReason, "records[") ||
		!strings.Contains(res.Message, "refused 2 records") {
		t.Errorf("result %+v; want %d sent, 2 refused with the server's reason", res, n-2)
	}
	if h.q.Dropped() != 2 || h.q.Pending() != 0 {
		t.Errorf("queue: %d dropped, %d pending; want 2, 0", h.q.Dropped(), h.q.Pending())
	}
	counts := s.hashCounts()
	for i := range n {
		sum := uploadtest.Record(i, 1, start).SHA256
		if got := counts[sum]; !bad[sum] && got != 1 {
			t.Errorf("record %d counted %d times by the server; want 1", i, got)
		}
	}
	if st := h.up.Status(); st.RecordsRefused != 2 {
		t.Errorf("status %+v; want 2 records refused", st)
	}
	t.Logf("%d records with 2 refused: %d requests", n, s.postCount())

	// A server that refuses everything: every record is dropped alone,
	// and the send says so.
	s.setMode(mode422)
	h.addRecords(n, 10, 1)
	res, err = h.up.SendNow(ctx)
	if err != nil || res.Sent != 0 || res.Refused != 10 {
		t.Errorf("result %+v, %v; want 10 refused", res, err)
	}
	s.setMode(modeOK)
	h.addRecords(n+10, 5, 1)
	if sent, err := h.sendNow(); err != nil || sent != 5 {
		t.Fatalf("SendNow after = %d, %v", sent, err)
	}
}

// Something between the agent and the server with a smaller body limit
// answers 413: the batch is sent again in smaller ones and nothing is
// dropped.
func TestTooLargeForTheServerIsSplit(t *testing.T) {
	t.Parallel()
	s := newScripted(t, nil)
	h := newHarness(t, s.srv.URL, nil)
	s.clk = h.clk
	s.mu.Lock()
	s.maxBody = 16 << 10
	s.mu.Unlock()
	s.setMode(modeSmallBodies)
	h.start()
	h.idle()
	h.addRecords(0, 2000, 1)
	sent, err := h.sendNow()
	if err != nil || sent != 2000 {
		t.Fatalf("SendNow = %d, %v; want 2000", sent, err)
	}
	if h.q.Dropped() != 0 {
		t.Errorf("%d records dropped; want none", h.q.Dropped())
	}
	wantAllDelivered(t, s, h, 2000, 1)
}

// A batch never exceeds the server's limit on its decoded size: records
// with long paths that compress well (2,400 of 4 KiB, 10 MiB of JSON, a
// few hundred KiB of gzip) go in batches of at most 8 MiB, and all
// arrive. (The server refused the whole batch before.)
func TestBatchesWithinDecodedLimit(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", nil)
	rs := newRealServer(t, h.clk.Now)
	h.server.Store(rs.url)
	h.start()
	h.idle()
	const n = 2400
	for i := range n {
		r := uploadtest.Record(i, 1, start.Add(-time.Hour))
		r.Path = "/opt/" + strings.Repeat("a", 4000) + fmt.Sprintf("/%d", i)
		h.q.Add(r)
	}
	if sent, err := h.sendNow(); err != nil || sent != n {
		t.Fatalf("SendNow = %d, %v; want %d", sent, err, n)
	}
	if d := h.q.Dropped(); d != 0 {
		t.Fatalf("%d records dropped; want none", d)
	}
	stats, err := rs.store.Stats(context.Background(), credentials(t, h.state).InstallationID)
	if err != nil || len(stats) != n {
		t.Fatalf("the server holds %d records (%v); want %d", len(stats), err, n)
	}
}

func TestUnknownTokenRegistersAgain(t *testing.T) {
	t.Parallel()
	s := newScripted(t, nil)
	h := newHarness(t, s.srv.URL, nil)
	s.clk = h.clk
	h.start()
	h.idle()
	h.addRecords(0, 10, 1)
	if _, err := h.sendNow(); err != nil {
		t.Fatal(err)
	}
	s.setMode(modeForgetToken)
	h.addRecords(10, 10, 1)
	if sent, err := h.sendNow(); err != nil || sent != 10 {
		t.Fatalf("SendNow after the server forgot the token = %d, %v; want 10, nil", sent, err)
	}
	if got := s.registrations(); got != 2 {
		t.Errorf("%d registrations; want 2", got)
	}
	wantAllDelivered(t, s, h, 20, 1)
}

func TestNothingIsSentWithoutConsent(t *testing.T) {
	t.Parallel()
	s := newScripted(t, nil)
	h := newHarness(t, s.srv.URL, nil)
	s.clk = h.clk
	h.allowed.Store(false)
	h.addRecords(0, 2000, 1)
	h.start()
	h.up.Nudge()
	if _, err := h.sendNow(); !errors.Is(err, cloud.ErrNotParticipating) {
		t.Fatalf("SendNow without consent = %v; want ErrNotParticipating", err)
	}
	if _, err := h.inst.Lookup(context.Background(), []string{uploadtest.Record(0, 1, start).SHA256}); !errors.Is(err, cloud.ErrNotParticipating) {
		t.Fatalf("Lookup without consent = %v; want ErrNotParticipating", err)
	}
	// Nothing is scheduled: time passes without any timer to fire.
	h.settle(0)
	if n := h.clk.Timers(); n != 0 {
		t.Errorf("%d timers pending without consent and without deletions; want none", n)
	}
	h.clk.Advance(3 * time.Hour)
	h.settle(0)
	if n := s.totalRequests(); n != 0 {
		t.Fatalf("the server received %d requests without consent; want none", n)
	}
	if _, err := os.Stat(h.state); !os.IsNotExist(err) {
		t.Errorf("state file exists without consent (err %v): nothing should be registered", err)
	}

	h.allowed.Store(true)
	h.wake()
	h.runFor(time.Minute)
	h.idle()
	wantAllDelivered(t, s, h, 2000, 1)
}

func TestScheduleIntervalAndNudge(t *testing.T) {
	t.Parallel()
	s := newScripted(t, nil)
	h := newHarness(t, s.srv.URL, nil)
	s.clk = h.clk
	h.start()
	h.idle() // nothing pending at start: next upload in 15 min

	h.addRecords(0, 999, 1)
	h.up.Nudge()
	h.runFor(14 * time.Minute)
	if n := s.postCount(); n != 0 {
		t.Fatalf("%d batches sent before the interval with 999 pending; want 0", n)
	}
	h.addRecords(999, 1, 1)
	h.up.Nudge()
	h.settle(0)
	if n := s.postCount(); n != 1 {
		t.Fatalf("%d batches sent after a nudge with 1,000 pending; want 1", n)
	}
	h.idle()
	h.addRecords(1000, 5, 1)
	h.runFor(14 * time.Minute)
	if n := s.postCount(); n != 1 {
		t.Fatalf("%d batches sent within 14 min of the last; want 1", n)
	}
	h.runFor(2 * time.Minute)
	h.idle()
	if n := s.postCount(); n != 2 {
		t.Fatalf("%d batches sent after the interval; want 2", n)
	}
	wantAllDelivered(t, s, h, 1005, 1)
}

func TestOversizedBatchIsCutSmaller(t *testing.T) {
	t.Parallel()
	s := newScripted(t, nil)
	h := newHarness(t, s.srv.URL, func(o *options) { o.MaxBatchBytes = 20_000 })
	s.clk = h.clk
	h.start()
	h.idle()
	h.addRecords(0, 2000, 1)
	if sent, err := h.sendNow(); err != nil || sent != 2000 {
		t.Fatalf("SendNow = %d, %v", sent, err)
	}
	if n := s.postCount(); n < 7 {
		t.Errorf("%d batches for 2,000 records under 20 kB; want smaller batches", n)
	}
	wantAllDelivered(t, s, h, 2000, 1)
}

func TestServerChangeDeletesTheOldInstallation(t *testing.T) {
	t.Parallel()
	a := newScripted(t, nil)
	b := newScripted(t, nil)
	h := newHarness(t, a.srv.URL, nil)
	a.clk, b.clk = h.clk, h.clk
	h.start()
	h.idle()
	h.addRecords(0, 5, 1)
	if _, err := h.sendNow(); err != nil {
		t.Fatal(err)
	}
	h.server.Store(b.srv.URL)
	h.addRecords(5, 5, 1)
	if _, err := h.sendNow(); err != nil {
		t.Fatal(err)
	}
	h.runFor(time.Minute)
	h.idle()
	if b.registrations() != 1 || len(b.hashCounts()) != 5 {
		t.Errorf("new server: %d registrations, %d hashes; want 1, 5", b.registrations(), len(b.hashCounts()))
	}
	a.mu.Lock()
	deleted := a.deleted["inst-1"]
	a.mu.Unlock()
	if !deleted {
		t.Error("the installation on the old server was not deleted")
	}
	if h.up.Status().DeletionPending {
		t.Error("deletion still pending")
	}
}

func TestLookupSendsHashesAndKeepsOnlyWhatWasAsked(t *testing.T) {
	t.Parallel()
	s := newScripted(t, nil)
	h := newHarness(t, s.srv.URL, nil)
	s.clk = h.clk
	bad := uploadtest.Record(1, 1, start).SHA256
	s.verdicts[bad] = wire.VerdictMalicious
	h.start()
	reps, err := h.inst.Lookup(context.Background(), []string{uploadtest.Record(0, 1, start).SHA256, bad})
	if err != nil || len(reps) != 2 || reps[1].Verdict != wire.VerdictMalicious {
		t.Fatalf("Lookup = %+v, %v", reps, err)
	}
	if got := s.registrations(); got != 1 {
		t.Errorf("%d registrations; want 1", got)
	}
}

// After a failure, only a forced send (an administrator's) ignores the
// backoff: anyone else's gets a BackoffError and sends nothing, so no
// local user can make the agent hammer a failing server.
func TestSendRespectsBackoffUnlessForced(t *testing.T) {
	t.Parallel()
	srv := newScripted(t, nil)
	h := newHarness(t, srv.srv.URL, nil)
	srv.clk = h.clk
	h.addRecords(0, 10, 1)
	srv.setMode(mode500)
	h.start()
	if _, err := h.sendNow(); err == nil {
		t.Fatal("send to a failing server succeeded")
	}
	before := srv.totalRequests()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := h.up.Send(ctx, false)
	var be *upload.BackoffError
	if !errors.As(err, &be) || !be.Until.After(h.clk.Now()) {
		t.Fatalf("unforced send during the backoff = %v; want a BackoffError with a time ahead", err)
	}
	if n := srv.totalRequests(); n != before {
		t.Errorf("the unforced send made %d requests; want none", n-before)
	}
	srv.setMode(modeOK)
	if res, err := h.up.Send(ctx, true); err != nil || res.Sent != 10 {
		t.Fatalf("forced send = %+v, %v; want 10 sent", res, err)
	}
}

// The records of every batch go through Scrub before they are encoded:
// the agent anonymises paths once more there, with every name it knows by
// then.
func TestScrubBeforeSending(t *testing.T) {
	t.Parallel()
	s := newScripted(t, nil)
	h := newHarness(t, s.srv.URL, func(o *options) {
		o.Scrub = func(recs []wire.Record) []wire.Record {
			out := slices.Clone(recs)
			for i := range out {
				out[i].Path = strings.ReplaceAll(out[i].Path, "program", "~")
			}
			return out
		}
	})
	s.clk = h.clk
	var bodies []string
	s.mu.Lock()
	s.onBatch = func(b wire.Batch) {
		for _, r := range b.Records {
			bodies = append(bodies, r.Path)
		}
	}
	s.mu.Unlock()
	h.start()
	h.idle()
	h.addRecords(0, 4, 1)
	if sent, err := h.sendNow(); err != nil || sent != 4 {
		t.Fatalf("SendNow = %d, %v", sent, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range bodies {
		if strings.Contains(p, "program") {
			t.Errorf("path %q sent without Scrub", p)
		}
	}
	if len(bodies) != 4 {
		t.Errorf("%d records reached the server; want 4", len(bodies))
	}
}
