package upload_test

import (
	"encoding/json"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/upload"
)

// stateOnDisk reads the state file as JSON.
func stateOnDisk(t *testing.T, path string) map[string]any {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read state: %v", err)
	}
	var m map[string]any
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatalf("state is not JSON: %v", err)
	}
	return m
}

func TestLeaveDeletesTheInstallation(t *testing.T) {
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
	s.setMode(mode500) // the server cannot delete yet
	h.allowed.Store(false)
	if err := h.inst.Leave(); err != nil {
		t.Fatalf("Leave: %v", err)
	}
	h.q.Purge()
	// The request is on disk when Leave returns.
	m := stateOnDisk(t, h.state)
	dels, _ := m["deletions"].([]any)
	if len(dels) != 1 || m["installation"] != nil {
		t.Fatalf("state after Leave = %v; want one deletion request and no installation", m)
	}
	if !h.up.Status().DeletionPending || h.up.Status().Registered {
		t.Fatalf("Status after Leave = %+v; want a deletion pending, not registered", h.up.Status())
	}

	h.runFor(2 * time.Hour) // retried with backoff while the server fails
	s.mu.Lock()
	tries := len(s.deletes)
	s.mu.Unlock()
	if tries < 4 || tries > 12 {
		t.Errorf("%d deletion attempts in two hours of failures; want backoff (4 to 12)", tries)
	}

	// A restart keeps the request.
	h.stop()
	h.open()
	h.start()
	if !h.up.Status().DeletionPending {
		t.Fatal("deletion request lost by a restart")
	}
	s.setMode(modeOK)
	h.runFor(time.Hour)
	eventually(t, "the deletion is confirmed", func() bool { return !h.up.Status().DeletionPending })
	s.mu.Lock()
	deleted := s.deleted["inst-1"]
	s.mu.Unlock()
	if !deleted {
		t.Fatal("the server did not delete the installation")
	}
	if st := h.up.Status(); st.DeletionPending {
		t.Errorf("Status = %+v; want no deletion pending", st)
	}
	if dels, _ := stateOnDisk(t, h.state)["deletions"].([]any); len(dels) != 0 {
		t.Errorf("deletion requests left on disk: %v", dels)
	}

	// Participating again registers a new installation.
	h.allowed.Store(true)
	h.wake()
	h.addRecords(100, 3, 1)
	if _, err := h.sendNow(); err != nil {
		t.Fatal(err)
	}
	if got := s.registrations(); got != 2 {
		t.Errorf("%d registrations; want a new one after leaving", got)
	}
}

func TestDeletionAlreadyGoneIsConfirmed(t *testing.T) {
	t.Parallel()
	s := newScripted(t, nil)
	h := newHarness(t, s.srv.URL, nil)
	s.clk = h.clk
	h.start()
	h.idle()
	h.addRecords(0, 1, 1)
	if _, err := h.sendNow(); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	s.deleted["inst-1"] = true // deleted before, for instance by an earlier run
	s.mu.Unlock()
	h.allowed.Store(false)
	if err := h.inst.Leave(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a 404 (nothing stored under the ID) completes the deletion", func() bool { return !h.up.Status().DeletionPending })
}

func TestLeaveAbortsTheBatchInFlight(t *testing.T) {
	t.Parallel()
	s := newScripted(t, nil)
	// Only Leave can end the request held by the server: no timeout of
	// the client's does it first.
	h := newHarness(t, s.srv.URL, func(o *options) {
		o.cloud.Client.ResponseHeaderTimeout, o.cloud.Client.RequestTimeout = time.Hour, time.Hour
	})
	s.clk = h.clk
	h.start()
	h.idle()
	h.addRecords(0, 1, 1)
	if _, err := h.sendNow(); err != nil {
		t.Fatal(err)
	}
	gate := make(chan struct{})
	s.mu.Lock()
	s.gate = gate
	s.mu.Unlock()
	h.addRecords(1, 50, 1)
	result := make(chan error, 1)
	go func() { _, err := h.sendNow(); result <- err }()
	eventually(t, "the batch reaches the server", func() bool { return s.postCount() >= 2 })
	inflight := h.q.InFlight()
	if inflight == "" {
		t.Fatal("no batch in flight")
	}
	h.allowed.Store(false)
	if err := h.inst.Leave(); err != nil {
		t.Fatal(err)
	}
	h.q.Purge()
	select {
	case err := <-result:
		if err == nil {
			t.Fatal("SendNow succeeded although the person left while it was in flight")
		}
	case <-time.After(settleLimit):
		t.Fatal("Leave did not abort the request in flight")
	}
	close(gate)
	h.runFor(time.Hour)
	eventually(t, "the deletion is confirmed", func() bool { return !h.up.Status().DeletionPending })
	if n := len(h.q.Sent()); n != 1 {
		t.Errorf("%d records acknowledged; want only the first batch's 1", n)
	}
	if got := s.postCount(); got != 2 {
		t.Errorf("%d batches posted; want 2 (the aborted one is never sent again)", got)
	}
	if len(s.hashCounts()) > 1 {
		t.Errorf("the server counted the aborted batch: %d hashes", len(s.hashCounts()))
	}
	s.mu.Lock()
	deleted := s.deleted["inst-1"]
	s.mu.Unlock()
	if !deleted {
		t.Error("the installation was not deleted")
	}
}

// The server accepts a batch, and the person leaves in the moment between
// the answer's arrival and its use: the batch belongs to the installation
// left behind (whose deletion is queued), so it is neither acknowledged
// in the queue nor counted as sent. Without the uploader's check that the
// installation is still the one the batch was taken for, it was both.
func TestLeaveRightAfterTheAnswer(t *testing.T) {
	t.Parallel()
	s := newScripted(t, nil)
	h := newHarness(t, s.srv.URL, nil)
	s.clk = h.clk
	var leaveOnce sync.Once
	var leaveErr error
	upload.SetAfterPost(h.up, func() {
		leaveOnce.Do(func() {
			h.allowed.Store(false)
			leaveErr = h.inst.Leave()
		})
	})
	h.start()
	h.idle()
	h.addRecords(0, 10, 1)
	if _, err := h.sendNow(); err == nil {
		t.Fatal("SendNow reported success for a batch sent by an installation left meanwhile")
	}
	if leaveErr != nil {
		t.Fatal(leaveErr)
	}
	if n := s.postCount(); n != 1 {
		t.Fatalf("%d batches posted; want 1", n)
	}
	if sent := h.q.Sent(); len(sent) != 0 {
		t.Errorf("%d records acknowledged in the queue after leaving; want none", len(sent))
	}
	if st := h.up.Status(); st.RecordsSent != 0 || st.LastUpload != nil {
		t.Errorf("status after leaving: %d records sent, last upload %v; want none counted", st.RecordsSent, st.LastUpload)
	}
	s.mu.Lock()
	deleted := s.deleted["inst-1"]
	s.mu.Unlock()
	if !deleted && !h.up.Status().DeletionPending {
		t.Errorf("the installation left was neither deleted nor queued for deletion")
	}
}
