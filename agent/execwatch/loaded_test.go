package execwatch

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"
)

var (
	elfBytes    = []byte("\x7fELF\x02\x01\x01\x00 pretend program")
	scriptBytes = []byte("#!/bin/sh\necho hello\n")
	textBytes   = []byte("just some notes\n")
)

// writeSlowly writes data in pieces, as a download does.
func writeSlowly(t *testing.T, path string, data []byte, mode os.FileMode) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < len(data); i += 8 {
		if _, err := f.Write(data[i:min(i+8, len(data))]); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Millisecond)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// waitLoadedReady drops executable probes into dir until the watcher
// reports one, proving its watches are in place.
func waitLoadedReady(t *testing.T, r *running, dir string) {
	t.Helper()
	for i := range 50 {
		probe := filepath.Join(dir, fmt.Sprintf(".probe-%d", i))
		if err := os.WriteFile(probe, scriptBytes, 0o755); err != nil {
			t.Fatal(err)
		}
		got := r.collect(t, 1, 200*time.Millisecond, func(ev Event) bool { return ev.Path == probe })
		os.Remove(probe)
		if len(got) > 0 {
			return
		}
	}
	t.Fatalf("watcher never reported a file in %s", dir)
}

func TestLoaded(t *testing.T) {
	t.Parallel()
	const quiet = 100 * time.Millisecond
	tests := []struct {
		name  string
		data  []byte
		mode  os.FileMode
		chmod os.FileMode // applied after writing when non-zero
		want  int
	}{
		{"ELF made executable after download", elfBytes, 0o644, 0o755, 1},
		{"script written executable", scriptBytes, 0o700, 0, 1},
		{"ELF that is not executable", elfBytes, 0o644, 0, 0},
		{"executable that is neither ELF nor script", textBytes, 0o755, 0, 0},
		{"empty executable file", nil, 0o755, 0, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			home := t.TempDir()
			dl := filepath.Join(home, "Downloads")
			if err := os.Mkdir(dl, 0o755); err != nil {
				t.Fatal(err)
			}
			src := NewLoaded(LoadedOptions{Home: home, Quiet: quiet})
			r := start(t, src)
			waitLoadedReady(t, r, dl)
			path := filepath.Join(dl, "file")
			writeSlowly(t, path, tc.data, tc.mode)
			if tc.chmod != 0 {
				if err := os.Chmod(path, tc.chmod); err != nil {
					t.Fatal(err)
				}
			}
			got := r.quiet(t, 4*quiet, func(ev Event) bool {
				if ev.Path != path || ev.Kind != KindLoaded || ev.FD < 0 {
					t.Errorf("unexpected event %+v", ev)
					return false
				}
				return true
			})
			if len(got) != tc.want {
				t.Fatalf("got %d events, want %d", len(got), tc.want)
			}
		})
	}
}

// A missing folder created in the moment between the watcher's look for
// its nearest parent and the watch on that parent (as `mkdir -p` may) is
// found on the watcher's second look, so its programs are reported.
func TestLoadedFolderCreatedWhileParentIsWatched(t *testing.T) {
	home := t.TempDir()
	bin := filepath.Join(home, ".local", "bin")
	var once sync.Once
	beforeWatchingParent = func(string) {
		once.Do(func() {
			if err := os.MkdirAll(bin, 0o755); err != nil {
				t.Error(err)
			}
		})
	}
	t.Cleanup(func() { beforeWatchingParent = nil })
	src := NewLoaded(LoadedOptions{Home: home, Quiet: 50 * time.Millisecond})
	r := start(t, src)
	dl := filepath.Join(home, "Downloads")
	if err := os.Mkdir(dl, 0o755); err != nil {
		t.Fatal(err)
	}
	waitLoadedReady(t, r, dl)
	path := filepath.Join(bin, "tool")
	if err := os.WriteFile(path, scriptBytes, 0o755); err != nil {
		t.Fatal(err)
	}
	if got := r.collect(t, 1, 5*time.Second, func(ev Event) bool { return ev.Path == path }); len(got) != 1 {
		t.Fatalf("no event for %s: its folder appeared while the watcher began to watch its parent", path)
	}
}

func TestLoadedWaitsForMissingFolder(t *testing.T) {
	t.Parallel()
	home := t.TempDir()
	src := NewLoaded(LoadedOptions{Home: home, Quiet: 50 * time.Millisecond})
	if want := []string{filepath.Join(home, "Downloads"), filepath.Join(home, ".local", "bin")}; !slices.Equal(src.Dirs(), want) {
		t.Fatalf("dirs %q, want %q", src.Dirs(), want)
	}
	r := start(t, src)
	dl := filepath.Join(home, "Downloads")
	if err := os.Mkdir(dl, 0o755); err != nil {
		t.Fatal(err)
	}
	waitLoadedReady(t, r, dl)
	bin := filepath.Join(home, ".local", "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(bin, "tool")
	if err := os.WriteFile(path, scriptBytes, 0o755); err != nil {
		t.Fatal(err)
	}
	got := r.collect(t, 1, 5*time.Second, func(ev Event) bool { return ev.Path == path })
	if len(got) != 1 {
		t.Fatalf("no event for %s in a folder created after the start", path)
	}
	// A second file once the folder is watched directly.
	path2 := filepath.Join(bin, "tool2")
	if err := os.WriteFile(path2, elfBytes, 0o755); err != nil {
		t.Fatal(err)
	}
	if got := r.collect(t, 1, 5*time.Second, func(ev Event) bool { return ev.Path == path2 }); len(got) != 1 {
		t.Fatalf("no event for %s", path2)
	}
}

func TestLoadedIgnoresSpecialFiles(t *testing.T) {
	t.Parallel()
	home := t.TempDir()
	dl := filepath.Join(home, "Downloads")
	if err := os.Mkdir(dl, 0o755); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(home, "real")
	if err := os.WriteFile(target, elfBytes, 0o755); err != nil {
		t.Fatal(err)
	}
	r := start(t, NewLoaded(LoadedOptions{Home: home, Quiet: 50 * time.Millisecond}))
	waitLoadedReady(t, r, dl)
	if err := os.Symlink(target, filepath.Join(dl, "link")); err != nil {
		t.Fatal(err)
	}
	if err := mkfifo(filepath.Join(dl, "fifo")); err != nil {
		t.Fatal(err)
	}
	if got := r.quiet(t, 300*time.Millisecond, func(Event) bool { return true }); len(got) != 0 {
		t.Fatalf("got %d events for a symlink and a FIFO", len(got))
	}
}

func TestDownloadDir(t *testing.T) {
	home := "/home/someone"
	tests := []struct {
		name, dirs string
		want       string
	}{
		{"no file", "", "/home/someone/Downloads"},
		{"home relative", `XDG_DOWNLOAD_DIR="$HOME/Téléchargements"`, "/home/someone/Téléchargements"},
		{"braced home", `XDG_DOWNLOAD_DIR="${HOME}/dl"`, "/home/someone/dl"},
		{"absolute", `XDG_DOWNLOAD_DIR="/data/downloads"`, "/data/downloads"},
		{"escaped quote", `XDG_DOWNLOAD_DIR="$HOME/my \"dl\""`, `/home/someone/my "dl"`},
		{"disabled by pointing at home", `XDG_DOWNLOAD_DIR="$HOME/"`, ""},
		{"comments and other keys", "# comment\nXDG_MUSIC_DIR=\"$HOME/Music\"\n  XDG_DOWNLOAD_DIR=\"$HOME/Down\"  \n", "/home/someone/Down"},
		{"unquoted value", `XDG_DOWNLOAD_DIR=$HOME/dl`, "/home/someone/Downloads"},
		{"relative value", `XDG_DOWNLOAD_DIR="dl"`, "/home/someone/Downloads"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := t.TempDir()
			if tc.dirs != "" {
				if err := os.WriteFile(filepath.Join(cfg, "user-dirs.dirs"), []byte(tc.dirs), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if got := downloadDir(home, cfg); got != tc.want {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func TestLoadedReleasesDescriptors(t *testing.T) {
	home := t.TempDir()
	dl := filepath.Join(home, "Downloads")
	if err := os.Mkdir(dl, 0o755); err != nil {
		t.Fatal(err)
	}
	settleFDs(t)
	before := openFDs(t)
	r := start(t, NewLoaded(LoadedOptions{Home: home, Quiet: 20 * time.Millisecond}))
	waitLoadedReady(t, r, dl)
	// Leave one file waiting for its quiet period.
	if err := os.WriteFile(filepath.Join(dl, "late"), elfBytes, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := r.stop(t); !errors.Is(err, context.Canceled) {
		t.Fatalf("Serve returned %v, want context.Canceled", err)
	}
	if after := openFDs(t); !slices.Equal(before, after) {
		t.Fatalf("descriptors differ after Serve returned\nbefore: %q\nafter:  %q", before, after)
	}
}
