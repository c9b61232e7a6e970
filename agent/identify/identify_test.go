package identify

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	code := m.Run()
	benchFileCleanup()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

func writeFile(t testing.TB, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func sum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func TestIdentifyKinds(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	elfData := buildELF(elfSpec{typ: etDyn, interp: "/lib64/ld-linux-x86-64.so.2", buildID: testBuildID})
	tests := []struct {
		name string
		data []byte
		want Facts
	}{
		{"elf", elfData, Facts{Kind: "elf", ELF: &ELF{Machine: "x86_64", Type: "dyn", PIE: true,
			Interpreter: "/lib64/ld-linux-x86-64.so.2", BuildID: "deadbeef0102030405060708090a0b0c0d0e0f10"}}},
		{"script", []byte("#!/usr/bin/env python3\nprint(1)\n"), Facts{Kind: "script", Interpreter: "/usr/bin/env python3"}},
		{"other", []byte("just data"), Facts{Kind: "other"}},
		{"empty", nil, Facts{Kind: "other"}},
		{"elf magic only", []byte("\x7fELF"), Facts{Kind: "elf", ELF: &ELF{Static: true,
			Malformed: "ELF identification at offset 0 length 16 lies outside the 4-byte file"}}},
		{"larger than one chunk", make([]byte, 3*hashChunk+7), Facts{Kind: "other"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			id := New(Options{})
			p := writeFile(t, dir, tc.name, tc.data)
			got, _, err := id.IdentifyPath(p)
			if err != nil {
				t.Fatal(err)
			}
			tc.want.SHA256 = sum(tc.data)
			tc.want.Size = int64(len(tc.data))
			tc.want.Path = id.anon.Anonymize(p)
			if got.ELF != nil && tc.want.ELF != nil && *got.ELF != *tc.want.ELF {
				t.Errorf("ELF = %+v, want %+v", *got.ELF, *tc.want.ELF)
			}
			got.ELF, tc.want.ELF = nil, nil
			if got != tc.want {
				t.Errorf("IdentifyPath:\n got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

// TestIdentifyLeavesOffset checks that identifying through a shared
// descriptor neither moves its offset nor depends on it.
func TestIdentifyLeavesOffset(t *testing.T) {
	t.Parallel()
	data := []byte("#!/bin/sh\necho offset\n")
	p := writeFile(t, t.TempDir(), "s", data)
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Seek(7, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	got, _, err := New(Options{}).Identify(f, "/home/alice/s")
	if err != nil {
		t.Fatal(err)
	}
	if got.SHA256 != sum(data) || got.Path != "~/s" || got.Kind != "script" {
		t.Errorf("Identify = %+v", got)
	}
	if off, _ := f.Seek(0, io.SeekCurrent); off != 7 {
		t.Errorf("offset moved to %d", off)
	}
}

func TestIdentifyCache(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	p := writeFile(t, dir, "tool", []byte("#!/bin/sh\n"))
	// A hard link is the same file under another path (made first: a new
	// link changes the ctime, so the file version).
	link := filepath.Join(dir, "link")
	if err := os.Link(p, link); err != nil {
		t.Fatal(err)
	}
	id := New(Options{})
	first, _, err := id.IdentifyPath(p)
	if err != nil {
		t.Fatal(err)
	}
	second, _, err := id.IdentifyPath(p)
	if err != nil {
		t.Fatal(err)
	}
	if first != second {
		t.Errorf("cache hit differs: %+v vs %+v", first, second)
	}
	third, _, err := id.IdentifyPath(link)
	if err != nil {
		t.Fatal(err)
	}
	// A hit keeps the path the file version was first seen under: paths
	// are resolved only for files not seen before.
	if third.SHA256 != first.SHA256 || third.Path != first.Path {
		t.Errorf("link: %+v", third)
	}
	if s := id.Stats(); s.Hits != 2 || s.Misses != 1 {
		t.Errorf("stats after hits = %+v", s)
	}
	// New contents give a new version (size and mtime change).
	if err := os.WriteFile(p, []byte("#!/bin/bash\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	fourth, _, err := id.IdentifyPath(p)
	if err != nil {
		t.Fatal(err)
	}
	if fourth.SHA256 == first.SHA256 || fourth.Interpreter != "/bin/bash" {
		t.Errorf("changed file: %+v", fourth)
	}
}

func TestCacheBounded(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	id := New(Options{CacheEntries: 4})
	var paths []string
	for i := range 10 {
		paths = append(paths, writeFile(t, dir, fmt.Sprint(i), []byte(fmt.Sprint(i))))
	}
	// Keep the first file hot: CLOCK must keep it.
	for _, p := range paths {
		if _, _, err := id.IdentifyPath(paths[0]); err != nil {
			t.Fatal(err)
		}
		if _, _, err := id.IdentifyPath(p); err != nil {
			t.Fatal(err)
		}
	}
	if n := id.Stats().Cached; n != 4 {
		t.Errorf("cached %d entries, want 4", n)
	}
	before := id.Stats().Hits
	if _, _, err := id.IdentifyPath(paths[0]); err != nil {
		t.Fatal(err)
	}
	if id.Stats().Hits != before+1 {
		t.Error("hot entry was evicted")
	}
}

func TestIdentifyRefusesNonRegular(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	id := New(Options{})
	tests := []struct {
		name string
		run  func() error
	}{
		{"fifo by path", func() error { _, _, err := id.IdentifyPath(fifo); return err }},
		{"fifo by descriptor", func() error {
			f, err := os.OpenFile(fifo, os.O_RDWR|unix.O_NONBLOCK, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			_, _, err = id.Identify(f, fifo)
			return err
		}},
		{"device by path", func() error { _, _, err := id.IdentifyPath("/dev/zero"); return err }},
		{"device by descriptor", func() error {
			f, err := os.Open("/dev/zero")
			if err != nil {
				return err
			}
			defer f.Close()
			_, _, err = id.Identify(f, "/dev/zero")
			return err
		}},
		{"directory", func() error { _, _, err := id.IdentifyPath(dir); return err }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.run(); !errors.Is(err, ErrNotRegular) {
				t.Errorf("err = %v, want ErrNotRegular", err)
			}
		})
	}
}

func TestIdentifyTooLarge(t *testing.T) {
	t.Parallel()
	p := filepath.Join(t.TempDir(), "sparse")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 1<<40); err != nil {
		t.Fatal(err)
	}
	if _, _, err := New(Options{}).IdentifyPath(p); !errors.Is(err, ErrTooLarge) {
		t.Errorf("err = %v, want ErrTooLarge", err)
	}
}

// TestIdentifyChangedWhileHashed rewrites the file after every read: one
// change is absorbed by reading again, a second one is an error.
func TestIdentifyChangedWhileHashed(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		changes int
		wantErr error
	}{
		{"changed once, read again", 1, nil},
		{"changed twice", 2, ErrChanged},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := writeFile(t, t.TempDir(), "f", []byte("#!/bin/sh\n"))
			id := New(Options{})
			n := 0
			id.afterRead = func() {
				if n < tc.changes {
					n++
					if err := os.WriteFile(p, []byte(fmt.Sprintf("#!/bin/sh\n# change %d\n", n)), 0o755); err != nil {
						t.Error(err)
					}
				}
			}
			got, _, err := id.IdentifyPath(p)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if err == nil {
				data, _ := os.ReadFile(p)
				if got.SHA256 != sum(data) || got.Size != int64(len(data)) {
					t.Errorf("facts %+v do not match the final contents", got)
				}
			}
		})
	}
}

func TestIdentifyLarge(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	data := make([]byte, 4096)
	data[0], data[1] = '#', '!'
	p := writeFile(t, dir, "big", data)
	link := filepath.Join(dir, "link")
	if err := os.Link(p, link); err != nil {
		t.Fatal(err)
	}
	id := New(Options{MaxInline: 1024})
	_, j1, err := id.IdentifyPath(p)
	if !errors.Is(err, ErrDeferred) || j1 == nil {
		t.Fatalf("err = %v, job %v; want ErrDeferred and a job", err, j1)
	}
	// The same file version under another path: a job with the same key,
	// which the caller drops.
	_, j2, err := id.IdentifyPath(link)
	if !errors.Is(err, ErrDeferred) || j2 == nil || j2.Key() != j1.Key() {
		t.Fatalf("second: err = %v, job %v", err, j2)
	}
	j2.Close()
	f, err := j1.Run(context.Background())
	if err != nil || f.SHA256 != sum(data) || f.Path != id.anon.Anonymize(p) {
		t.Errorf("Run = %+v, %v", f, err)
	}
	if f, _, err := id.IdentifyPath(link); err != nil || f.SHA256 != sum(data) {
		t.Errorf("after the job: %+v, %v", f, err)
	}
	if s := id.Stats(); s.Deferred != 2 || s.Background != 1 || s.Hits != 1 {
		t.Errorf("stats = %+v", s)
	}
}

// TestJobCancelHuge checks that hashing a huge sparse file stops when the
// job's context is cancelled.
func TestJobCancelHuge(t *testing.T) {
	t.Parallel()
	p := filepath.Join(t.TempDir(), "sparse")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 1<<40); err != nil {
		t.Fatal(err)
	}
	id := New(Options{MaxInline: 1 << 20, MaxSize: 1 << 41})
	_, job, err := id.IdentifyPath(p)
	if !errors.Is(err, ErrDeferred) {
		t.Fatalf("err = %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { _, err := job.Run(ctx); done <- err }()
	time.Sleep(50 * time.Millisecond) // let it start hashing
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Run = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not stop")
	}
}

// The benchmark file: 100 MB, created once per test binary run.
var (
	benchOnce sync.Once
	benchDir  string
	benchPath string
	benchErr  error
)

const benchSize = 100 << 20

func benchFile(b *testing.B) string {
	b.Helper()
	benchOnce.Do(func() {
		benchDir, benchErr = os.MkdirTemp("", "identify-bench-")
		if benchErr != nil {
			return
		}
		benchPath = filepath.Join(benchDir, "100MB")
		buf := make([]byte, benchSize)
		for i := range buf {
			buf[i] = byte(i*7 + i>>13)
		}
		benchErr = os.WriteFile(benchPath, buf, 0o644)
	})
	if benchErr != nil {
		b.Fatal(benchErr)
	}
	return benchPath
}

func benchFileCleanup() {
	if benchDir != "" {
		os.RemoveAll(benchDir)
	}
}

// BenchmarkFirstSeenSHA256 identifies a 100 MB file with an empty cache
// each time, then runs sha256sum on the same file as many times, and
// reports both throughputs and their ratio (ours / sha256sum).
func BenchmarkFirstSeenSHA256(b *testing.B) {
	p := benchFile(b)
	f, err := os.Open(p)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	b.SetBytes(benchSize)
	if _, _, err := New(Options{MaxInline: benchSize}).Identify(f, p); err != nil { // warm the page cache
		b.Fatal(err)
	}
	b.ResetTimer()
	start := time.Now()
	for b.Loop() {
		id := New(Options{MaxInline: benchSize})
		if _, _, err := id.Identify(f, p); err != nil {
			b.Fatal(err)
		}
	}
	ours := float64(benchSize) * float64(b.N) / time.Since(start).Seconds() / 1e6
	b.StopTimer()

	tool, err := exec.LookPath("sha256sum")
	if err != nil {
		b.Logf("sha256sum not found, no comparison: %v", err)
		return
	}
	start = time.Now()
	for range b.N {
		if out, err := exec.Command(tool, p).CombinedOutput(); err != nil {
			b.Fatalf("sha256sum: %v: %s", err, out)
		}
	}
	theirs := float64(benchSize) * float64(b.N) / time.Since(start).Seconds() / 1e6
	b.ReportMetric(theirs, "sha256sum-MB/s")
	b.ReportMetric(ours/theirs, "ratio")
}

// BenchmarkCacheHit measures a repeated exec of a known file: one fstat
// and a lookup. The fstat sub-benchmark is the system call alone, the
// floor under a hit on this machine.
func BenchmarkCacheHit(b *testing.B) {
	p := writeFile(b, b.TempDir(), "tool", buildELF(elfSpec{typ: etDyn, interp: "/lib64/ld-linux-x86-64.so.2", buildID: testBuildID}))
	f, err := os.Open(p)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	b.Run("identify", func(b *testing.B) {
		id := New(Options{})
		if _, _, err := id.Identify(f, "/home/alice/bin/tool"); err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			if _, _, err := id.Identify(f, "/home/alice/bin/tool"); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("fstat", func(b *testing.B) {
		var st unix.Stat_t
		fd := int(f.Fd())
		for b.Loop() {
			if err := unix.Fstat(fd, &st); err != nil {
				b.Fatal(err)
			}
		}
	})
}
