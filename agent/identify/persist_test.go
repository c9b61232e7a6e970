package identify

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// persistDir is a folder on a filesystem whose entries the cache keeps
// (the test's temporary folder, or one beside the package when that is a
// tmpfs).
func persistDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); err == nil && persistableFS[int64(sfs.Type)] != "" {
		return dir
	}
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	dir, err = os.MkdirTemp(wd, ".persist-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := unix.Statfs(dir, &sfs); err != nil || persistableFS[int64(sfs.Type)] == "" {
		t.Skipf("no folder on a filesystem the cache keeps (type %#x)", sfs.Type)
	}
	return dir
}

// savedCache identifies n programs with a cache file and saves it; it
// returns the cache's path and the programs.
func savedCache(t *testing.T, n int) (string, []string) {
	t.Helper()
	dir := persistDir(t)
	path := filepath.Join(dir, "identify.cache")
	id := New(Options{CachePath: path})
	var progs []string
	for i := range n {
		data := buildELF(elfSpec{typ: etDyn, interp: "/lib64/ld-linux-x86-64.so.2", buildID: testBuildID})
		data = append(data, fmt.Sprint("program ", i)...)
		p := writeFile(t, dir, fmt.Sprint("prog", i), data)
		if _, _, err := id.IdentifyPath(p); err != nil {
			t.Fatal(err)
		}
		progs = append(progs, p)
	}
	if err := id.Save(); err != nil {
		t.Fatal(err)
	}
	return path, progs
}

// A restart finds what was identified before: no file is hashed again,
// unless it changed.
func TestCacheSurvivesRestart(t *testing.T) {
	t.Parallel()
	path, progs := savedCache(t, 3)
	first := New(Options{})
	var want []Facts
	for _, p := range progs {
		f, _, err := first.IdentifyPath(p)
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, f)
	}
	// Let the ctime of the changed file differ from before.
	time.Sleep(10 * time.Millisecond)
	id := New(Options{CachePath: path})
	if err := id.Load(); err != nil {
		t.Fatal(err)
	}
	if s := id.Stats(); s.Loaded != 3 || s.Cached != 3 {
		t.Fatalf("stats after load = %+v", s)
	}
	for i, p := range progs {
		f, _, err := id.IdentifyPath(p)
		if err != nil {
			t.Fatal(err)
		}
		if f.SHA256 != want[i].SHA256 || f.Path != want[i].Path || *f.ELF != *want[i].ELF {
			t.Errorf("%s: loaded %+v, want %+v", p, f, want[i])
		}
	}
	if s := id.Stats(); s.Hits != 3 || s.Misses != 0 {
		t.Errorf("stats = %+v, want 3 hits and no file hashed again", s)
	}
	// A file changed since is hashed again, as in memory.
	if err := os.WriteFile(progs[0], []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if f, _, err := id.IdentifyPath(progs[0]); err != nil || f.SHA256 == want[0].SHA256 {
		t.Errorf("changed file: %+v, %v", f, err)
	}
	if s := id.Stats(); s.Misses != 1 {
		t.Errorf("stats = %+v, want the changed file hashed", s)
	}
}

// rewrite changes the lines of a cache file with edit and, when fix is
// set, writes a trailer that matches, so that the check of the contents
// themselves is what the test reaches.
func rewrite(t *testing.T, path string, fix bool, edit func(lines [][]byte) [][]byte) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := bytes.SplitAfter(data, []byte("\n"))
	lines = lines[:len(lines)-1] // after the last newline
	body := edit(append([][]byte(nil), lines[:len(lines)-1]...))
	trailer := lines[len(lines)-1]
	if fix {
		sum := sha256.New()
		for _, l := range body {
			sum.Write(l)
		}
		tr, _ := json.Marshal(trailerLine{Entries: len(body) - 2, SHA256: hex.EncodeToString(sum.Sum(nil))})
		trailer = append(tr, '\n')
	}
	var out []byte
	for _, l := range body {
		out = append(out, l...)
	}
	if err := os.WriteFile(path, append(out, trailer...), 0o600); err != nil {
		t.Fatal(err)
	}
}

// editEntry changes the first entry's JSON object.
func editEntry(t *testing.T, fn func(m map[string]any)) func([][]byte) [][]byte {
	return func(lines [][]byte) [][]byte {
		var m map[string]any
		if err := json.Unmarshal(lines[2], &m); err != nil {
			t.Fatal(err)
		}
		fn(m)
		b, _ := json.Marshal(m)
		lines[2] = append(b, '\n')
		return lines
	}
}

func facts0(m map[string]any) map[string]any { return m["facts"].(map[string]any) }

// A damaged cache file, in any of these ways, is ignored as a whole with
// an error saying why; the programs are identified again, and the next
// save writes a good file.
func TestCacheFileDamaged(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		damage func(t *testing.T, path string)
		want   string
	}{
		{"empty", func(t *testing.T, p string) { os.WriteFile(p, nil, 0o600) }, "truncated"},
		{"truncated in an entry", func(t *testing.T, p string) {
			st, _ := os.Stat(p)
			os.Truncate(p, st.Size()/2)
		}, "truncated"},
		{"trailer lost", func(t *testing.T, p string) {
			rewrite(t, p, false, func(l [][]byte) [][]byte { return l })
			data, _ := os.ReadFile(p)
			os.WriteFile(p, data[:bytes.LastIndex(data[:len(data)-1], []byte("\n"))+1], 0o600)
		}, "truncated"},
		{"a byte changed", func(t *testing.T, p string) {
			rewrite(t, p, false, func(l [][]byte) [][]byte { l[2] = bytes.Replace(l[2], []byte(`"size"`), []byte(`"Size"`), 1); return l })
		}, "checksum"},
		{"another version", func(t *testing.T, p string) {
			rewrite(t, p, true, func(l [][]byte) [][]byte { l[0] = []byte("cloudprotect identification cache 2\n"); return l })
		}, "not an identification cache of this version"},
		{"not a cache", func(t *testing.T, p string) { os.WriteFile(p, []byte("#!/bin/sh\nrm -rf /\n"), 0o600) }, "not an identification cache"},
		{"unknown field", func(t *testing.T, p string) {
			rewrite(t, p, true, editEntry(t, func(m map[string]any) { m["trusted"] = true }))
		}, "unknown field"},
		{"hash not hex", func(t *testing.T, p string) {
			rewrite(t, p, true, editEntry(t, func(m map[string]any) { facts0(m)["sha256"] = strings.Repeat("Z", 64) }))
		}, "SHA-256"},
		{"size not the key's", func(t *testing.T, p string) {
			rewrite(t, p, true, editEntry(t, func(m map[string]any) { facts0(m)["size"] = 1 }))
		}, "size"},
		{"unknown kind", func(t *testing.T, p string) {
			rewrite(t, p, true, editEntry(t, func(m map[string]any) { facts0(m)["kind"] = "pe" }))
		}, "kind"},
		{"ELF facts lost", func(t *testing.T, p string) {
			rewrite(t, p, true, editEntry(t, func(m map[string]any) { delete(facts0(m), "elf") }))
		}, "ELF facts"},
		{"path the cloud refuses", func(t *testing.T, p string) {
			rewrite(t, p, true, editEntry(t, func(m map[string]any) { facts0(m)["path"] = "/opt/\x1b[31mred" }))
		}, "path"},
		{"more entries than counted", func(t *testing.T, p string) {
			rewrite(t, p, false, func(l [][]byte) [][]byte { return append(l, l[2]) })
		}, "entries"},
		{"more entries than the cache holds", func(t *testing.T, p string) {
			rewrite(t, p, true, func(l [][]byte) [][]byte {
				for range DefaultCacheEntries {
					l = append(l, l[2])
				}
				return l
			})
		}, "more than"},
		{"a line too long", func(t *testing.T, p string) {
			rewrite(t, p, true, editEntry(t, func(m map[string]any) { facts0(m)["interpreter"] = strings.Repeat("x", maxCacheLine) }))
		}, "longer than"},
		{"bytes after the end", func(t *testing.T, p string) {
			f, _ := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
			f.WriteString("{}\n")
			f.Close()
		}, "after the last line"},
		{"a folder", func(t *testing.T, p string) {
			os.Remove(p)
			os.Mkdir(p, 0o700)
		}, "directory"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path, progs := savedCache(t, 3)
			tc.damage(t, path)
			id := New(Options{CachePath: path})
			err := id.Load()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Load = %v, want an error saying %q", err, tc.want)
			}
			if tc.name != "a folder" && !errors.Is(err, ErrCacheDamaged) {
				t.Errorf("Load = %v, want ErrCacheDamaged", err)
			}
			if s := id.Stats(); s.Cached != 0 || s.Loaded != 0 {
				t.Fatalf("a damaged file was loaded: %+v", s)
			}
			for _, p := range progs {
				if _, _, err := id.IdentifyPath(p); err != nil {
					t.Fatal(err)
				}
			}
			if s := id.Stats(); s.Misses != 3 {
				t.Errorf("stats = %+v, want every program hashed again", s)
			}
			if tc.name == "a folder" {
				os.Remove(path)
			}
			if err := id.Save(); err != nil {
				t.Fatal(err)
			}
			again := New(Options{CachePath: path})
			if err := again.Load(); err != nil || again.Stats().Loaded != 3 {
				t.Errorf("after the next save: %v, %+v", err, again.Stats())
			}
		})
	}
}

// Entries of a device that no longer holds the filesystem they were saved
// from (its number given to another disk) are left out; the others load.
func TestCacheDeviceReused(t *testing.T) {
	t.Parallel()
	path, progs := savedCache(t, 2)
	rewrite(t, path, true, func(l [][]byte) [][]byte {
		var fsl fsLine
		if err := json.Unmarshal(l[1], &fsl); err != nil || len(fsl.FS) != 1 {
			t.Fatalf("fs line %s: %v", l[1], err)
		}
		fsl.FS[0].FSID[0]++ // another filesystem
		b, _ := json.Marshal(fsl)
		l[1] = append(b, '\n')
		return l
	})
	id := New(Options{CachePath: path})
	if err := id.Load(); err != nil {
		t.Fatal(err)
	}
	if s := id.Stats(); s.Cached != 0 {
		t.Errorf("entries of another filesystem were loaded: %+v", s)
	}
	if _, _, err := id.IdentifyPath(progs[0]); err != nil || id.Stats().Misses != 1 {
		t.Errorf("identify after: %v, %+v", err, id.Stats())
	}
}

// Forget empties the cache and wipes its file; Serve saves what changed
// when it stops, and loads it when it starts.
func TestCacheForgetAndServe(t *testing.T) {
	t.Parallel()
	path, progs := savedCache(t, 2)
	id := New(Options{CachePath: path})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- id.Serve(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for id.Stats().Loaded != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("Serve did not load the cache: %+v", id.Stats())
		}
		time.Sleep(time.Millisecond)
	}
	extra := writeFile(t, filepath.Dir(path), "extra", []byte("#!/bin/sh\necho extra\n"))
	if _, _, err := id.IdentifyPath(extra); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Serve = %v", err)
	}
	again := New(Options{CachePath: path})
	if err := again.Load(); err != nil || again.Stats().Loaded != 3 {
		t.Fatalf("after Serve stopped: %v, %+v", err, again.Stats())
	}
	if err := again.Forget(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("cache file after Forget: %v", err)
	}
	if s := again.Stats(); s.Cached != 0 {
		t.Errorf("cache after Forget: %+v", s)
	}
	if _, _, err := again.IdentifyPath(progs[0]); err != nil || again.Stats().Misses != 1 {
		t.Errorf("identify after Forget: %v, %+v", err, again.Stats())
	}
}

// FuzzReadCache reads arbitrary bytes as a cache file: it never panics,
// and what it accepts holds no more entries than allowed, each of them
// facts the agent could have made.
func FuzzReadCache(f *testing.F) {
	dir, err := os.MkdirTemp("", "fuzz-cache-")
	if err != nil {
		f.Fatal(err)
	}
	defer os.RemoveAll(dir)
	id := New(Options{CachePath: filepath.Join(dir, "c")})
	for i := range 3 {
		p := filepath.Join(dir, fmt.Sprint("p", i))
		if err := os.WriteFile(p, []byte(fmt.Sprintf("#!/bin/sh\necho %d\n", i)), 0o755); err != nil {
			f.Fatal(err)
		}
		if _, _, err := id.IdentifyPath(p); err != nil {
			f.Fatal(err)
		}
	}
	if err := id.Save(); err != nil {
		f.Fatal(err)
	}
	if good, err := os.ReadFile(filepath.Join(dir, "c")); err == nil {
		f.Add(good)
	}
	f.Add([]byte(cacheHeader + "\n{\"fs\":[]}\n{\"entries\":0,\"sha256\":\"\"}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		const limit = 8
		entries, _, err := readCache(bytes.NewReader(data), limit)
		if err != nil {
			return
		}
		if len(entries) > limit {
			t.Fatalf("%d entries accepted, limit %d", len(entries), limit)
		}
		for _, e := range entries {
			line := entryLine{Size: e.key.size, Facts: e.facts}
			if err := checkEntry(&line); err != nil {
				t.Fatalf("accepted an entry the check refuses: %v", err)
			}
		}
	})
}
