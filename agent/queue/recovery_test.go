package queue

import (
	"bufio"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// makeQueue writes a queue with 50 records and one batch in flight.
func makeQueue(t *testing.T, path string) {
	t.Helper()
	q, err := Open(path, Options{Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		execs(t, q, i, 2, t0)
	}
	if _, err := q.TakeBatch(10); err != nil {
		t.Fatal(err)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
}

// editBolt changes a closed queue file with bbolt directly.
func editBolt(t *testing.T, path string, fn func(tx *bolt.Tx) error) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(fn); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestOpenDamaged opens files damaged in named ways: each is either
// repaired in place or moved aside with a clear warning, never a crash,
// and the queue works afterwards.
func TestOpenDamaged(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		damage      func(t *testing.T, path string)
		movedAside  bool
		wantLog     string
		wantRecords int // after opening
	}{
		{"zero length", func(t *testing.T, p string) {
			if err := os.Truncate(p, 0); err != nil {
				t.Fatal(err)
			}
		}, false, "", 0},
		{"truncated to one page", func(t *testing.T, p string) {
			if err := os.Truncate(p, 4096); err != nil {
				t.Fatal(err)
			}
		}, true, "queue file was damaged", 0},
		{"truncated inside its pages", func(t *testing.T, p string) {
			var used int64
			editBolt(t, p, func(tx *bolt.Tx) error { used = tx.Size(); return nil })
			if err := os.Truncate(p, used-4096); err != nil {
				t.Fatal(err)
			}
		}, true, "(truncated)", 0},
		{"truncated slack only", func(t *testing.T, p string) {
			var used int64
			editBolt(t, p, func(tx *bolt.Tx) error { used = tx.Size(); return nil })
			if err := os.Truncate(p, used); err != nil {
				t.Fatal(err)
			}
		}, false, "", 50},
		{"garbage", func(t *testing.T, p string) {
			b := make([]byte, 64<<10)
			r := rand.New(rand.NewPCG(1, 2))
			for i := range b {
				b[i] = byte(r.Uint32())
			}
			if err := os.WriteFile(p, b, 0o600); err != nil {
				t.Fatal(err)
			}
		}, true, "queue file was damaged", 0},
		{"text file", func(t *testing.T, p string) {
			if err := os.WriteFile(p, []byte("not a database\n"), 0o600); err != nil {
				t.Fatal(err)
			}
		}, true, "queue file was damaged", 0},
		{"meta pages zeroed", func(t *testing.T, p string) {
			f, err := os.OpenFile(p, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.WriteAt(make([]byte, 8192), 0); err != nil {
				t.Fatal(err)
			}
		}, true, "queue file was damaged", 0},
		{"data pages overwritten", func(t *testing.T, p string) {
			f, err := os.OpenFile(p, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			st, _ := f.Stat()
			junk := []byte(strings.Repeat("\xff\x13", 2048))
			for off := int64(8192); off < st.Size(); off += 4096 {
				if _, err := f.WriteAt(junk, off); err != nil {
					t.Fatal(err)
				}
			}
		}, true, "queue file was damaged", 0},
		{"wrong version", func(t *testing.T, p string) {
			editBolt(t, p, func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Put(keyVersion, []byte("99")) })
		}, true, `schema version \"99\"`, 0},
		{"meta bucket missing", func(t *testing.T, p string) {
			editBolt(t, p, func(tx *bolt.Tx) error { return tx.DeleteBucket(bucketMeta) })
		}, true, "meta bucket missing", 0},
		{"records bucket missing", func(t *testing.T, p string) {
			editBolt(t, p, func(tx *bolt.Tx) error { return tx.DeleteBucket(bucketRecords) })
		}, false, "bucket was missing", 0},
		{"inflight bucket missing", func(t *testing.T, p string) {
			editBolt(t, p, func(tx *bolt.Tx) error { return tx.DeleteBucket(bucketInflight) })
		}, false, "bucket was missing", 50},
		{"undecodable record", func(t *testing.T, p string) {
			editBolt(t, p, func(tx *bolt.Tx) error {
				b := tx.Bucket(bucketRecords)
				k, _ := b.Cursor().First()
				if err := b.Put(k, []byte("\x01short")); err != nil {
					return err
				}
				return b.Put([]byte("bad key"), []byte("x"))
			})
		}, false, "records were damaged", 49},
		{"record under another hash", func(t *testing.T, p string) {
			editBolt(t, p, func(tx *bolt.Tx) error {
				b := tx.Bucket(bucketRecords)
				_, v := b.Cursor().First()
				return b.Put(make([]byte, 32), append([]byte(nil), v...))
			})
		}, false, "records were damaged", 50},
		{"order bucket missing", func(t *testing.T, p string) {
			editBolt(t, p, func(tx *bolt.Tx) error { return tx.DeleteBucket(bucketOrder) })
		}, false, "queue order was damaged and is rebuilt", 50},
		{"order key lost", func(t *testing.T, p string) {
			editBolt(t, p, func(tx *bolt.Tx) error {
				c := tx.Bucket(bucketOrder).Cursor()
				k, _ := c.First()
				return c.Bucket().Delete(k)
			})
		}, false, "queue order was damaged and is rebuilt", 50},
		{"batch records lost", func(t *testing.T, p string) {
			editBolt(t, p, func(tx *bolt.Tx) error {
				if err := tx.DeleteBucket(bucketInflightRecords); err != nil {
					return err
				}
				_, err := tx.CreateBucket(bucketInflightRecords)
				return err
			})
		}, false, "batch in flight was damaged", 50},
		{"damaged batch in flight", func(t *testing.T, p string) {
			editBolt(t, p, func(tx *bolt.Tx) error { return tx.Bucket(bucketInflight).Put(keyBatch, []byte("{not json")) })
		}, false, "batch in flight was damaged", 50},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := filepath.Join(dir, "q.db")
			makeQueue(t, path)
			tc.damage(t, path)
			var logs logBuffer
			q, err := Open(path, Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
			if err != nil {
				t.Fatalf("Open = %v", err)
			}
			defer q.Close()
			aside, _ := filepath.Glob(path + ".corrupt-*")
			if moved := len(aside) == 1; moved != tc.movedAside {
				t.Errorf("moved aside = %v (%v), want %v; log:\n%s", moved, aside, tc.movedAside, logs.String())
			}
			if !strings.Contains(logs.String(), tc.wantLog) {
				t.Errorf("log does not say %q:\n%s", tc.wantLog, logs.String())
			}
			if s := q.Stats(); s.Records != tc.wantRecords {
				t.Errorf("records = %d, want %d", s.Records, tc.wantRecords)
			}
			// The queue works, and reopens cleanly.
			execs(t, q, 1000, 1, t0)
			b, err := q.TakeBatch(1000)
			if err != nil || len(b.Records) == 0 {
				t.Fatalf("TakeBatch = %+v, %v", b, err)
			}
			if err := q.MarkSent(b.ID); err != nil {
				t.Fatal(err)
			}
			if err := q.Close(); err != nil {
				t.Fatal(err)
			}
			var logs2 logBuffer
			q2, err := Open(path, Options{Logger: slog.New(slog.NewTextHandler(&logs2, nil))})
			if err != nil {
				t.Fatal(err)
			}
			defer q2.Close()
			if logs2.String() != "" {
				t.Errorf("second open still repairs:\n%s", logs2.String())
			}
		})
	}
}

// A version 1 file (no order bucket, the batch in flight as one JSON
// value) is converted: its records, their order and the batch in flight,
// with its ID, are all there.
func TestOpenVersion1(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "q.db")
	makeQueue(t, path)
	q := openTest(t, path, Options{})
	want, err := q.TakeBatch(100)
	if err != nil {
		t.Fatal(err)
	}
	wantRecs := recordsByHash(t, q)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	editBolt(t, path, func(tx *bolt.Tx) error {
		data, err := json.Marshal(want)
		if err != nil {
			return err
		}
		if err := tx.Bucket(bucketInflight).Put(keyBatch, data); err != nil {
			return err
		}
		for _, b := range [][]byte{bucketOrder, bucketInflightRecords} {
			if err := tx.DeleteBucket(b); err != nil {
				return err
			}
		}
		return tx.Bucket(bucketMeta).Put(keyVersion, []byte("1"))
	})
	var logs logBuffer
	q, err = Open(path, Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	if strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), "converting") {
		t.Errorf("conversion log:\n%s", logs.String())
	}
	got, err := q.TakeBatch(1)
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("batch in flight after conversion = %+v, %v; want %+v", got, err, want)
	}
	if recs := recordsByHash(t, q); !reflect.DeepEqual(recs, wantRecs) {
		t.Errorf("records changed in the conversion")
	}
	if err := q.MarkSent(got.ID); err != nil {
		t.Fatal(err)
	}
	if s := q.Stats(); s.Records != 50 || s.Pending != 40 || len(want.Records) != 10 {
		t.Errorf("stats after the batch of %d = %+v, want 50 records, 40 pending", len(want.Records), s)
	}
}

// The crash test: a child process adds 100 executions (one per file) per
// round, commits, and prints "acked <round>". The parent kills it with
// SIGKILL at a random moment and checks, on reopening, that every
// acknowledged round is there, and that rounds are never torn.
const (
	crashChildEnv = "QUEUE_CRASH_CHILD"
	crashFiles    = 100
)

func crashChild(path string) {
	q, err := Open(path, Options{})
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	recs, err := q.Records()
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	var start uint64
	for _, r := range recs {
		if r.SHA256 == facts(0).SHA256 {
			start = r.ExecCount
		}
	}
	fmt.Println("start", start)
	for round := 0; ; round++ {
		for i := range crashFiles {
			if err := q.Add(Event{Facts: facts(i), Execs: 1}); err != nil {
				fmt.Println("error", err)
				os.Exit(1)
			}
		}
		if round%7 == 3 {
			// Batches in flight and acknowledged, now and then.
			if b, err := q.TakeBatch(30); err == nil && round%2 == 1 {
				q.MarkSent(b.ID)
			}
		}
		if err := q.Flush(); err != nil {
			fmt.Println("error", err)
			os.Exit(1)
		}
		fmt.Println("acked", round)
	}
}

func TestCrashSafety(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("short")
	}
	path := filepath.Join(t.TempDir(), "q.db")
	r := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	var prev uint64 // executions of file 0 after the previous run
	for iter := range 5 {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), crashChildEnv+"="+path)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		lines := make(chan string, 1<<16)
		go func() {
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				lines <- sc.Text()
			}
			close(lines)
		}()
		time.Sleep(time.Duration(200+r.IntN(600)) * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()

		start, acked := prev, -1
		for l := range lines {
			f := strings.Fields(l)
			switch {
			case len(f) == 2 && f[0] == "start":
				if n, _ := strconv.ParseUint(f[1], 10, 64); n != prev {
					t.Fatalf("iteration %d: child started at %d executions, the parent saw %d", iter, n, prev)
				}
			case len(f) == 2 && f[0] == "acked":
				acked, _ = strconv.Atoi(f[1])
			default:
				t.Fatalf("child: %s", l)
			}
		}
		q, err := Open(path, Options{Logger: discardLogger()})
		if err != nil {
			t.Fatalf("iteration %d: reopen: %v", iter, err)
		}
		if m, _ := filepath.Glob(path + ".corrupt-*"); len(m) != 0 {
			t.Fatalf("iteration %d: file moved aside after SIGKILL", iter)
		}
		recs := recordsByHash(t, q)
		if got := len(recs); got != 0 && got != crashFiles || acked >= 0 && got != crashFiles {
			t.Fatalf("iteration %d: %d records, want %d", iter, len(recs), crashFiles)
		}
		want := start + uint64(acked+1)
		var got uint64
		for i := range crashFiles {
			r := recs[facts(i).SHA256]
			if i == 0 {
				got = r.ExecCount
			}
			if r.ExecCount != got {
				t.Errorf("iteration %d: torn round: file %d has %d, file 0 has %d", iter, i, r.ExecCount, got)
			}
			if r.SentCount > r.ExecCount {
				t.Errorf("iteration %d: sent %d > exec %d", iter, r.SentCount, r.ExecCount)
			}
		}
		// A round may have committed without its ack being printed.
		if got < want || got > want+1 {
			t.Errorf("iteration %d: file 0 has %d executions, acknowledged %d", iter, got, want)
		}
		t.Logf("iteration %d: killed after %d acknowledged rounds, %d executions", iter, acked+1, got)
		prev = got
		if err := q.Close(); err != nil {
			t.Fatal(err)
		}
	}
}
