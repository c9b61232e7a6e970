package protect

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
)

const (
	shaA = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	shaB = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
)

func TestExceptionsPersist(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), ExceptionsFile)
	x, err := OpenExceptions(path)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	if _, err := x.Add(strings.ToUpper(shaA), "  in-house build tool ", 1000, now); err != nil {
		t.Fatal(err)
	}
	if _, err := x.Add(shaB, "vendor tool", 0, now.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if !x.Has(shaA) || x.Len() != 2 {
		t.Fatalf("Has(A) = %v, Len = %d", x.Has(shaA), x.Len())
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("file: %v %v", fi, err)
	}
	y, err := OpenExceptions(path)
	if err != nil {
		t.Fatal(err)
	}
	got := y.List()
	if len(got) != 2 || got[0].SHA256 != shaA || got[0].Reason != "in-house build tool" || got[0].UID != 1000 || !got[0].Added.Equal(now) {
		t.Fatalf("after reopening: %+v", got)
	}
	if err := y.Remove(shaA); err != nil {
		t.Fatal(err)
	}
	if err := y.Remove(shaA); !errors.Is(err, ErrNotFound) {
		t.Errorf("second Remove = %v; want ErrNotFound", err)
	}
	z, _ := OpenExceptions(path)
	if z.Has(shaA) || !z.Has(shaB) {
		t.Errorf("after Remove and reopening: %+v", z.List())
	}
}

func TestExceptionsRefuseBadInput(t *testing.T) {
	t.Parallel()
	x, _ := OpenExceptions(filepath.Join(t.TempDir(), ExceptionsFile))
	cases := []struct {
		name, sha, reason string
		want              error
	}{
		{"short hash", "abc", "r", ErrBadHash},
		{"not hex", strings.Repeat("g", 64), "r", ErrBadHash},
		{"no reason", shaA, "  ", ErrBadReason},
		{"reason too long", shaA, strings.Repeat("x", MaxReasonLength+1), ErrBadReason},
		{"control character", shaA, "ok\x1b[31m", ErrBadReason},
		{"bidirectional override", shaA, "tool\u202egnp.exe", ErrBadReason},
	}
	for _, tc := range cases {
		if _, err := x.Add(tc.sha, tc.reason, 0, time.Now()); !errors.Is(err, tc.want) {
			t.Errorf("%s: Add = %v; want %v", tc.name, err, tc.want)
		}
	}
	if x.Len() != 0 {
		t.Errorf("refused input was kept: %+v", x.List())
	}
}

// A file that cannot be read as a list is set aside whole, no exception
// applies (the verdicts do), and the notice says so.
func TestExceptionsCorruptFileSetAside(t *testing.T) {
	t.Parallel()
	cases := []struct{ name, content string }{
		{"torn write", `{"version": 1, "exceptions": [{"sha256": "` + shaA[:30]},
		{"not json", "garbage\x00\x01"},
		{"unknown version", `{"version": 2, "exceptions": []}`},
		{"bad hash", `{"version": 1, "exceptions": [{"sha256": "xyz", "reason": "r"}]}`},
		{"unknown field", `{"version": 1, "exceptions": [], "allow_all": true}`},
		{"trailing data", `{"version": 1, "exceptions": []} {}`},
		{"empty", ``},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := filepath.Join(dir, ExceptionsFile)
			os.WriteFile(path, []byte(tc.content), 0o600)
			x, err := OpenExceptions(path)
			if err != nil {
				t.Fatal(err)
			}
			if x.Len() != 0 || x.Notice() == "" {
				t.Fatalf("Len = %d, Notice = %q", x.Len(), x.Notice())
			}
			aside, _ := filepath.Glob(path + ".corrupt-*")
			if len(aside) != 1 {
				t.Fatalf("set aside: %v", aside)
			}
			if b, _ := os.ReadFile(aside[0]); string(b) != tc.content {
				t.Errorf("the set-aside file lost data: %q", b)
			}
			if _, err := os.Stat(path); !os.IsNotExist(err) {
				t.Errorf("the unreadable file is still in place: %v", err)
			}
		})
	}
}

// A change that cannot be written is not applied.
func TestExceptionsFailedSaveChangesNothing(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "state")
	os.Mkdir(dir, 0o700)
	x, _ := OpenExceptions(filepath.Join(dir, ExceptionsFile))
	if _, err := x.Add(shaB, "r", 0, time.Now()); err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(dir) // the state folder vanished: nothing can be written
	if _, err := x.Add(shaA, "r", 0, time.Now()); err == nil {
		t.Fatal("Add succeeded without a state folder")
	}
	if err := x.Remove(shaB); err == nil {
		t.Fatal("Remove succeeded without a state folder")
	}
	if !x.Has(shaB) {
		t.Error("an exception whose removal was not saved stopped applying")
	}
	if x.Has(shaA) {
		t.Error("an exception that was not saved applies")
	}
}

// Whatever the file holds, reading it never panics, and a list it accepts
// is written back to a file that reads the same.
func FuzzParseExceptions(f *testing.F) {
	f.Add([]byte(`{"version": 1, "exceptions": [{"sha256": "` + shaA + `", "reason": "tool", "added": "2026-05-01T12:00:00Z", "uid": 1000}]}`))
	f.Add([]byte(`{"version": 1, "exceptions": []}`))
	f.Add([]byte(`{"version": 2}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		list, err := parseExceptions(b)
		if err != nil {
			return
		}
		path := filepath.Join(t.TempDir(), ExceptionsFile)
		x := &Exceptions{path: path, byHash: map[string]api.Exception{}}
		for _, e := range list {
			x.byHash[e.SHA256] = e
		}
		if err := x.saveLocked(); err != nil {
			t.Fatal(err)
		}
		y, err := OpenExceptions(path)
		if err != nil || y.Notice() != "" || y.Len() != x.Len() {
			t.Fatalf("written list read back as %d exceptions (%v, %q); want %d", y.Len(), err, y.Notice(), x.Len())
		}
	})
}
