package execwatch

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const unprivChildEnv = "CLOUDPROTECT_EXECWATCH_UNPRIV_DIR"

// maybeUnprivilegedChild runs the unprivileged source on one directory and
// prints its events as JSON lines until stdin closes, when the test binary
// was started that way by TestFanotifyUnprivileged.
func maybeUnprivilegedChild() {
	dir := os.Getenv(unprivChildEnv)
	if dir == "" {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		io.Copy(io.Discard, os.Stdin)
		cancel()
	}()
	src := NewFanotifyUnprivileged(Options{Dirs: []string{dir}, BatchWindow: 5 * time.Millisecond})
	out := make(chan []Event, 64)
	errc := make(chan error, 1)
	go func() { errc <- src.Serve(ctx, out) }()
	enc := json.NewEncoder(os.Stdout)
	for {
		select {
		case b := <-out:
			for _, ev := range b {
				enc.Encode(childEvent{Path: ev.Path, PID: int(ev.PID), HasFile: ev.FD >= 0})
			}
		case err := <-errc:
			if err != context.Canceled {
				fmt.Fprintf(os.Stderr, "serve: %v\n", err)
				os.Exit(1)
			}
			os.Exit(0)
		}
	}
}

type childEvent struct {
	Path    string `json:"path"`
	PID     int    `json:"pid"`
	HasFile bool   `json:"has_file"`
}

func requireUnprivilegedFanotify(t testing.TB) {
	t.Helper()
	fd, err := unix.FanotifyInit(unprivInitFlags, fanFileFlags)
	if err != nil {
		unavailable(t, "unprivileged fanotify unavailable (needs Linux 5.13+): %v", err)
	}
	unix.Close(fd)
}

// TestFanotifyUnprivileged runs the source as the user nobody when the
// test runs as root, and in this process otherwise.
func TestFanotifyUnprivileged(t *testing.T) {
	requireUnprivilegedFanotify(t)
	root, err := os.MkdirTemp("", "execwatch-unpriv-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	bindir := filepath.Join(root, "bin")
	if err := os.Mkdir(bindir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := tinyProgram(t, bindir)

	events := make(chan childEvent, 256)
	if os.Geteuid() == 0 {
		startUnprivilegedChild(t, root, bindir, events)
	} else {
		r := start(t, NewFanotifyUnprivileged(Options{Dirs: []string{bindir}, BatchWindow: 5 * time.Millisecond}))
		go func() {
			for b := range r.out {
				for _, ev := range b {
					events <- childEvent{Path: ev.Path, PID: int(ev.PID), HasFile: ev.FD >= 0}
				}
			}
		}()
		t.Cleanup(func() { r.stop(t); close(r.out) })
	}

	// Run until the source reports the program, then count exactly.
	first := waitForEvent(t, events, bin, func() { runN(t, bin, 1) })
	t.Logf("kernel reported pid %d, file %v for another process's exec", first.PID, first.HasFile)
	if first.HasFile {
		t.Errorf("unprivileged event carries a file")
	}
	const n = 10
	pids := runN(t, bin, n)
	got := 0
	timeout := time.After(10 * time.Second)
	for got < n {
		select {
		case ev := <-events:
			if ev.Path != bin {
				continue
			}
			if ev.PID != 0 && !slices.Contains(pids, int(ev.PID)) {
				t.Errorf("event PID %d is neither 0 nor one of %v", ev.PID, pids)
			}
			got++
		case <-timeout:
			t.Fatalf("got %d events for %s, want %d", got, bin, n)
		}
	}
}

func waitForEvent(t testing.TB, events <-chan childEvent, path string, trigger func()) childEvent {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		trigger()
		timeout := time.After(200 * time.Millisecond)
	wait:
		for {
			select {
			case ev := <-events:
				if ev.Path == path {
					// Drain duplicates of this round.
					time.Sleep(50 * time.Millisecond)
					for len(events) > 0 {
						<-events
					}
					return ev
				}
			case <-timeout:
				break wait
			}
		}
	}
	t.Fatalf("no event for %s", path)
	return childEvent{}
}

// startUnprivilegedChild runs a copy of the test binary as nobody with
// the unprivileged source on bindir.
func startUnprivilegedChild(t *testing.T, root, bindir string, events chan<- childEvent) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(root, "execwatch.test")
	if err := os.WriteFile(exe, data, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = []string{unprivChildEnv + "=" + bindir, "PATH=/usr/bin:/bin", "HOME=" + root}
	cmd.Dir = root
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start unprivileged child: %v", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var ev childEvent
			if json.Unmarshal(sc.Bytes(), &ev) == nil {
				select {
				case events <- ev:
				default:
				}
			}
		}
	}()
	t.Cleanup(func() {
		stdin.Close()
		<-done
		if err := cmd.Wait(); err != nil {
			t.Errorf("unprivileged child: %v", err)
		}
	})
}

func TestParseFanotifyDFID(t *testing.T) {
	dirs := map[string]string{fidKey([2]int32{1, 2}, 1, []byte{9, 9, 9, 9, 9, 9, 9, 9}): "/usr/bin"}
	event := func(mask uint64, pid int, fsid [2]int32, htype int32, handle []byte, name string) []byte {
		rec := make([]byte, fidInfoHeaderLen)
		rec[0] = unix.FAN_EVENT_INFO_TYPE_DFID_NAME
		binary := func(off int, v uint32) {
			rec[off], rec[off+1], rec[off+2], rec[off+3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
		}
		binary(4, uint32(fsid[0]))
		binary(8, uint32(fsid[1]))
		binary(12, uint32(len(handle)))
		binary(16, uint32(htype))
		rec = append(rec, handle...)
		rec = append(rec, name...)
		rec = append(rec, 0)
		for len(rec)%4 != 0 {
			rec = append(rec, 0)
		}
		rec[2], rec[3] = byte(len(rec)), byte(len(rec)>>8)
		meta := make([]byte, fanMetaLen)
		total := len(meta) + len(rec)
		meta[0], meta[1] = byte(total), byte(total>>8)
		meta[4] = unix.FANOTIFY_METADATA_VERSION
		meta[6] = fanMetaLen
		for i := range 8 {
			meta[8+i] = byte(mask >> (8 * i))
		}
		for i, v := range []uint32{0xffffffff, uint32(pid)} {
			for j := range 4 {
				meta[16+4*i+j] = byte(v >> (8 * j))
			}
		}
		return append(meta, rec...)
	}
	handle := []byte{9, 9, 9, 9, 9, 9, 9, 9}
	tests := []struct {
		name     string
		buf      []byte
		wantPath string
		wantLost uint64
	}{
		{"known directory", event(unix.FAN_OPEN_EXEC, 0, [2]int32{1, 2}, 1, handle, "ls"), "/usr/bin/ls", 0},
		{"unknown directory is lost", event(unix.FAN_OPEN_EXEC, 0, [2]int32{1, 3}, 1, handle, "ls"), "", 1},
		{"name with a slash is lost", event(unix.FAN_OPEN_EXEC, 0, [2]int32{1, 2}, 1, handle, "../ls"), "", 1},
		{"own process is dropped", event(unix.FAN_OPEN_EXEC, os.Getpid(), [2]int32{1, 2}, 1, handle, "ls"), "", 0},
		{"overflow is lost", event(unix.FAN_Q_OVERFLOW, 0, [2]int32{1, 2}, 1, handle, "ls"), "", 1},
		{"truncated record", event(unix.FAN_OPEN_EXEC, 0, [2]int32{1, 2}, 1, handle, "ls")[:30], "", 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var c counters
			d := &deliverer{max: 10, c: &c, log: orDiscard(nil)}
			parseFanotifyDFID(tc.buf, int32(os.Getpid()), dirs, time.Now(), d, d.log)
			var got string
			if len(d.pending) == 1 {
				got = d.pending[0].Path
			}
			if got != tc.wantPath || c.lost.Load() != tc.wantLost {
				t.Errorf("got path %q lost %d, want %q lost %d", got, c.lost.Load(), tc.wantPath, tc.wantLost)
			}
		})
	}
}

func TestProgramDirs(t *testing.T) {
	home := t.TempDir()
	local := filepath.Join(home, ".local", "bin")
	if err := os.MkdirAll(local, 0o755); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(home, "link")
	if err := os.Symlink(local, link); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, path, home string
		want             []string
	}{
		{"home bin", "", home, []string{local}},
		{"relative and missing entries skipped", "relative:" + filepath.Join(home, "missing"), "", nil},
		{"symlinks resolved and deduplicated", link + ":" + local, home, []string{local}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := programDirs(tc.path, tc.home)
			// Keep only what lies under the test's home: the machine's
			// /opt/*/bin are listed too.
			got = slices.DeleteFunc(got, func(d string) bool { return !isUnder(d, home) })
			if !slices.Equal(got, tc.want) {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func isUnder(path, dir string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}
