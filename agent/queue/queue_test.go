package queue

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/cloudprotect/cloudprotect/agent/identify"
	"github.com/cloudprotect/cloudprotect/wire"
)

func TestMain(m *testing.M) {
	if path := os.Getenv(crashChildEnv); path != "" {
		crashChild(path)
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

// facts returns the facts of test file i.
func facts(i int) identify.Facts {
	s := sha256.Sum256([]byte(fmt.Sprint("file ", i)))
	return identify.Facts{
		SHA256: hex.EncodeToString(s[:]),
		Size:   int64(1000 + i),
		Path:   fmt.Sprintf("~/bin/tool-%d", i),
		Kind:   "elf",
		ELF:    &identify.ELF{Machine: "x86_64", Type: "dyn", PIE: true, Interpreter: "/lib64/ld-linux-x86-64.so.2"},
	}
}

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

// fakeClock is a settable clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }

// logBuffer collects log output for assertions.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string { l.mu.Lock(); defer l.mu.Unlock(); return l.buf.String() }

func openTest(t testing.TB, path string, opts Options) *Queue {
	t.Helper()
	if opts.Clock == nil {
		c := &fakeClock{t: t0}
		opts.Clock = c.Now
	}
	q, err := Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	return q
}

func mustAdd(t testing.TB, q *Queue, ev Event) {
	t.Helper()
	if err := q.Add(ev); err != nil {
		t.Fatal(err)
	}
}

func execs(t testing.TB, q *Queue, i, n int, at time.Time) {
	t.Helper()
	for range n {
		mustAdd(t, q, Event{Facts: facts(i), Execs: 1, Time: at})
	}
}

func recordsByHash(t testing.TB, q *Queue) map[string]Record {
	t.Helper()
	rs, err := q.Records()
	if err != nil {
		t.Fatal(err)
	}
	m := make(map[string]Record)
	for _, r := range rs {
		m[r.SHA256] = r
	}
	return m
}

func TestAddAggregates(t *testing.T) {
	t.Parallel()
	q := openTest(t, filepath.Join(t.TempDir(), "q.db"), Options{})
	execs(t, q, 1, 3, t0.Add(time.Minute))
	mustAdd(t, q, Event{Facts: facts(1), Execs: 1, Time: t0}) // earlier: FirstSeen moves back
	mustAdd(t, q, Event{Facts: facts(2), Loaded: true})       // no time: the clock's
	if s := q.Stats(); s.Records != 0 || s.Pending != 0 {
		t.Errorf("before commit: %+v", s)
	}
	if err := q.Flush(); err != nil {
		t.Fatal(err)
	}
	execs(t, q, 1, 1, t0.Add(2*time.Minute))
	if err := q.Flush(); err != nil {
		t.Fatal(err)
	}
	m := recordsByHash(t, q)
	r1 := m[facts(1).SHA256]
	if r1.ExecCount != 5 || !r1.FirstSeen.Equal(t0) || !r1.LastSeen.Equal(t0.Add(2*time.Minute)) || r1.Path != "~/bin/tool-1" || r1.ELF == nil {
		t.Errorf("record 1 = %+v", r1)
	}
	r2 := m[facts(2).SHA256]
	if r2.ExecCount != 0 || !r2.Loaded || !r2.FirstSeen.Equal(t0) {
		t.Errorf("record 2 = %+v", r2)
	}
	if s := q.Stats(); s.Records != 2 || s.Pending != 2 || s.Bytes <= 0 {
		t.Errorf("stats = %+v", s)
	}
}

func TestAddRejectsBadHash(t *testing.T) {
	t.Parallel()
	q := openTest(t, filepath.Join(t.TempDir(), "q.db"), Options{})
	tests := []struct {
		name string
		hash string
	}{
		{"empty", ""},
		{"short", "abc"},
		{"uppercase", strings.ToUpper(facts(1).SHA256)},
		{"not hex", strings.Repeat("g", 64)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := q.Add(Event{Facts: identify.Facts{SHA256: tc.hash}, Execs: 1}); !errors.Is(err, ErrBadHash) {
				t.Errorf("Add(%q) = %v, want ErrBadHash", tc.hash, err)
			}
		})
	}
}

func TestBatchLifecycle(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "q.db")
	q := openTest(t, path, Options{})
	execs(t, q, 1, 5, t0)
	execs(t, q, 2, 1, t0.Add(time.Second))
	mustAdd(t, q, Event{Facts: facts(3), Loaded: true, Time: t0.Add(2 * time.Second)})

	b, err := q.TakeBatch(2)
	if err != nil {
		t.Fatal(err)
	}
	if len(b.Records) != 2 || b.ID == "" || b.Records[0].SHA256 != facts(1).SHA256 || b.Records[0].ExecCount != 5 || b.Records[1].ExecCount != 1 {
		t.Fatalf("batch = %+v", b)
	}

	// More executions while the batch is in flight: the batch does not
	// change, and survives a restart.
	execs(t, q, 1, 2, t0.Add(time.Hour))
	again, err := q.TakeBatch(100)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(again, b) {
		t.Errorf("retry differs:\n%+v\n%+v", again, b)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	q = openTest(t, path, Options{})
	again, err = q.TakeBatch(100)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(again, b) {
		t.Errorf("after restart:\n%+v\n%+v", again, b)
	}
	if err := q.MarkSent("other"); !errors.Is(err, ErrUnknownBatch) {
		t.Errorf("MarkSent(other) = %v", err)
	}
	if err := q.MarkSent(b.ID); err != nil {
		t.Fatal(err)
	}
	if err := q.MarkSent(b.ID); !errors.Is(err, ErrUnknownBatch) {
		t.Errorf("second MarkSent = %v", err)
	}

	// What is left: the 2 later executions of 1, and record 3.
	m := recordsByHash(t, q)
	if r := m[facts(1).SHA256]; r.ExecCount != 7 || r.SentCount != 5 {
		t.Errorf("record 1 = %+v", r)
	}
	if r := m[facts(2).SHA256]; r.Pending() {
		t.Errorf("record 2 still pending: %+v", r)
	}
	b2, err := q.TakeBatch(100)
	if err != nil {
		t.Fatal(err)
	}
	if b2.ID == b.ID || len(b2.Records) != 2 {
		t.Fatalf("second batch = %+v", b2)
	}
	got := map[string]string{}
	for _, r := range b2.Records {
		got[r.SHA256] = fmt.Sprint(r.ExecCount, r.Loaded)
	}
	want := map[string]string{facts(1).SHA256: "2 false", facts(3).SHA256: "0 true"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("second batch deltas = %v, want %v", got, want)
	}
	if err := q.MarkSent(b2.ID); err != nil {
		t.Fatal(err)
	}
	if s := q.Stats(); s.Pending != 0 || s.Records != 3 {
		t.Errorf("stats = %+v", s)
	}
	empty, err := q.TakeBatch(100)
	if err != nil || empty.ID != "" || len(empty.Records) != 0 {
		t.Errorf("empty batch = %+v, %v", empty, err)
	}
	// Loading again after the loaded flag was sent is nothing new.
	mustAdd(t, q, Event{Facts: facts(3), Loaded: true, Time: t0.Add(3 * time.Hour)})
	if err := q.Flush(); err != nil {
		t.Fatal(err)
	}
	if s := q.Stats(); s.Pending != 0 {
		t.Errorf("loaded twice: %+v", s)
	}
}

// preview returns what Preview shows: the batch's records, then the rest.
func preview(t *testing.T, q *Queue) (string, []wire.Record, []wire.Record) {
	t.Helper()
	var batch, rest []wire.Record
	id, err := q.Preview(func(r wire.Record, inBatch bool) error {
		if inBatch {
			if len(rest) > 0 {
				t.Errorf("a record of the batch after the rest: %+v", r)
			}
			batch = append(batch, r)
		} else {
			rest = append(rest, r)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("preview: %v", err)
	}
	return id, batch, rest
}

// The preview shows every pending record: the batch in flight with the
// exact deltas it carries, then what is pending beyond it, oldest first;
// with nothing in flight, everything is the rest.
func TestPreview(t *testing.T) {
	t.Parallel()
	q := openTest(t, filepath.Join(t.TempDir(), "q.db"), Options{})
	execs(t, q, 1, 1001, t0)
	execs(t, q, 2, 3, t0.Add(time.Second))
	mustAdd(t, q, Event{Facts: facts(3), Loaded: true, Time: t0.Add(2 * time.Second)})
	id, batch, rest := preview(t, q)
	if id != "" || len(batch) != 0 || len(rest) != 3 || rest[0].SHA256 != facts(1).SHA256 || rest[0].ExecCount != 1001 {
		t.Fatalf("before a batch: id %q, batch %+v, rest %+v", id, batch, rest)
	}
	b, err := q.TakeBatch(2)
	if err != nil {
		t.Fatal(err)
	}
	// The same program runs 1,001 times more after the batch was cut.
	execs(t, q, 1, 1001, t0.Add(time.Hour))
	id, batch, rest = preview(t, q)
	if id != b.ID || !reflect.DeepEqual(batch, b.Records) {
		t.Errorf("batch in the preview = %q %+v, want %q %+v", id, batch, b.ID, b.Records)
	}
	got := map[string]string{}
	for _, r := range rest {
		got[r.SHA256] = fmt.Sprint(r.ExecCount, r.Loaded)
	}
	want := map[string]string{facts(1).SHA256: "1001 false", facts(3).SHA256: "0 true"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("the rest = %v, want %v", got, want)
	}
	if s := q.Stats(); s.Batch != 2 || s.BatchExecs != 1004 || s.PendingExecs != 2005 || s.Pending != 3 {
		t.Errorf("stats = %+v", s)
	}
	// Many records come in pages; every one is shown once.
	for i := 10; i < 10+3*previewPage; i++ {
		execs(t, q, i, 1, t0.Add(time.Duration(i)*time.Minute))
	}
	_, batch, rest = preview(t, q)
	if len(batch) != 2 || len(rest) != 2+3*previewPage {
		t.Errorf("paged preview: %d in the batch, %d after, want 2 and %d", len(batch), len(rest), 2+3*previewPage)
	}
	seen := map[string]bool{}
	for _, r := range rest {
		if seen[r.SHA256] {
			t.Errorf("%s shown twice", r.SHA256)
		}
		seen[r.SHA256] = true
	}
	// A caller's error stops the preview.
	stop := errors.New("client gone")
	if _, err := q.Preview(func(wire.Record, bool) error { return stop }); !errors.Is(err, stop) {
		t.Errorf("Preview = %v, want the caller's error", err)
	}
}

func TestBatchIDStable(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	q := openTest(t, filepath.Join(dir, "q.db"), Options{})
	execs(t, q, 1, 2, t0)
	b, err := q.TakeBatch(10)
	if err != nil {
		t.Fatal(err)
	}
	if err := q.ReleaseBatch(b.ID); err != nil {
		t.Fatal(err)
	}
	again, err := q.TakeBatch(10)
	if err != nil {
		t.Fatal(err)
	}
	if again.ID != b.ID {
		t.Errorf("same content, new ID: %s vs %s", again.ID, b.ID)
	}
	// Another queue (another installation) with the same content.
	other := openTest(t, filepath.Join(dir, "other.db"), Options{})
	execs(t, other, 1, 2, t0)
	ob, err := other.TakeBatch(10)
	if err != nil {
		t.Fatal(err)
	}
	if ob.ID == b.ID {
		t.Error("two queues gave the same batch ID")
	}
}

func TestDropBatch(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "q.db")
	q := openTest(t, path, Options{})
	execs(t, q, 1, 3, t0)
	execs(t, q, 2, 3, t0)
	b, err := q.TakeBatch(10)
	if err != nil {
		t.Fatal(err)
	}
	execs(t, q, 1, 1, t0)
	if err := q.DropBatch(b.ID); err != nil {
		t.Fatal(err)
	}
	if err := q.Flush(); err != nil {
		t.Fatal(err)
	}
	if s := q.Stats(); s.Dropped != 2 || s.Pending != 1 {
		t.Errorf("stats = %+v", s)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	q = openTest(t, path, Options{})
	if s := q.Stats(); s.Dropped != 2 || s.Pending != 1 || s.Records != 2 {
		t.Errorf("after reopen = %+v", s)
	}
}

func TestEviction(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		opts Options
	}{
		{"by records", Options{MaxRecords: 10}},
		{"by bytes", Options{MaxBytes: 10 * 330}}, // about ten records of ~320 bytes
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			q := openTest(t, filepath.Join(t.TempDir(), "q.db"), tc.opts)
			// Four old records, sent.
			for i := range 4 {
				execs(t, q, i, 1, t0.Add(time.Duration(i)*time.Second))
			}
			b, err := q.TakeBatch(100)
			if err != nil {
				t.Fatal(err)
			}
			if err := q.MarkSent(b.ID); err != nil {
				t.Fatal(err)
			}
			// Eight newer pending records: the sent ones go first even
			// though pending record 100 is older than them.
			execs(t, q, 100, 1, t0.Add(-time.Hour))
			for i := 101; i < 108; i++ {
				execs(t, q, i, 1, t0.Add(time.Duration(i)*time.Second))
			}
			if err := q.Flush(); err != nil {
				t.Fatal(err)
			}
			s := q.Stats()
			if s.Records > 10 || s.Bytes > 10*330 && tc.opts.MaxBytes > 0 || s.Evicted == 0 {
				t.Fatalf("stats = %+v", s)
			}
			m := recordsByHash(t, q)
			for i := 100; i < 108; i++ {
				if _, ok := m[facts(i).SHA256]; !ok {
					t.Errorf("pending record %d evicted before sent ones", i)
				}
			}
			// Older sent records go before newer ones.
			for i := 1; i < 4; i++ {
				_, older := m[facts(i-1).SHA256]
				_, newer := m[facts(i).SHA256]
				if older && !newer {
					t.Errorf("sent record %d kept, newer %d evicted", i-1, i)
				}
			}
			// Past the sent ones, the oldest pending record goes first.
			for i := 108; i < 112; i++ {
				execs(t, q, i, 1, t0.Add(time.Duration(i)*time.Second))
			}
			if err := q.Flush(); err != nil {
				t.Fatal(err)
			}
			m = recordsByHash(t, q)
			if _, ok := m[facts(100).SHA256]; ok {
				t.Error("oldest pending record kept")
			}
			if _, ok := m[facts(111).SHA256]; !ok {
				t.Error("newest record evicted")
			}
		})
	}
}

func TestPurge(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "q.db")
	q := openTest(t, path, Options{})
	const marker = "purge-marker-7f3a"
	f := facts(1)
	f.Path = "/opt/" + marker + "/tool"
	for range 3 {
		mustAdd(t, q, Event{Facts: f, Execs: 1, Time: t0})
	}
	if _, err := q.TakeBatch(10); err != nil { // the marker is in flight too
		t.Fatal(err)
	}
	mustAdd(t, q, Event{Facts: f, Execs: 1, Time: t0}) // and buffered
	aside := path + ".corrupt-old"
	if err := os.WriteFile(aside, []byte("old "+marker), 0o600); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(data, []byte(marker)) {
		t.Fatal("marker not on disk before purge: the test proves nothing")
	}
	if err := q.Purge(); err != nil {
		t.Fatal(err)
	}
	if s := q.Stats(); s != (Stats{}) {
		t.Errorf("stats after purge = %+v", s)
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(data, []byte(marker)) {
			t.Errorf("%s still holds the marker after purge", e.Name())
		}
	}
	if _, err := os.Stat(aside); !os.IsNotExist(err) {
		t.Errorf("moved-aside file survived purge: %v", err)
	}
	// Still usable, and the buffered event is gone too.
	if err := q.Flush(); err != nil {
		t.Fatal(err)
	}
	if s := q.Stats(); s.Records != 0 {
		t.Errorf("buffered event survived purge: %+v", s)
	}
	execs(t, q, 2, 1, t0)
	if b, err := q.TakeBatch(10); err != nil || len(b.Records) != 1 {
		t.Errorf("after purge: %+v, %v", b, err)
	}
}

func TestServe(t *testing.T) {
	t.Parallel()
	q := openTest(t, filepath.Join(t.TempDir(), "q.db"), Options{CommitEvents: 10, CommitInterval: time.Hour})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- q.Serve(ctx) }()
	// Ten distinct hashes ask for an early commit.
	for i := range 10 {
		execs(t, q, i, 1, t0)
	}
	deadline := time.Now().Add(10 * time.Second)
	for q.Stats().Records != 10 {
		if time.Now().After(deadline) {
			t.Fatalf("no early commit: %+v", q.Stats())
		}
		time.Sleep(time.Millisecond)
	}
	// Cancelling commits what is left.
	execs(t, q, 99, 1, t0)
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Serve = %v", err)
	}
	if s := q.Stats(); s.Records != 11 {
		t.Errorf("no final commit: %+v", s)
	}
}

func TestAddBoundedWithoutServe(t *testing.T) {
	t.Parallel()
	q := openTest(t, filepath.Join(t.TempDir(), "q.db"), Options{CommitEvents: 5})
	for i := range 20 {
		execs(t, q, i, 1, t0)
	}
	if s := q.Stats(); s.Records != 20 {
		t.Errorf("Add did not commit at 4×CommitEvents: %+v", s)
	}
}

func TestClosed(t *testing.T) {
	t.Parallel()
	q := openTest(t, filepath.Join(t.TempDir(), "q.db"), Options{})
	execs(t, q, 1, 1, t0)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if err := q.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
	if err := q.Add(Event{Facts: facts(1), Execs: 1}); !errors.Is(err, ErrClosed) {
		t.Errorf("Add after Close = %v", err)
	}
	if _, err := q.TakeBatch(1); !errors.Is(err, ErrClosed) {
		t.Errorf("TakeBatch after Close = %v", err)
	}
}

func TestOpenInUse(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "q.db")
	openTest(t, path, Options{})
	if _, err := Open(path, Options{}); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("second Open = %v", err)
	}
	if m, _ := filepath.Glob(path + ".corrupt-*"); len(m) != 0 {
		t.Errorf("a file in use was moved aside: %v", m)
	}
}

// TestMillionEventsThousandHashes: aggregation keeps one record per hash.
func TestMillionEventsThousandHashes(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("short")
	}
	q := openTest(t, filepath.Join(t.TempDir(), "q.db"), Options{})
	n := millionEvents(t, q)
	if s := q.Stats(); s.Records != 1000 || s.Pending != 1000 {
		t.Errorf("stats = %+v", s)
	}
	var total uint64
	for _, r := range recordsByHash(t, q) {
		total += r.ExecCount
	}
	if total != uint64(n) {
		t.Errorf("total executions %d, want %d", total, n)
	}
}

// millionEvents adds 1,000,000 executions of 1,000 files, committing
// every 10,000 events as a busy Serve would, and returns the count.
func millionEvents(tb testing.TB, q *Queue) int {
	fs := make([]identify.Facts, 1000)
	for i := range fs {
		fs[i] = facts(i)
	}
	const n = 1_000_000
	for i := range n {
		if err := q.Add(Event{Facts: fs[i%len(fs)], Execs: 1, Time: t0.Add(time.Duration(i))}); err != nil {
			tb.Fatal(err)
		}
		if i%10_000 == 9_999 {
			if err := q.Flush(); err != nil {
				tb.Fatal(err)
			}
		}
	}
	if err := q.Flush(); err != nil {
		tb.Fatal(err)
	}
	return n
}

// BenchmarkAddDurable measures upserts per second with durability: Add on
// the caller's goroutine and a fsynced group commit every 10,000 events
// (Options.CommitEvents; Serve commits at least as rarely), over 1,000 and
// over 100,000 distinct files.
func BenchmarkAddDurable(b *testing.B) {
	for _, distinct := range []int{1000, 100_000} {
		b.Run(fmt.Sprintf("distinct=%d", distinct), func(b *testing.B) {
			q, err := Open(filepath.Join(b.TempDir(), "q.db"), Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer q.Close()
			fs := make([]identify.Facts, distinct)
			for i := range fs {
				fs[i] = facts(i)
			}
			b.ReportAllocs()
			start := time.Now()
			i := 0
			for b.Loop() {
				if err := q.Add(Event{Facts: fs[i%distinct], Execs: 1, Time: t0}); err != nil {
					b.Fatal(err)
				}
				if i%10_000 == 9_999 {
					if err := q.Flush(); err != nil {
						b.Fatal(err)
					}
				}
				i++
			}
			if err := q.Flush(); err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "upserts/s")
		})
	}
}

// BenchmarkAddHotPath measures Add alone (the exec event path), with
// commits outside the timer.
func BenchmarkAddHotPath(b *testing.B) {
	q, err := Open(filepath.Join(b.TempDir(), "q.db"), Options{CommitEvents: 1 << 20})
	if err != nil {
		b.Fatal(err)
	}
	defer q.Close()
	fs := make([]identify.Facts, 1000)
	for i := range fs {
		fs[i] = facts(i)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if err := q.Add(Event{Facts: fs[i%len(fs)], Execs: 1, Time: t0}); err != nil {
			b.Fatal(err)
		}
		i++
		if i%100_000 == 0 {
			b.StopTimer()
			q.Flush()
			b.StartTimer()
		}
	}
}

// BenchmarkMillionEvents runs 1,000,000 executions of 1,000 files per
// iteration and reports the record count (must be 1,000) and the rate.
func BenchmarkMillionEvents(b *testing.B) {
	var records int
	start := time.Now()
	for b.Loop() {
		q, err := Open(filepath.Join(b.TempDir(), "q.db"), Options{})
		if err != nil {
			b.Fatal(err)
		}
		millionEvents(b, q)
		records = q.Stats().Records
		q.Close()
	}
	b.ReportMetric(float64(records), "records")
	b.ReportMetric(float64(b.N)*1e6/time.Since(start).Seconds(), "upserts/s")
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// Empty sees events that are only buffered, so a purge decided on it
// leaves nothing to be committed later.
func TestEmptyCountsBufferedEvents(t *testing.T) {
	t.Parallel()
	q, err := Open(filepath.Join(t.TempDir(), "q.db"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	if !q.Empty() {
		t.Fatal("a new queue is not empty")
	}
	if err := q.Add(Event{Facts: facts(1), Execs: 1}); err != nil {
		t.Fatal(err)
	}
	if q.Empty() || q.Stats().Records != 0 {
		t.Fatalf("buffered event: Empty() = %v, records %d; want false, 0 (not yet committed)", q.Empty(), q.Stats().Records)
	}
	if err := q.Purge(); err != nil {
		t.Fatal(err)
	}
	if err := q.Flush(); err != nil {
		t.Fatal(err)
	}
	if !q.Empty() || q.Stats().Records != 0 {
		t.Fatalf("after purge and a commit: Empty() = %v, records %d", q.Empty(), q.Stats().Records)
	}
}

// heapInUse is the live heap after a collection.
func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// What the queue holds in memory does not grow with the records it
// stores: five times the records, cut into batches, previewed and
// evicted, leave the heap where it was (a map entry per record would add
// about 2.5 MB here).
func TestMemoryFlatWithRecords(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	q := openTest(t, filepath.Join(t.TempDir(), "q.db"), Options{MaxRecords: 25_000})
	fill := func(from, to int) {
		for i := from; i < to; i++ {
			mustAdd(t, q, Event{Facts: facts(i), Execs: 1, Time: t0.Add(time.Duration(i) * time.Millisecond)})
		}
		if err := q.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	use := func() {
		b, err := q.TakeBatch(100)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := q.Preview(func(wire.Record, bool) error { return nil }); err != nil {
			t.Fatal(err)
		}
		if err := q.MarkSent(b.ID); err != nil {
			t.Fatal(err)
		}
	}
	fill(0, 6_000)
	use()
	before := heapInUse()
	for from := 6_000; from < 30_000; from += 6_000 {
		fill(from, from+6_000)
		use()
	}
	after := heapInUse()
	s := q.Stats()
	t.Logf("heap %d KiB with 6,000 records, %d KiB with %d (evicted %d)", before>>10, after>>10, s.Records, s.Evicted)
	if s.Records < 24_000 || s.Evicted == 0 {
		t.Fatalf("stats = %+v", s)
	}
	if after > before+1<<20 {
		t.Errorf("heap grew by %d KiB with the records", (after-before)>>10)
	}
}

// mappedKiB is how much of the file at path is resident in this process's
// mappings, from /proc/self/smaps.
func mappedKiB(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		t.Skipf("no /proc/self/smaps: %v", err)
	}
	kib, in := 0, false
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 5 && strings.Contains(f[0], "-") && len(f[1]) == 4:
			// A mapping's first line; anonymous ones have no path.
			in = len(f) >= 6 && f[len(f)-1] == path
		case in && len(f) == 3 && f[0] == "Rss:":
			n, _ := strconv.Atoi(f[1])
			kib += n
		}
	}
	return kib
}

// Reading the queue does not keep it resident: after the checks at open,
// a preview of every record, a batch and a commit, the file's pages are
// released from the mapping (without that, most of the file of this test,
// about 20 MB, stays resident from the open on).
func TestFileNotKeptResident(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "q.db")
	q := openTest(t, path, Options{})
	for i := range 10_000 {
		f := facts(i)
		f.Path = "/opt/" + strings.Repeat("p", 400) + fmt.Sprint(i)
		mustAdd(t, q, Event{Facts: f, Execs: 1, Time: t0})
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	q = openTest(t, path, Options{})
	const most = 1024 // KiB: a few pages may be mapped again at once
	check := func(when string) {
		t.Helper()
		if kib := mappedKiB(t, path); kib > most {
			t.Errorf("%s: %d KiB of the %d KiB file resident", when, kib, st.Size()>>10)
		}
	}
	check("after open")
	n := 0
	if _, err := q.Preview(func(wire.Record, bool) error { n++; return nil }); err != nil || n != 10_000 {
		t.Fatalf("preview: %d records, %v", n, err)
	}
	check("after a preview")
	b, err := q.TakeBatch(5000)
	if err != nil {
		t.Fatal(err)
	}
	check("after a batch")
	if err := q.MarkSent(b.ID); err != nil {
		t.Fatal(err)
	}
	execs(t, q, 5, 1, t0)
	if err := q.Flush(); err != nil {
		t.Fatal(err)
	}
	check("after a commit")
}
