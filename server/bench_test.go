package server_test

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/server/store/storetest"
	"github.com/cloudprotect/cloudprotect/wire"
)

// benchBackends runs f per backend; PostgreSQL only when configured.
func benchBackends(b *testing.B, f func(b *testing.B, be storetest.Backend)) {
	for _, be := range storetest.Backends() {
		b.Run(be.Name, func(b *testing.B) {
			be.Available(b)
			f(b, be)
		})
	}
}

// BenchmarkIngest posts gzip batches of 1,000 realistic records through
// the real HTTP server, one client: "new" files never seen by the
// installation (inserts), "repeat" the same files again (updates).
func BenchmarkIngest(b *testing.B) {
	const perBatch = 1000
	benchBackends(b, func(b *testing.B, be storetest.Backend) {
		for _, mode := range []string{"new", "repeat"} {
			b.Run(mode, func(b *testing.B) {
				e := newEnv(b, be)
				tok := e.register().Token
				bodies := make([][]byte, b.N)
				for i := range bodies {
					seed := uint64(i)
					if mode == "repeat" {
						seed = 0
					}
					bodies[i] = gz(b, mustJSON(b, batch(fmt.Sprintf("b%d", i), realisticRecords(perBatch, seed)...)))
				}
				b.ResetTimer()
				for i := range b.N {
					a := e.do("POST", "/v1/statistics", tok, bodies[i],
						map[string]string{"Content-Encoding": "gzip", "Idempotency-Key": fmt.Sprintf("b%d", i)})
					if a.status != http.StatusOK {
						b.Fatalf("post: %d %s", a.status, a.body)
					}
				}
				b.ReportMetric(float64(b.N*perBatch)/b.Elapsed().Seconds(), "records/s")
			})
		}
	})
}

// BenchmarkLookup1000 looks up 1,000 hashes per request (half of them
// known, some listed) against a database of 10,000 files reported by up
// to five installations, and reports the request latency percentiles.
func BenchmarkLookup1000(b *testing.B) {
	benchBackends(b, func(b *testing.B, be storetest.Backend) {
		e := newEnv(b, be)
		var known []string
		for inst := range 5 {
			tok := e.register().Token
			for part := range 2 {
				recs := realisticRecords(5000, uint64(part))
				recs = recs[:5000-inst*1000] // prevalence 1 to 5
				if a := e.postBatch(tok, batch(fmt.Sprintf("b%d", part), recs...)); a.status != http.StatusOK {
					b.Fatalf("populate: %d %s", a.status, a.body)
				}
				if inst == 0 {
					for _, r := range recs {
						known = append(known, r.SHA256)
					}
				}
			}
		}
		if _, err := e.store.ImportLists(b.Context(), "bench", map[string][]string{store.ListMalicious: known[:1000]}, false, now); err != nil {
			b.Fatal(err)
		}
		hashes := make([]string, 0, 1000)
		for i := range 500 {
			hashes = append(hashes, known[i*17%len(known)], hashOf(fmt.Sprint("unknown", i)))
		}
		body := mustJSON(b, wire.LookupRequest{SHA256: hashes})
		tok := e.register().Token
		lat := make([]time.Duration, 0, b.N)
		b.ResetTimer()
		for range b.N {
			start := time.Now()
			a := e.do("POST", "/v1/reputation/sha256", tok, body, nil)
			lat = append(lat, time.Since(start))
			if a.status != http.StatusOK {
				b.Fatalf("lookup: %d %s", a.status, a.body)
			}
		}
		b.StopTimer()
		slices.Sort(lat)
		pct := func(p float64) float64 {
			return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000
		}
		b.ReportMetric(pct(0.50), "p50-ms")
		b.ReportMetric(pct(0.99), "p99-ms")
	})
}

// BenchmarkWireBytesPerRecord reports what a realistic record costs on
// the wire: JSON bytes and gzip bytes (default level, as the agent sends).
func BenchmarkWireBytesPerRecord(b *testing.B) {
	for _, n := range []int{100, 1000, 5000} {
		b.Run(fmt.Sprintf("records=%d", n), func(b *testing.B) {
			plain, err := json.Marshal(batch("01JQ7Z3K5VEXAMPLE", realisticRecords(n, 7)...))
			if err != nil {
				b.Fatal(err)
			}
			var buf bytes.Buffer
			for range b.N {
				buf.Reset()
				zw := gzip.NewWriter(&buf)
				zw.Write(plain)
				zw.Close()
			}
			b.ReportMetric(float64(len(plain))/float64(n), "json-B/record")
			b.ReportMetric(float64(buf.Len())/float64(n), "gzip-B/record")
		})
	}
}
