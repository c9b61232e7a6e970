package alerts

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
)

func alert(n int) (api.Alert, []uint32) {
	return api.Alert{SHA256: strings.Repeat(string(rune('a'+n%6)), 64), Path: "~/Downloads/tool", Program: "tool",
		Verdict: "malicious", Action: api.AlertActionAlerted}, []uint32{uint32(1000 + n)}
}

func TestHistoryKeepsRecentAlertsAcrossRestarts(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), FileName)
	h, err := Open(path, Options{Max: 3})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if got := h.Add(alert(i)); got.ID != uint64(i+1) || got.Time.IsZero() {
			t.Fatalf("alert %d kept as %+v", i, got)
		}
	}
	list := h.List()
	if len(list) != 3 || list[0].ID != 5 || list[2].ID != 3 {
		t.Fatalf("list = %+v; want IDs 5, 4, 3", list)
	}
	if mine := h.For(1004, false); len(mine) != 1 || mine[0].ID != 5 {
		t.Fatalf("user 1004 sees %+v; want alert 5 only", mine)
	}
	if err := h.save(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path); !bytes.Contains(b, []byte(`"users":[1004]`)) {
		t.Errorf("the file does not keep who may see an alert:\n%s", b)
	}
	h2, err := Open(path, Options{Max: 3})
	if err != nil {
		t.Fatal(err)
	}
	if got := h2.List(); len(got) != 3 || got[0].ID != 5 {
		t.Fatalf("after a restart: %+v", got)
	}
	if mine := h2.For(1004, false); len(mine) != 1 || mine[0].ID != 5 {
		t.Fatalf("after a restart user 1004 sees %+v; want alert 5 only", mine)
	}
	if n, last := h2.Summary(1003, false); n != 1 || last != nil {
		t.Fatalf("summary for user 1003 = %d %+v; want 1 alert, no block", n, last)
	}
	if got := h2.Add(alert(9)); got.ID != 6 {
		t.Errorf("the next ID after a restart is %d, want 6", got.ID)
	}

	// Clearing forgets the alerts, overwrites them on disk, and IDs
	// still grow.
	if err := h2.Clear(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path); bytes.Contains(b, []byte("tool")) {
		t.Errorf("the file still holds alerts after Clear:\n%s", b)
	}
	h3, err := Open(path, Options{Max: 3})
	if err != nil {
		t.Fatal(err)
	}
	if len(h3.List()) != 0 {
		t.Errorf("alerts after Clear and a restart: %+v", h3.List())
	}
	if got := h3.Add(alert(1)); got.ID != 7 {
		t.Errorf("the next ID after Clear is %d, want 7", got.ID)
	}
}

func TestDamagedHistorySetAside(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, content string }{
		{"not JSON", "\x00\x01garbage"},
		{"truncated", `{"version":1,"next_id":3,"alerts":[{"id":1,`},
		{"other version", `{"version":2}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path := filepath.Join(t.TempDir(), FileName)
			os.WriteFile(path, []byte(tc.content), 0o600)
			h, err := Open(path, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if len(h.List()) != 0 {
				t.Errorf("alerts from a damaged file: %+v", h.List())
			}
			if aside, _ := filepath.Glob(path + ".corrupt-*"); len(aside) != 1 {
				t.Errorf("set aside: %v; want one file", aside)
			}
		})
	}
}

func TestServeSaves(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), FileName)
	h, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.Serve(ctx) }()
	h.Add(alert(1))
	deadline := time.Now().Add(10 * time.Second)
	for {
		if b, err := os.ReadFile(path); err == nil && bytes.Contains(b, []byte(`"id":1`)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the alert was not written within 10 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	h.Add(alert(2))
	cancel()
	<-done
	if b, _ := os.ReadFile(path); !bytes.Contains(b, []byte(`"id":2`)) {
		t.Errorf("the alert added just before the stop was not written:\n%s", b)
	}
}
