package execwatch

import (
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/internal/spawn"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	spawn.MaybeChild()
	maybeUnprivilegedChild()
	goleak.VerifyTestMain(m)
}

// unavailable skips the test on a developer machine that lacks what it
// needs, and fails it in CI (CI=true), where everything must be present.
func unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("CI=true: "+format, args...)
	}
	t.Skipf(format, args...)
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		unavailable(t, "needs root (fanotify filesystem marks, mounts)")
	}
}

// tinyProgram builds a small static program, distinct from any other.
func tinyProgram(t testing.TB, dir string) string {
	t.Helper()
	path, err := spawn.BuildTiny(context.Background(), dir, "tiny", t.Name()+strconv.FormatInt(time.Now().UnixNano(), 10))
	if err != nil {
		unavailable(t, "cannot build the test program: %v", err)
	}
	return path
}

// runN executes path n times and returns the PIDs.
func runN(t testing.TB, path string, n int) []int {
	t.Helper()
	var pids []int
	for range n {
		cmd := exec.Command(path)
		if err := cmd.Run(); err != nil {
			t.Fatalf("run %s: %v", path, err)
		}
		pids = append(pids, cmd.ProcessState.Pid())
	}
	return pids
}

// openFDs lists this process's descriptors.
func openFDs(t testing.TB) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("list descriptors: %v", err)
	}
	var out []string
	for _, e := range ents {
		target, _ := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		out = append(out, e.Name()+" "+target)
	}
	slices.Sort(out)
	return out
}

// settleFDs makes sure the runtime's own descriptors (the network poller)
// exist before a before/after comparison.
func settleFDs(t testing.TB) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	r.SetReadDeadline(time.Now())
	r.Close()
	w.Close()
}

// running is a source serving in the background.
type running struct {
	src    Source
	out    chan []Event
	cancel context.CancelFunc
	done   chan error
}

func start(t testing.TB, src Source) *running {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{src: src, out: make(chan []Event, 64), cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- src.Serve(ctx, r.out) }()
	t.Cleanup(func() { r.stop(t) })
	return r
}

// stop cancels the source and waits for Serve, reading and releasing what
// it delivers meanwhile, as a consumer must.
func (r *running) stop(t testing.TB) error {
	t.Helper()
	if r.cancel == nil {
		return nil
	}
	r.cancel()
	r.cancel = nil
	deadline := time.After(10 * time.Second)
	for {
		select {
		case err := <-r.done:
			for {
				select {
				case b := <-r.out:
					for _, ev := range b {
						ev.Release()
					}
				default:
					return err
				}
			}
		case b := <-r.out:
			for _, ev := range b {
				ev.Release()
			}
		case <-deadline:
			t.Fatalf("%s: Serve did not return after cancel", r.src.Name())
		}
	}
}

// collect reads events until match has accepted want of them or the
// deadline passes; it closes every event's file after match saw it.
func (r *running) collect(t testing.TB, want int, timeout time.Duration, match func(Event) bool) []Event {
	t.Helper()
	var got []Event
	deadline := time.After(timeout)
	for len(got) < want {
		select {
		case b := <-r.out:
			for _, ev := range b {
				if match(ev) {
					got = append(got, ev)
				}
				ev.Release()
			}
		case err := <-r.done:
			t.Fatalf("%s: Serve returned early: %v", r.src.Name(), err)
		case <-deadline:
			return got
		}
	}
	return got
}

// quiet reads events for d and returns those match accepts.
func (r *running) quiet(t testing.TB, d time.Duration, match func(Event) bool) []Event {
	t.Helper()
	return r.collect(t, 1<<30, d, match)
}

func sameFile(ev Event, st *unix.Stat_t) bool {
	if ev.FD < 0 {
		return false
	}
	var est unix.Stat_t
	if err := unix.Fstat(ev.FD, &est); err != nil {
		return false
	}
	return est.Dev == st.Dev && est.Ino == st.Ino
}

func statPath(t testing.TB, path string) *unix.Stat_t {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatalf("stat %s: %v", path, err)
	}
	return &st
}

// fdReaderAt reads a raw descriptor with pread.
type fdReaderAt int

func (r fdReaderAt) ReadAt(b []byte, off int64) (int, error) {
	n, err := unix.Pread(int(r), b, off)
	if err != nil {
		return max(n, 0), err
	}
	if n < len(b) {
		return n, io.EOF
	}
	return n, nil
}
