package store_test

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/server/store/storetest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func hash(n int) string {
	return fmt.Sprintf("%x", sha256.Sum256([]byte(fmt.Sprint(n))))
}

func tokenHash(s string) []byte {
	h := sha256.Sum256([]byte(s))
	return h[:]
}

func stat(n int, execs int64, first, last time.Time) store.Stat {
	return store.Stat{SHA256: hash(n), Size: 1000 + int64(n), Kind: "elf", ExecCount: execs, FirstSeen: first, LastSeen: last}
}

func register(t *testing.T, s store.Store, id string) {
	t.Helper()
	if err := s.Register(context.Background(), id, tokenHash("token-"+id), t0); err != nil {
		t.Fatalf("register %s: %v", id, err)
	}
}

func TestAuthenticate(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		ctx := context.Background()
		s := storetest.New(t, b)
		register(t, s, "a")
		id, err := s.Authenticate(ctx, tokenHash("token-a"))
		if err != nil || id != "a" {
			t.Fatalf("Authenticate(token-a) = %q, %v; want a", id, err)
		}
		if _, err := s.Authenticate(ctx, tokenHash("nope")); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("Authenticate(nope) error = %v; want ErrNotFound", err)
		}
		if err := s.Register(ctx, "b", tokenHash("token-a"), t0); err == nil {
			t.Fatal("second installation with the same token hash was accepted")
		}
		if ok, err := s.InstallationExists(ctx, "a"); !ok || err != nil {
			t.Fatalf("InstallationExists(a) = %v, %v", ok, err)
		}
		if err := s.Ping(ctx); err != nil {
			t.Fatalf("Ping: %v", err)
		}
	})
}

func TestIngestAggregates(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		ctx := context.Background()
		s := storetest.New(t, b)
		register(t, s, "a")
		register(t, s, "b")
		h1 := t0.Add(time.Hour)
		h2 := t0.Add(2 * time.Hour)

		first := []store.Stat{stat(1, 3, t0, h1), stat(2, 1, h1, h1)}
		second := []store.Stat{stat(1, 2, t0.Add(-time.Hour), t0), stat(2, 0, h2, h2)}
		second[1].Loaded = true
		second[1].Malformed = true
		for i, batch := range [][]store.Stat{first, second} {
			dup, err := s.Ingest(ctx, "a", fmt.Sprintf("batch-%d", i), batch, t0)
			if err != nil || dup {
				t.Fatalf("Ingest batch %d = %v, %v", i, dup, err)
			}
		}
		if _, err := s.Ingest(ctx, "b", "batch-0", []store.Stat{stat(1, 7, h2, h2)}, t0); err != nil {
			t.Fatalf("Ingest b: %v", err)
		}

		got, err := s.Stats(ctx, "a")
		if err != nil {
			t.Fatal(err)
		}
		want := []store.Stat{
			{SHA256: hash(1), Size: 1001, Kind: "elf", ExecCount: 5, FirstSeen: t0.Add(-time.Hour), LastSeen: h1},
			{SHA256: hash(2), Size: 1002, Kind: "elf", ExecCount: 1, Loaded: true, Malformed: true, FirstSeen: h1, LastSeen: h2},
		}
		if want[0].SHA256 > want[1].SHA256 {
			want[0], want[1] = want[1], want[0]
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("Stats(a) =\n%v\nwant\n%v", got, want)
		}

		infos, err := s.Lookup(ctx, []string{hash(1), hash(2), hash(3), hash(1)}, store.Trust{Now: t0})
		if err != nil {
			t.Fatal(err)
		}
		// Both installations were registered at t0 and sent batches on
		// one day: with MinActiveDays 0, both count as established.
		wantInfo := []store.FileInfo{
			{SHA256: hash(1), Prevalence: 2, FirstSeen: t0.Add(-time.Hour)},
			{SHA256: hash(2), Prevalence: 1, FirstSeen: h1, Malformed: true, Established: 1, MalformedEstablished: 1},
			{SHA256: hash(3)},
			{SHA256: hash(1), Prevalence: 2, FirstSeen: t0.Add(-time.Hour)},
		}
		if fmt.Sprint(infos) != fmt.Sprint(wantInfo) {
			t.Errorf("Lookup =\n%v\nwant\n%v", infos, wantInfo)
		}
	})
}

func TestIngestDuplicateBatch(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		ctx := context.Background()
		s := storetest.New(t, b)
		register(t, s, "a")
		register(t, s, "b")
		batch := []store.Stat{stat(1, 4, t0, t0)}
		for i, tc := range []struct {
			id, batch string
			wantDup   bool
		}{
			{"a", "x", false},
			{"a", "x", true},
			{"b", "x", false}, // batch IDs are per installation
			{"a", "y", false},
		} {
			dup, err := s.Ingest(ctx, tc.id, tc.batch, batch, t0)
			if err != nil || dup != tc.wantDup {
				t.Fatalf("step %d: Ingest(%s, %s) = %v, %v; want %v", i, tc.id, tc.batch, dup, err, tc.wantDup)
			}
		}
		got, err := s.Stats(ctx, "a")
		if err != nil || len(got) != 1 || got[0].ExecCount != 8 {
			t.Fatalf("Stats(a) = %v, %v; want one record with 8 executions", got, err)
		}
		if _, err := s.Ingest(ctx, "nobody", "z", batch, t0); !errors.Is(err, store.ErrUnknownInstallation) {
			t.Fatalf("Ingest for unknown installation: error = %v; want ErrUnknownInstallation", err)
		}
	})
}

// TestIngestConcurrentDuplicates posts one batch many times at once
// through two stores on one database (two server processes): it counts
// once.
func TestIngestConcurrentDuplicates(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		ctx := context.Background()
		dsn := b.NewDSN(t)
		s1, s2 := storetest.Open(t, dsn), storetest.Open(t, dsn)
		register(t, s1, "a")
		var batch []store.Stat
		for i := range 200 {
			batch = append(batch, stat(i, 1, t0, t0))
		}
		const tries = 8
		var (
			wg       sync.WaitGroup
			mu       sync.Mutex // protects accepted and errs
			accepted int
			errs     []error
		)
		for i := range tries {
			s := s1
			if i%2 == 1 {
				s = s2
			}
			wg.Go(func() {
				dup, err := s.Ingest(ctx, "a", "same", batch, t0)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					errs = append(errs, err)
				} else if !dup {
					accepted++
				}
			})
		}
		wg.Wait()
		if len(errs) > 0 || accepted != 1 {
			t.Fatalf("accepted %d of %d identical batches, errors %v; want 1 and none", accepted, tries, errs)
		}
		got, err := s2.Stats(ctx, "a")
		if err != nil {
			t.Fatal(err)
		}
		for _, st := range got {
			if st.ExecCount != 1 {
				t.Fatalf("%s counted %d times; want 1", st.SHA256, st.ExecCount)
			}
		}
		if len(got) != len(batch) {
			t.Fatalf("stored %d records; want %d", len(got), len(batch))
		}
	})
}

func TestDeleteInstallation(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		ctx := context.Background()
		s := storetest.New(t, b)
		register(t, s, "gone")
		register(t, s, "stays")
		for _, id := range []string{"gone", "stays"} {
			if _, err := s.Ingest(ctx, id, "b1", []store.Stat{stat(1, 1, t0, t0), stat(2, 1, t0, t0)}, t0); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := s.ImportLists(ctx, "vendor", map[string][]string{store.ListTrusted: {hash(1)}}, false, t0); err != nil {
			t.Fatal(err)
		}
		before, err := s.Residue(ctx, "gone", tokenHash("token-gone"))
		if err != nil {
			t.Fatal(err)
		}
		for _, table := range []string{"installations", "batches", "stats"} {
			if before[table] == 0 {
				t.Errorf("before deletion, Residue finds nothing in %s: the audit would miss rows", table)
			}
		}

		existed, err := s.DeleteInstallation(ctx, "gone")
		if err != nil || !existed {
			t.Fatalf("DeleteInstallation = %v, %v; want true", existed, err)
		}
		after, err := s.Residue(ctx, "gone", tokenHash("token-gone"))
		if err != nil {
			t.Fatal(err)
		}
		if len(after) < 5 {
			t.Errorf("Residue looked at %d tables; want every table (at least 5)", len(after))
		}
		for table, n := range after {
			if n != 0 {
				t.Errorf("after deletion, %s holds %d rows naming the installation", table, n)
			}
		}
		infos, err := s.Lookup(ctx, []string{hash(1)}, store.Trust{Now: t0})
		if _, listed := infos[0].Listed(store.ListTrusted); err != nil || infos[0].Prevalence != 1 || !listed {
			t.Errorf("Lookup after deletion = %+v, %v; want prevalence 1 and the list kept", infos, err)
		}
		if got, _ := s.Stats(ctx, "stays"); len(got) != 2 {
			t.Errorf("the other installation lost records: %v", got)
		}
		existed, err = s.DeleteInstallation(ctx, "gone")
		if err != nil || existed {
			t.Fatalf("second DeleteInstallation = %v, %v; want false, nil", existed, err)
		}
		if _, err := s.Authenticate(ctx, tokenHash("token-gone")); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("token still authenticates after deletion: %v", err)
		}
		if _, err := s.Ingest(ctx, "gone", "b2", []store.Stat{stat(1, 1, t0, t0)}, t0); !errors.Is(err, store.ErrUnknownInstallation) {
			t.Fatalf("Ingest after deletion: error = %v; want ErrUnknownInstallation", err)
		}
	})
}

func TestImportLists(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		ctx := context.Background()
		s := storetest.New(t, b)
		steps := []struct {
			name      string
			feed      string
			lists     map[string][]string
			replace   bool
			wantErr   bool
			wantCount map[string]store.ImportCount
			want      string // lists per hash 1..3: t, u, m or -
		}{
			{name: "add", feed: "a", lists: map[string][]string{store.ListTrusted: {hash(1), hash(2), hash(2)}, store.ListMalicious: {hash(2)}},
				wantCount: map[string]store.ImportCount{store.ListTrusted: {Hashes: 2, Added: 2}, store.ListMalicious: {Hashes: 1, Added: 1}}, want: "t tm -"},
			{name: "add more", feed: "a", lists: map[string][]string{store.ListUntrusted: {hash(3)}, store.ListTrusted: {hash(1)}},
				wantCount: map[string]store.ImportCount{store.ListUntrusted: {Hashes: 1, Added: 1}, store.ListTrusted: {Hashes: 1}}, want: "t tm u"},
			{name: "another feed", feed: "b", lists: map[string][]string{store.ListTrusted: {hash(3)}},
				wantCount: map[string]store.ImportCount{store.ListTrusted: {Hashes: 1, Added: 1}}, want: "t tm tu"},
			{name: "replace keeps other feeds", feed: "a", lists: map[string][]string{store.ListTrusted: {hash(2)}}, replace: true,
				wantCount: map[string]store.ImportCount{store.ListTrusted: {Hashes: 1, Removed: 1}}, want: "- tm tu"},
			{name: "unknown list", feed: "a", lists: map[string][]string{"greylist": {hash(1)}}, wantErr: true, want: "- tm tu"},
			{name: "no feed name", lists: map[string][]string{store.ListTrusted: {hash(1)}}, wantErr: true, want: "- tm tu"},
		}
		for _, step := range steps {
			counts, err := s.ImportLists(ctx, step.feed, step.lists, step.replace, t0)
			if (err != nil) != step.wantErr {
				t.Fatalf("%s: ImportLists error = %v; want error %v", step.name, err, step.wantErr)
			}
			if !step.wantErr && fmt.Sprint(counts) != fmt.Sprint(step.wantCount) {
				t.Errorf("%s: counts %v; want %v", step.name, counts, step.wantCount)
			}
			infos, err := s.Lookup(ctx, []string{hash(1), hash(2), hash(3)}, store.Trust{Now: t0})
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, in := range infos {
				f := ""
				for _, l := range []string{store.ListTrusted, store.ListUntrusted, store.ListMalicious} {
					if _, ok := in.Listed(l); ok {
						f += l[:1]
					}
				}
				if f == "" {
					f = "-"
				}
				got = append(got, f)
			}
			if g := strings.Join(got, " "); g != step.want {
				t.Errorf("%s: lists = %q; want %q", step.name, g, step.want)
			}
		}
		d, err := s.File(ctx, hash(1), store.Trust{Now: t0})
		if err != nil {
			t.Fatal(err)
		}
		var hist []string
		for _, c := range d.History {
			hist = append(hist, c.Verdict+"/"+c.Source+"/"+c.Actor)
		}
		if want := "cleared/feed/a trusted/feed/a"; strings.Join(hist, " ") != want {
			t.Errorf("history of hash 1: %q; want %q", hist, want)
		}
	})
}

// TestOpenConcurrently starts several stores on one fresh database at
// once: the migrations run once and every store opens.
func TestOpenConcurrently(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		dsn := b.NewDSN(t)
		var wg sync.WaitGroup
		errs := make([]error, 4)
		stores := make([]store.Store, 4)
		for i := range stores {
			wg.Go(func() {
				stores[i], errs[i] = store.Open(context.Background(), dsn, nil)
			})
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Errorf("store %d: %v", i, err)
				continue
			}
			stores[i].Close()
		}
	})
}

func TestOpenRejects(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, dsn, want string }{
		{"unknown scheme", "mysql://x", "unknown database"},
		{"memory", "sqlite::memory:", "file path"},
		{"empty path", "sqlite:", "file path"},
		{"password hidden", "ftp://u:secret@h", "u:xxxxx@h"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := store.Open(context.Background(), tc.dsn, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "secret") {
				t.Fatalf("Open(%q) error = %v; want it to mention %q", tc.dsn, err, tc.want)
			}
		})
	}
}

// TestDeleteRacesIngest deletes installations while their batches are
// being ingested: whichever commits first, nothing of them remains.
func TestDeleteRacesIngest(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		ctx := context.Background()
		dsn := b.NewDSN(t)
		s1, s2 := storetest.Open(t, dsn), storetest.Open(t, dsn)
		var batch []store.Stat
		for i := range 300 {
			batch = append(batch, stat(i, 1, t0, t0))
		}
		for round := range 10 {
			id := fmt.Sprint("racer", round)
			register(t, s1, id)
			var wg sync.WaitGroup
			var ingestErr, deleteErr error
			wg.Go(func() {
				_, ingestErr = s1.Ingest(ctx, id, "b", batch, t0)
				if errors.Is(ingestErr, store.ErrUnknownInstallation) {
					ingestErr = nil // deleted first
				}
			})
			wg.Go(func() { _, deleteErr = s2.DeleteInstallation(ctx, id) })
			wg.Wait()
			if ingestErr != nil || deleteErr != nil {
				t.Fatalf("round %d: ingest %v, delete %v", round, ingestErr, deleteErr)
			}
			res, err := s1.Residue(ctx, id, tokenHash("token-"+id))
			if err != nil {
				t.Fatal(err)
			}
			for table, n := range res {
				if n != 0 {
					t.Fatalf("round %d: %s holds %d rows of a deleted installation", round, table, n)
				}
			}
		}
	})
}

func TestOverviewAndRareFiles(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		ctx := context.Background()
		s := storetest.New(t, b)
		now := t0.Add(10 * time.Hour) // 22:00 UTC
		day := 24 * time.Hour
		// Four installations; "old" reported hash 1 ten days ago, the
		// others report hash 1 and their own files now and then.
		for _, id := range []string{"old", "a", "b", "c"} {
			register(t, s, id)
		}
		ingest := func(id, batch string, at time.Time, stats ...store.Stat) {
			t.Helper()
			if _, err := s.Ingest(ctx, id, batch, stats, at); err != nil {
				t.Fatal(err)
			}
		}
		ingest("old", "x", now.Add(-10*day), stat(1, 1, t0, t0))
		ingest("a", "x", now.Add(-2*time.Hour), stat(1, 1, t0, t0), stat(2, 1, t0, t0), stat(3, 1, t0, t0))
		ingest("b", "x", now.Add(-90*time.Minute), stat(2, 1, t0, t0), stat(4, 1, t0, t0))
		ingest("c", "x", now.Add(-30*time.Minute), stat(2, 1, t0, t0), stat(5, 2, t0, t0))
		ingest("c", "y", now.Add(-20*time.Minute), stat(6, 1, t0, t0))
		if _, err := s.ImportLists(ctx, "f", map[string][]string{store.ListMalicious: {hash(4), hash(5), hash(99)}}, false, now); err != nil {
			t.Fatal(err)
		}
		if err := s.Decide(ctx, hash(5), "trusted", "ana", "vendor", now); err != nil {
			t.Fatal(err)
		}
		if err := s.Decide(ctx, hash(3), "malicious", "ana", "sandbox", now); err != nil {
			t.Fatal(err)
		}
		o, err := s.Overview(ctx, now)
		if err != nil {
			t.Fatal(err)
		}
		if o.Installations != 4 || o.ActiveInstallations != 3 {
			t.Errorf("installations %d, active %d; want 4 and 3", o.Installations, o.ActiveInstallations)
		}
		var total int64
		for _, n := range o.RecordsPerHour {
			total += n
		}
		if total != 8 || o.RecordsPerHour[21] != 5 || o.RecordsPerHour[22] != 3 {
			t.Errorf("records per hour %v; want 5 in the hour from 20:00, 3 from 21:00", o.RecordsPerHour)
		}
		if o.NewFilesToday != 5 { // 2, 3, 4, 5, 6: hash 1 was first reported 10 days ago
			t.Errorf("new files today %d; want 5", o.NewFilesToday)
		}
		var det []string
		for _, d := range o.Detections {
			det = append(det, fmt.Sprintf("%s/%d/%s", d.SHA256[:4], d.Installations, d.Source))
		}
		want := []string{hash(3)[:4] + "/1/analyst", hash(4)[:4] + "/1/feed"}
		slices.Sort(det)
		slices.Sort(want)
		if !slices.Equal(det, want) || o.DetectionsTotal != 2 {
			t.Errorf("detections %v (total %d); want %v: the analyst's trusted overrides the feed, unreported hashes are not detections", det, o.DetectionsTotal, want)
		}
		if len(o.RecentChanges) != 5 || o.RecentChanges[0].SHA256 != hash(3) {
			t.Errorf("recent changes %+v; want 5, newest (the decision on hash 3) first", o.RecentChanges)
		}

		rare, err := s.RareFiles(ctx, now.Add(-7*day), 1, 10)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, r := range rare {
			got = append(got, fmt.Sprintf("%s/%d", r.SHA256[:4], r.Installations))
		}
		want = []string{hash(6)[:4] + "/1", hash(5)[:4] + "/1", hash(4)[:4] + "/1", hash(3)[:4] + "/1"}
		if !slices.Equal(got, want) {
			t.Errorf("rare files %v; want %v (newest first; hash 2 is on three installations, hash 1 older)", got, want)
		}
		if !rare[1].Decided || rare[2].Decided {
			t.Errorf("decided flags %+v", rare)
		}
		if rare, err := s.RareFiles(ctx, now.Add(-7*day), 3, 2); err != nil || len(rare) != 2 {
			t.Errorf("limit 2: %d files, %v", len(rare), err)
		}
	})
}
