package server_test

import (
	"bytes"
	"compress/gzip"
	"database/sql"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/server"
	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/server/store/storetest"
	"github.com/cloudprotect/cloudprotect/server/verdict"
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

// BenchmarkIngestVsBareUpsert compares, side by side in one run on
// PostgreSQL, the server's ingest of batches of 1,000 records new to the
// installation (HTTP, gzip, validation, aggregation, the batch's
// transaction) with the bare multi-row upsert of the same rows into the
// same table of another, identical database. Each iteration does one
// batch of each, alternately, so that load on the machine affects both
// alike; ratio is server/bare.
func BenchmarkIngestVsBareUpsert(b *testing.B) {
	const perBatch = 1000
	be := storetest.Backends()[1]
	be.Available(b)
	e := newEnv(b, be)
	tok := e.register().Token
	dsn := be.NewDSN(b)
	storetest.Open(b, dsn) // the same schema, migrated
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	type arrays struct {
		hashes, kinds, paths      []string
		sizes, execs, first, last []int64
		pkg, malf, loaded         []int16
	}
	bodies := make([][]byte, b.N)
	rows := make([]arrays, b.N)
	for i := range b.N {
		recs := realisticRecords(perBatch, uint64(1000+i))
		bodies[i] = gz(b, mustJSON(b, batch(fmt.Sprintf("b%d", i), recs...)))
		var a arrays
		for _, st := range server.Aggregate(recs) {
			a.hashes, a.kinds, a.paths = append(a.hashes, st.SHA256), append(a.kinds, st.Kind), append(a.paths, st.Path)
			a.sizes, a.execs = append(a.sizes, st.Size), append(a.execs, st.ExecCount)
			a.first, a.last = append(a.first, st.FirstSeen.Unix()), append(a.last, st.LastSeen.Unix())
			a.pkg, a.malf, a.loaded = append(a.pkg, boolInt16(st.PackageManaged)), append(a.malf, boolInt16(st.Malformed)), append(a.loaded, boolInt16(st.Loaded))
		}
		rows[i] = a
	}
	var inServer, inBare time.Duration
	b.ResetTimer()
	for i := range b.N {
		start := time.Now()
		a := e.do("POST", "/v1/statistics", tok, bodies[i], map[string]string{"Content-Encoding": "gzip", "Idempotency-Key": fmt.Sprintf("b%d", i)})
		inServer += time.Since(start)
		if a.status != http.StatusOK {
			b.Fatalf("post: %d %s", a.status, a.body)
		}
		r := rows[i]
		start = time.Now()
		if _, err := db.ExecContext(b.Context(), store.PostgresUpsertSQL, "bare-installation", now.Unix(),
			r.hashes, r.sizes, r.kinds, r.paths, r.pkg, r.malf, r.execs, r.loaded, r.first, r.last); err != nil {
			b.Fatal(err)
		}
		inBare += time.Since(start)
	}
	b.StopTimer()
	server := float64(b.N*perBatch) / inServer.Seconds()
	bareRate := float64(b.N*perBatch) / inBare.Seconds()
	b.ReportMetric(server, "server-records/s")
	b.ReportMetric(bareRate, "bare-records/s")
	b.ReportMetric(server/bareRate, "ratio")
}

func boolInt16(v bool) int16 {
	if v {
		return 1
	}
	return 0
}

// consoleFixture fills a store with 100,000 files reported by 1,000
// installations over 30 days: each installation reports 300 of 1,000
// common programs and 99 files of its own (about 400,000 reports), a
// feed lists 20,000 hashes as malicious (some of them reported) and
// analysts decided on 500 files.
func consoleFixture(b *testing.B, st store.Store) (hashes []string) {
	b.Helper()
	ctx := b.Context()
	rng := rand.New(rand.NewPCG(11, 12))
	common := realisticRecords(1000, 500)
	var malicious []string
	for i := range 1000 {
		id := fmt.Sprintf("inst-%04d", i)
		at := now.Add(-time.Duration(rng.IntN(30*24)) * time.Hour)
		if err := st.Register(ctx, id, []byte(id), at.Add(-24*time.Hour)); err != nil {
			b.Fatal(err)
		}
		recs := make([]wire.Record, 0, 399)
		for _, j := range rng.Perm(len(common))[:300] {
			recs = append(recs, common[j])
		}
		own := realisticRecords(99, uint64(10_000+i))
		recs = append(recs, own...)
		for j := range recs {
			recs[j].FirstSeen, recs[j].LastSeen = at.Add(-time.Hour), at
		}
		if _, err := st.Ingest(ctx, id, "b", server.Aggregate(recs), at); err != nil {
			b.Fatal(err)
		}
		if i%50 == 0 {
			malicious = append(malicious, own[0].SHA256)
		}
		hashes = append(hashes, own[1].SHA256, common[rng.IntN(len(common))].SHA256)
	}
	for i := range 20_000 {
		malicious = append(malicious, hashOf(fmt.Sprint("feed", i)))
	}
	if _, err := st.ImportLists(ctx, "bench-feed", map[string][]string{store.ListMalicious: malicious}, false, now.Add(-48*time.Hour)); err != nil {
		b.Fatal(err)
	}
	for i := range 500 {
		if err := st.Decide(ctx, hashes[i], wire.VerdictTrusted, "bench", "benchmark decision", now.Add(-time.Hour)); err != nil {
			b.Fatal(err)
		}
	}
	return hashes
}

// BenchmarkConsoleQueries measures the console's queries over
// consoleFixture: a file's page (search by SHA-256), the overview, the
// work list of the newest rare files, and the overview when a batch of
// 1,000 new files is still to be summarized, as p50 and p99 latencies.
func BenchmarkConsoleQueries(b *testing.B) {
	benchBackends(b, func(b *testing.B, be storetest.Backend) {
		dsn := be.NewDSN(b)
		st := storetest.Open(b, dsn)
		hashes := consoleFixture(b, st)
		if be.Name == "postgres" {
			// As autovacuum would have done by now on a running server:
			// statistics for the planner, visibility for index-only scans.
			db, err := sql.Open("pgx", dsn)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := db.ExecContext(b.Context(), "VACUUM ANALYZE"); err != nil {
				b.Fatal(err)
			}
			db.Close()
		}
		// The server's summarizer counts batches as they come; here it
		// finds the whole fixture pending.
		start := time.Now()
		if err := st.Summarize(b.Context(), now); err != nil {
			b.Fatal(err)
		}
		b.Logf("%s: summarized the fixture's 1,000 batches (%d reports) in %v", be.Name, 1000*399, time.Since(start).Round(time.Millisecond))
		trust := verdict.Default().Trust(now)
		batches := 0
		for _, q := range []struct {
			name string
			// prepare runs before each timed call, untimed.
			prepare func(i int) error
			run     func(i int) error
		}{
			{name: "file", run: func(i int) error { _, err := st.File(b.Context(), hashes[i%len(hashes)], trust); return err }},
			{name: "overview", run: func(int) error { _, err := st.Overview(b.Context(), now); return err }},
			{name: "worklist", run: func(int) error {
				_, err := st.RareFiles(b.Context(), now.Add(-7*24*time.Hour), 3, 100)
				return err
			}},
			// A batch of 1,000 reports new to the cloud arrived since the
			// summaries were last brought up to date: the overview counts
			// it first.
			{name: "overview-after-batch", prepare: func(i int) error {
				batches++
				recs := realisticRecords(1000, uint64(900_000+batches))
				_, err := st.Ingest(b.Context(), fmt.Sprintf("inst-%04d", i%1000), fmt.Sprint("late", batches), server.Aggregate(recs), now)
				return err
			}, run: func(int) error { _, err := st.Overview(b.Context(), now); return err }},
		} {
			b.Run(q.name, func(b *testing.B) {
				lat := make([]time.Duration, 0, b.N)
				for i := range b.N {
					if q.prepare != nil {
						b.StopTimer()
						if err := q.prepare(i); err != nil {
							b.Fatal(err)
						}
						b.StartTimer()
					}
					start := time.Now()
					if err := q.run(i); err != nil {
						b.Fatal(err)
					}
					lat = append(lat, time.Since(start))
				}
				reportPercentiles(b, lat)
			})
		}
	})
}

func reportPercentiles(b *testing.B, lat []time.Duration) {
	slices.Sort(lat)
	pct := func(p float64) float64 {
		return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000
	}
	b.ReportMetric(pct(0.50), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
}
