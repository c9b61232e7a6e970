package execwatch

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/internal/spawn"
	"golang.org/x/sys/unix"
)

func requireFanotify(t testing.TB) {
	t.Helper()
	requireRoot(t)
	fd, err := unix.FanotifyInit(fanInitFlags, fanFileFlags)
	if err != nil {
		unavailable(t, "fanotify unavailable: %v", err)
	}
	unix.Close(fd)
}

func TestFanotifyReportsEachExec(t *testing.T) {
	requireFanotify(t)
	bin := tinyProgram(t, t.TempDir())
	want, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	st := statPath(t, bin)

	r := start(t, NewFanotify(Options{BatchWindow: 5 * time.Millisecond}))
	const n = 25
	// The source marks filesystems before it reads; run until it sees one.
	waitForFirst(t, r, bin, st)
	pids := runN(t, bin, n)
	got := r.collect(t, n, 10*time.Second, func(ev Event) bool {
		if !sameFile(ev, st) {
			return false
		}
		content, err := io.ReadAll(io.NewSectionReader(fdReaderAt(ev.FD), 0, 1<<20))
		if err != nil || !bytes.Equal(content, want) {
			t.Errorf("event file content differs from the executed program (err %v)", err)
		}
		if !slices.Contains(pids, int(ev.PID)) {
			t.Errorf("event PID %d is none of the spawned %v", ev.PID, pids)
		}
		if p := FDPath(ev.FD); p != bin || ev.Path != "" {
			t.Errorf("event path %q (descriptor's %q), want %q through the descriptor", ev.Path, p, bin)
		}
		return true
	})
	if len(got) != n {
		t.Fatalf("got %d events for the program, want %d", len(got), n)
	}
	if extra := r.quiet(t, 200*time.Millisecond, func(ev Event) bool { return sameFile(ev, st) }); len(extra) != 0 {
		t.Errorf("got %d extra events for the program", len(extra))
	}
	if s := r.src.Stats(); s.Lost != 0 {
		t.Errorf("lost %d events", s.Lost)
	}
}

// After a steady stream, which the source reads at each window with its
// descriptors out of the epoll instance, both descriptors wait again once
// the stream stops: a program run later is reported, and so is one run
// from memory, which only the process events connector reports (with
// fanotify's descriptor alone armed again, nothing would wake the source
// for it).
func TestFanotifyWaitsAgainAfterASteadyStream(t *testing.T) {
	requireFanotify(t)
	bin := tinyProgram(t, t.TempDir())
	st := statPath(t, bin)
	r := start(t, NewFanotify(Options{BatchWindow: 50 * time.Millisecond}))
	waitForFirst(t, r, bin, st)

	// A stream of executions for 600 ms: twelve windows with events.
	n := 0
	for end := time.Now().Add(600 * time.Millisecond); time.Now().Before(end); n++ {
		runN(t, bin, 1)
		time.Sleep(5 * time.Millisecond)
	}
	if got := r.collect(t, n, 10*time.Second, func(ev Event) bool { return sameFile(ev, st) }); len(got) != n {
		t.Fatalf("got %d events of the stream, want %d", len(got), n)
	}
	r.quiet(t, 300*time.Millisecond, func(Event) bool { return false }) // the stream stops

	pid := runN(t, bin, 1)[0]
	if got := r.collect(t, 1, 2*time.Second, func(ev Event) bool { return sameFile(ev, st) && int(ev.PID) == pid }); len(got) != 1 {
		t.Fatal("a program run after the stream stopped was not reported")
	}
	r.quiet(t, 300*time.Millisecond, func(Event) bool { return false })

	mpid, err := spawn.FromMemory(bin)
	if errors.Is(err, spawn.ErrNoMemfd) {
		unavailable(t, "%v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if got := r.collect(t, 1, 2*time.Second, func(ev Event) bool { return ev.Kind == KindProcess && int(ev.PID) == mpid }); len(got) != 1 {
		t.Fatal("the connector's event for a program run from memory after the stream was not reported")
	}
}

// waitForFirst runs bin until the source reports it, proving the source
// is watching.
func waitForFirst(t testing.TB, r *running, bin string, st *unix.Stat_t) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		runN(t, bin, 1)
		if got := r.collect(t, 1, 200*time.Millisecond, func(ev Event) bool { return sameFile(ev, st) }); len(got) > 0 {
			// Let any duplicate settle before counting.
			r.quiet(t, 100*time.Millisecond, func(ev Event) bool { return false })
			return
		}
	}
	t.Fatalf("%s never reported %s", r.src.Name(), bin)
}

func TestFanotifyReportsScriptAndInterpreter(t *testing.T) {
	requireFanotify(t)
	dir := t.TempDir()
	script := filepath.Join(dir, "hello.sh")
	if err := os.WriteFile(script, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	shell, err := filepath.EvalSymlinks("/bin/sh")
	if err != nil {
		t.Fatal(err)
	}
	scriptSt, shellSt := statPath(t, script), statPath(t, shell)

	r := start(t, NewFanotify(Options{BatchWindow: 5 * time.Millisecond}))
	waitForFirst(t, r, script, scriptSt)
	cmd := exec.Command(script)
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.ProcessState.Pid()
	var sawScript, sawShell bool
	r.collect(t, 2, 10*time.Second, func(ev Event) bool {
		if int(ev.PID) != pid {
			return false
		}
		switch {
		case sameFile(ev, scriptSt):
			sawScript = true
		case sameFile(ev, shellSt):
			sawShell = true
		default:
			return false
		}
		return true
	})
	if !sawScript || !sawShell {
		t.Fatalf("script reported: %v, interpreter %s reported: %v", sawScript, shell, sawShell)
	}
}

func TestFanotifyCancelClosesEverything(t *testing.T) {
	requireFanotify(t)
	bin := tinyProgram(t, t.TempDir())
	st := statPath(t, bin)
	settleFDs(t)
	before := openFDs(t)

	src := NewFanotify(Options{BatchWindow: time.Millisecond})
	r := start(t, src)
	waitForFirst(t, r, bin, st)
	// Leave events undelivered: a full channel, and execs after it.
	for range 3 {
		runN(t, bin, 20)
		time.Sleep(20 * time.Millisecond)
	}
	if err := r.stop(t); !errors.Is(err, context.Canceled) {
		t.Fatalf("Serve returned %v, want context.Canceled", err)
	}
	if after := openFDs(t); !slices.Equal(before, after) {
		t.Fatalf("descriptors differ after Serve returned\nbefore: %q\nafter:  %q", before, after)
	}
	// Serve again: a source can be restarted.
	r2 := start(t, src)
	waitForFirst(t, r2, bin, st)
	r2.stop(t)
}

func TestFanotifyWatchesNewMounts(t *testing.T) {
	requireFanotify(t)
	mnt := t.TempDir()
	if err := unix.Mount("cloudprotect-test", mnt, "tmpfs", 0, "size=16m,mode=0755"); err != nil {
		unavailable(t, "cannot mount a tmpfs: %v", err)
	}
	mounted := true
	unmount := func() {
		if mounted {
			if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
				t.Errorf("unmount %s: %v", mnt, err)
			}
			mounted = false
		}
	}
	defer unmount()

	r := start(t, NewFanotify(Options{BatchWindow: 5 * time.Millisecond}))
	// A first exec elsewhere proves the source is up before the new mount.
	other := tinyProgram(t, t.TempDir())
	waitForFirst(t, r, other, statPath(t, other))

	mnt2 := filepath.Join(mnt, "sub")
	if err := os.Mkdir(mnt2, 0o755); err != nil {
		t.Fatal(err)
	}
	// A second tmpfs mounted after the source started.
	if err := unix.Mount("cloudprotect-test2", mnt2, "tmpfs", 0, "size=16m,mode=0755"); err != nil {
		t.Fatalf("mount second tmpfs: %v", err)
	}
	defer unix.Unmount(mnt2, unix.MNT_DETACH)
	bin := tinyProgram(t, mnt2)
	waitForFirst(t, r, bin, statPath(t, bin))
}

func TestParseFanotify(t *testing.T) {
	self := int32(os.Getpid())
	devNull := func(t *testing.T) int {
		fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		return fd
	}
	event := func(mask uint64, fd, pid int, vers uint8) []byte {
		b := make([]byte, fanMetaLen)
		binary.NativeEndian.PutUint32(b[0:], fanMetaLen)
		b[4] = vers
		binary.NativeEndian.PutUint16(b[6:], fanMetaLen)
		binary.NativeEndian.PutUint64(b[8:], mask)
		binary.NativeEndian.PutUint32(b[16:], uint32(int32(fd)))
		binary.NativeEndian.PutUint32(b[20:], uint32(int32(pid)))
		return b
	}
	const v = unix.FANOTIFY_METADATA_VERSION
	tests := []struct {
		name         string
		build        func(fd int) []byte
		wantEvents   int
		wantLost     uint64
		wantFDClosed bool
	}{
		{"exec by another process", func(fd int) []byte { return event(unix.FAN_OPEN_EXEC, fd, 1, v) }, 1, 0, false},
		{"exec by ourselves is dropped", func(fd int) []byte { return event(unix.FAN_OPEN_EXEC, fd, int(self), v) }, 0, 0, true},
		{"queue overflow counts as lost", func(fd int) []byte {
			unix.Close(fd)
			return event(unix.FAN_Q_OVERFLOW, unix.FAN_NOFD, -1, v)
		}, 0, 1, true},
		{"unknown version is lost and closed", func(fd int) []byte { return event(unix.FAN_OPEN_EXEC, fd, 1, v+1) }, 0, 1, true},
		{"truncated event is ignored", func(fd int) []byte { unix.Close(fd); return event(unix.FAN_OPEN_EXEC, fd, 1, v)[:10] }, 0, 0, true},
		{"two events", func(fd int) []byte {
			fd2 := devNull(t)
			return append(event(unix.FAN_OPEN_EXEC, fd, 1, v), event(unix.FAN_OPEN_EXEC, fd2, 2, v)...)
		}, 2, 0, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fd := devNull(t)
			var c counters
			d := &deliverer{max: 100, c: &c, log: orDiscard(nil)}
			parseFanotify(tc.build(fd), self, time.Now(), d, d.log)
			if len(d.pending) != tc.wantEvents {
				t.Errorf("got %d events, want %d", len(d.pending), tc.wantEvents)
			}
			if got := c.lost.Load(); got != tc.wantLost {
				t.Errorf("lost %d, want %d", got, tc.wantLost)
			}
			for _, ev := range d.pending {
				if ev.FD < 0 || FDPath(ev.FD) != "/dev/null" {
					t.Errorf("event %+v lacks file or path", ev)
				}
			}
			if tc.wantFDClosed {
				if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil {
					t.Errorf("descriptor %d left open", fd)
					unix.Close(fd)
				}
			}
			d.discard()
		})
	}
}
