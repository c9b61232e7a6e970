package reputation_test

import (
	"context"
	"fmt"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/cloud"
	"github.com/cloudprotect/cloudprotect/agent/reputation"
	"github.com/cloudprotect/cloudprotect/server"
	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/server/verdict"
)

// BenchmarkAskLoopback measures a bulk reputation lookup as the agent sees
// it when an execution is held for the cloud's answer: Checker.Ask through
// the real installation (registration done, connection kept alive) to the
// reference cloud on loopback over SQLite, holding 10,000 feed verdicts.
// The cloud runs in the benchmark's process and shares its CPU. Each
// sub-benchmark reports the median and 99th percentile of one lookup of
// that many hashes (a tenth of them known).
func BenchmarkAskLoopback(b *testing.B) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st, err := store.Open(ctx, "sqlite:"+filepath.Join(b.TempDir(), "cloud.db"), nil)
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	known := make([]string, 10_000)
	for i := range known {
		known[i] = hash(i)
	}
	if _, err := st.ImportLists(ctx, "bench feed", map[string][]string{store.ListMalicious: known}, false, time.Now()); err != nil {
		b.Fatal(err)
	}
	ts := httptest.NewServer(server.New(server.Config{Store: st, Rules: verdict.Default()}))
	defer ts.Close()
	inst, err := cloud.Open(cloud.Options{
		StatePath:        filepath.Join(b.TempDir(), cloud.StateFile),
		Server:           func() string { return ts.URL },
		Allowed:          func() bool { return true },
		StatementVersion: func() int { return 1 },
	})
	if err != nil {
		b.Fatal(err)
	}
	c, err := reputation.New(reputation.Options{Lookup: inst, Allowed: func() bool { return true }, Alert: func(api.Alert) {}})
	if err != nil {
		b.Fatal(err)
	}
	next := 1_000_000 // hashes never asked before, so nothing is cached
	batch := func(n int) []string {
		out := make([]string, n)
		for i := range out {
			if i%10 == 0 {
				out[i] = known[(next+i)%len(known)]
			} else {
				out[i] = hash(next + i)
			}
		}
		next += n
		return out
	}
	if _, err := c.Ask(ctx, batch(1)); err != nil { // registers
		b.Fatal(err)
	}
	for _, n := range []int{1, 10, 100, 1000} {
		b.Run(fmt.Sprintf("hashes=%d", n), func(b *testing.B) {
			var lat []time.Duration
			for b.Loop() {
				hs := batch(n)
				t0 := time.Now()
				reps, err := c.Ask(ctx, hs)
				lat = append(lat, time.Since(t0))
				if err != nil || len(reps) != n {
					b.Fatalf("Ask: %d answers, %v", len(reps), err)
				}
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "ms-p50")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "ms-p99")
		})
	}
}
