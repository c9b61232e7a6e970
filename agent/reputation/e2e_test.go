package reputation_test

import (
	"context"
	"errors"
	"net/http/httptest"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/cloud"
	"github.com/cloudprotect/cloudprotect/agent/reputation"
	"github.com/cloudprotect/cloudprotect/agent/upload/uploadtest"
	"github.com/cloudprotect/cloudprotect/server"
	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/server/verdict"
	"github.com/cloudprotect/cloudprotect/wire"
)

// TestMaliciousHashRaisesAnAlertWithTheRealServer runs the reference
// cloud on loopback over SQLite, imports a hash as malicious, and checks
// that the agent's installation and checker turn its sighting into an alert.
func TestMaliciousHashRaisesAnAlertWithTheRealServer(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	clk := uploadtest.NewClock(start)
	st, err := store.Open(ctx, "sqlite:"+filepath.Join(t.TempDir(), "cloud.db"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	evil, fine := hash(666), hash(1)
	if _, err := st.ImportLists(ctx, "test feed", map[string][]string{store.ListMalicious: {evil}, store.ListTrusted: {fine}}, false, start); err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(server.New(server.Config{Store: st, Rules: verdict.Default(), Now: clk.Now}))
	defer ts.Close()

	inst, err := cloud.Open(cloud.Options{
		StatePath:        filepath.Join(t.TempDir(), cloud.StateFile),
		Server:           func() string { return ts.URL },
		Allowed:          func() bool { return true },
		StatementVersion: func() int { return 1 },
		Clock:            clk,
	})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var alerts []api.Alert
	c, err := reputation.New(reputation.Options{
		Lookup:  inst,
		Allowed: func() bool { return true },
		Alert: func(a api.Alert) {
			mu.Lock()
			alerts = append(alerts, a)
			mu.Unlock()
		},
		Clock: clk,
	})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	wg.Go(func() { errs <- inst.Serve(ctx) })
	wg.Go(func() { errs <- c.Serve(ctx) })
	defer func() {
		cancel()
		wg.Wait()
		close(errs)
		for err := range errs {
			if !errors.Is(err, context.Canceled) {
				t.Errorf("Serve = %v; want context.Canceled", err)
			}
		}
	}()

	c.Check(evil, "~/Downloads/invoice.pdf.sh")
	c.Check(fine, "/usr/bin/true")
	clk.WaitTimers(1, 5*time.Second)
	clk.Advance(2 * time.Second)
	eventually(t, "an alert", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(alerts) > 0
	})
	eventually(t, "both verdicts cached", func() bool { return c.Stats().Cached == 2 })
	mu.Lock()
	got := alerts
	mu.Unlock()
	want := api.Alert{SHA256: evil, Path: "~/Downloads/invoice.pdf.sh", Program: "invoice.pdf.sh", Verdict: wire.VerdictMalicious, Source: wire.SourceFeed, Action: api.AlertActionAlerted}
	if len(got) != 1 || got[0] != want {
		t.Errorf("alerts = %+v; want [%+v]", got, want)
	}
	if v, _ := c.Verdict(fine); v != wire.VerdictTrusted {
		t.Errorf("verdict on the trusted file = %q; want trusted", v)
	}
}
