package store_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/server/store/storetest"
)

// sameOverview fails t when the overview read from the summaries differs
// from the one computed from the rows themselves.
func sameOverview(t *testing.T, s store.Store, now time.Time, step string) {
	t.Helper()
	ctx := context.Background()
	got, err := s.Overview(ctx, now)
	if err != nil {
		t.Fatalf("%s: Overview: %v", step, err)
	}
	want, err := store.OverviewFromRows(ctx, s, now)
	if err != nil {
		t.Fatalf("%s: OverviewFromRows: %v", step, err)
	}
	if n, err := store.PendingBatches(ctx, s); err != nil || n != 0 {
		t.Errorf("%s: %d batches still pending after the overview (%v)", step, n, err)
	}
	check := func(what string, g, w any) {
		if fmt.Sprint(g) != fmt.Sprint(w) {
			t.Errorf("%s: %s = %v; from the rows %v", step, what, g, w)
		}
	}
	check("installations", got.Installations, want.Installations)
	check("active installations", got.ActiveInstallations, want.ActiveInstallations)
	check("records per hour", got.RecordsPerHour, want.RecordsPerHour)
	check("new files today", got.NewFilesToday, want.NewFilesToday)
	check("detections total", got.DetectionsTotal, want.DetectionsTotal)
	check("detections", got.Detections, want.Detections)
}

// TestSummariesMatchRows drives a store through random ingests (also of
// earlier times than stored reports, and repeated batches), deletions of
// installations, feed imports and analysts' decisions, summarizing at
// random moments, and holds every overview to the one computed from the
// rows themselves.
func TestSummariesMatchRows(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		ctx := context.Background()
		s := storetest.New(t, b)
		seed := uint64(time.Now().UnixNano())
		t.Logf("seed %d", seed)
		rng := rand.New(rand.NewPCG(seed, 7))
		now := t0.Add(10 * time.Hour) // 22:00 UTC: "today" is 22 hours long
		var insts []string
		next := 0
		add := func() {
			id := fmt.Sprint("inst-", next)
			next++
			register(t, s, id)
			insts = append(insts, id)
		}
		for range 5 {
			add()
		}
		var batchIDs []string
		for step := range 250 {
			name := ""
			switch op := rng.IntN(20); {
			case op < 11: // a batch, at some time in the last 60 hours
				id := insts[rng.IntN(len(insts))]
				at := now.Add(-time.Duration(rng.IntN(60*60)) * time.Minute)
				var stats []store.Stat
				for _, n := range rng.Perm(40)[:1+rng.IntN(8)] {
					stats = append(stats, stat(n, 1, at, at))
				}
				batchID := fmt.Sprint("b", step)
				if len(batchIDs) > 0 && rng.IntN(8) == 0 {
					batchID = batchIDs[rng.IntN(len(batchIDs))] // repeated: counts nothing
				}
				batchIDs = append(batchIDs, batchID)
				if _, err := s.Ingest(ctx, id, batchID, stats, at); err != nil {
					t.Fatal(err)
				}
				name = fmt.Sprintf("step %d: ingest %s at %s", step, id, at.Format(time.DateTime))
			case op < 13:
				if err := s.Summarize(ctx, now); err != nil {
					t.Fatal(err)
				}
				name = fmt.Sprintf("step %d: summarize", step)
			case op < 15:
				i := rng.IntN(len(insts))
				id := insts[i]
				if _, err := s.DeleteInstallation(ctx, id); err != nil {
					t.Fatal(err)
				}
				insts = slices.Delete(insts, i, i+1)
				add()
				name = fmt.Sprintf("step %d: delete %s", step, id)
			case op < 17:
				var hashes []string
				for _, n := range rng.Perm(50)[:rng.IntN(10)] {
					hashes = append(hashes, hash(n))
				}
				replace := rng.IntN(2) == 0
				if _, err := s.ImportLists(ctx, fmt.Sprint("feed", rng.IntN(2)), map[string][]string{store.ListMalicious: hashes}, replace, now); err != nil {
					t.Fatal(err)
				}
				name = fmt.Sprintf("step %d: import (replace %v)", step, replace)
			case op < 19:
				v := []string{"malicious", "trusted", "untrusted", ""}[rng.IntN(4)]
				if err := s.Decide(ctx, hash(rng.IntN(40)), v, "ana", "test", now); err != nil {
					t.Fatal(err)
				}
				name = fmt.Sprintf("step %d: decide %q", step, v)
			default:
				sameOverview(t, s, now, fmt.Sprintf("step %d", step))
				continue
			}
			if rng.IntN(10) == 0 {
				sameOverview(t, s, now, name)
			}
			if t.Failed() {
				t.FailNow()
			}
		}
		sameOverview(t, s, now, "at the end")
		// A day later the hours of the first day are gone from the
		// records per hour, and nothing is new.
		sameOverview(t, s, now.Add(26*time.Hour), "a day later")
	})
}

// TestSummariesUnderConcurrency ingests overlapping files from several
// installations through two stores on one database (two servers) while
// both summarize, an installation is deleted and a feed is imported: the
// summaries end as the rows say.
func TestSummariesUnderConcurrency(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		ctx := context.Background()
		dsn := b.NewDSN(t)
		s1, s2 := storetest.Open(t, dsn), storetest.Open(t, dsn)
		now := t0.Add(10 * time.Hour)
		for i := range 6 {
			register(t, s1, fmt.Sprint("c", i))
		}
		// "leaver" reported some of the files first, and files of its own.
		register(t, s1, "leaver")
		var early []store.Stat
		for n := range 40 {
			early = append(early, stat(n*20, 1, now, now), stat(1000+n, 1, now, now))
		}
		if _, err := s1.Ingest(ctx, "leaver", "b", early, now.Add(-2*time.Hour)); err != nil {
			t.Fatal(err)
		}
		var (
			wg   sync.WaitGroup
			mu   sync.Mutex // protects errs
			errs []error
		)
		fail := func(err error) {
			mu.Lock()
			errs = append(errs, err)
			mu.Unlock()
		}
		for i := range 6 {
			s := []store.Store{s1, s2}[i%2]
			wg.Go(func() {
				for j := range 15 {
					// The same new files reach every installation at once.
					var stats []store.Stat
					for n := range 30 {
						stats = append(stats, stat(j*30+n, 1, now, now))
					}
					at := now.Add(-time.Duration(15-j) * time.Minute)
					if _, err := s.Ingest(ctx, fmt.Sprint("c", i), fmt.Sprint("b", j), stats, at); err != nil {
						fail(err)
						return
					}
				}
			})
		}
		for _, s := range []store.Store{s1, s2} {
			wg.Go(func() {
				for range 20 {
					if err := s.Summarize(ctx, now); err != nil {
						fail(err)
						return
					}
				}
			})
		}
		wg.Go(func() {
			if _, err := s2.ImportLists(ctx, "feed", map[string][]string{store.ListMalicious: {hash(3), hash(200), hash(449)}}, false, now); err != nil {
				fail(err)
			}
			if _, err := s1.DeleteInstallation(ctx, "leaver"); err != nil {
				fail(err)
			}
		})
		wg.Wait()
		if len(errs) > 0 {
			t.Fatal(errs)
		}
		sameOverview(t, s1, now, "after the concurrent work")
		o, err := s2.Overview(ctx, now)
		if err != nil {
			t.Fatal(err)
		}
		if o.NewFilesToday != 450 || o.DetectionsTotal != 3 {
			t.Errorf("new files %d, detections %d; want 450 and 3", o.NewFilesToday, o.DetectionsTotal)
		}
	})
}

// TestSummaryMigration opens a database written before the summaries
// existed: the migration counts what it holds into them.
func TestSummaryMigration(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		ctx := context.Background()
		dsn := b.NewDSN(t)
		old, err := store.Open(ctx, dsn, nil)
		if err != nil {
			t.Fatal(err)
		}
		now := t0.Add(10 * time.Hour)
		for i := range 3 {
			id := fmt.Sprint("m", i)
			register(t, old, id)
			for j := range 4 {
				at := now.Add(-time.Duration(i*7+j*5) * time.Hour)
				stats := []store.Stat{stat(100+i*10+j, 1, at, at), stat(j, 1, at, at)}
				if _, err := old.Ingest(ctx, id, fmt.Sprint("b", j), stats, at); err != nil {
					t.Fatal(err)
				}
			}
		}
		if _, err := old.ImportLists(ctx, "feed", map[string][]string{store.ListMalicious: {hash(1), hash(121)}}, false, now); err != nil {
			t.Fatal(err)
		}
		if err := store.Downgrade(ctx, old); err != nil {
			t.Fatal(err)
		}
		if err := old.Close(); err != nil {
			t.Fatal(err)
		}
		s := storetest.Open(t, dsn)
		sameOverview(t, s, now, "after the migration")
		if o, err := s.Overview(ctx, now); err != nil || o.NewFilesToday == 0 || o.DetectionsTotal != 2 {
			t.Errorf("overview after the migration: %d new files, %d detections, %v; want some and 2", o.NewFilesToday, o.DetectionsTotal, err)
		}
		// Batches stored after the migration are counted as they come.
		if _, err := s.Ingest(ctx, "m0", "after", []store.Stat{stat(1, 1, now, now), stat(500, 1, now, now)}, now); err != nil {
			t.Fatal(err)
		}
		sameOverview(t, s, now, "after a batch")
	})
}
