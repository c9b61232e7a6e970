package execwatch

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"
)

// sleeper copies sleep(1) to a fresh path, so its events are recognisable.
func sleeper(t testing.TB) string {
	t.Helper()
	src, err := exec.LookPath("sleep")
	if err != nil {
		unavailable(t, "no sleep program: %v", err)
	}
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "cp-sleep")
	if err := os.WriteFile(dst, data, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}

// startSleeping starts the sleeper for d and returns the running command.
func startSleeping(t testing.TB, path string, d time.Duration) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(path, formatSeconds(d))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

func formatSeconds(d time.Duration) string {
	return strconv.FormatFloat(d.Seconds(), 'f', -1, 64)
}

func requireSource(t testing.TB, name string) {
	t.Helper()
	for _, c := range candidates {
		if c.name == name {
			if err := c.available(); err != nil {
				unavailable(t, "%s unavailable: %v", name, err)
			}
			return
		}
	}
	t.Fatalf("unknown source %q", name)
}

// waitForProcess starts the sleeper until the source reports it with its
// path, proving the source is watching.
func waitForProcess(t testing.TB, r *running, path string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		cmd := startSleeping(t, path, 500*time.Millisecond)
		got := r.collect(t, 1, 700*time.Millisecond, func(ev Event) bool { return int(ev.PID) == cmd.Process.Pid && ev.Path == path })
		if len(got) > 0 {
			return
		}
	}
	t.Fatalf("%s never reported %s", r.src.Name(), path)
}

func TestProcConnector(t *testing.T) {
	requireSource(t, "proc-connector")
	path := sleeper(t)
	st := statPath(t, path)
	src := NewProcConnector(Options{})
	r := start(t, src)
	waitForProcess(t, r, path)

	// Programs that live long enough are reported with their file.
	var pids []int
	for range 5 {
		pids = append(pids, startSleeping(t, path, 400*time.Millisecond).Process.Pid)
	}
	got := r.collect(t, len(pids), 5*time.Second, func(ev Event) bool {
		if !slices.Contains(pids, int(ev.PID)) {
			return false
		}
		if ev.Path != path {
			t.Errorf("pid %d: path %q, want %q", ev.PID, ev.Path, path)
		}
		if os.Geteuid() == 0 && !sameFile(ev, st) {
			t.Errorf("pid %d: event file is not %s", ev.PID, path)
		}
		return true
	})
	if len(got) != len(pids) {
		t.Fatalf("got %d events, want %d", len(got), len(pids))
	}

	// A program that exits at once is reported or counted as lost.
	bin := tinyProgram(t, t.TempDir())
	before := src.Stats()
	quick := runN(t, bin, 20)
	seen := r.quiet(t, 500*time.Millisecond, func(ev Event) bool { return slices.Contains(quick, int(ev.PID)) })
	after := src.Stats()
	if lost := after.Lost - before.Lost; int(lost)+len(seen) < len(quick) {
		t.Errorf("%d short-lived programs: %d reported, %d counted lost", len(quick), len(seen), lost)
	}
	t.Logf("short-lived programs: %d of %d reported", len(seen), len(quick))
}

func TestProcPoll(t *testing.T) {
	requireSource(t, "proc-poll")
	path := sleeper(t)
	r := start(t, NewProcPoll(Options{PollInterval: 50 * time.Millisecond}))
	cmd := startSleeping(t, path, 2*time.Second)
	// The process may be seen first while it is still the copy of this
	// test that starts it, then again once it executes the sleeper.
	match := func(ev Event) bool { return int(ev.PID) == cmd.Process.Pid && ev.Path == path }
	got := r.collect(t, 1, 5*time.Second, match)
	if len(got) != 1 {
		t.Fatalf("got %+v, want one event for %s", got, path)
	}
	if again := r.quiet(t, 300*time.Millisecond, func(ev Event) bool { return int(ev.PID) == cmd.Process.Pid }); len(again) != 0 {
		t.Errorf("process reported %d more times", len(again))
	}
}

func TestParseStartTime(t *testing.T) {
	tests := []struct {
		name string
		stat string
		want uint64
		ok   bool
	}{
		{"plain", "42 (sleep) S 1 42 42 0 -1 4194304 91 0 0 0 0 0 0 0 20 0 1 0 123456 5652480 220", 123456, true},
		{"name with spaces and parens", "42 (a b) c) S 1 42 42 0 -1 4194304 91 0 0 0 0 0 0 0 20 0 1 0 99 5652480 220", 99, true},
		{"truncated", "42 (sleep) S 1 42", 0, false},
		{"no name", "garbage", 0, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := parseStartTime(tc.stat)
			if got != tc.want || ok != tc.ok {
				t.Errorf("got %d, %v; want %d, %v", got, ok, tc.want, tc.ok)
			}
		})
	}
}

func TestSourcesReleaseDescriptors(t *testing.T) {
	for _, c := range candidates {
		t.Run(c.name, func(t *testing.T) {
			if err := c.available(); err != nil {
				unavailable(t, "%s unavailable: %v", c.name, err)
			}
			settleFDs(t)
			before := openFDs(t)
			src := c.build(Options{PollInterval: 20 * time.Millisecond, BatchWindow: time.Millisecond})
			r := start(t, src)
			runN(t, "/bin/true", 3)
			time.Sleep(100 * time.Millisecond)
			if err := r.stop(t); !errors.Is(err, context.Canceled) {
				t.Fatalf("Serve returned %v, want context.Canceled", err)
			}
			if after := openFDs(t); !slices.Equal(before, after) {
				t.Fatalf("descriptors differ after Serve returned\nbefore: %q\nafter:  %q", before, after)
			}
		})
	}
}

func TestChoose(t *testing.T) {
	avail := Available()
	if len(avail) == 0 {
		t.Fatal("no source available; /proc polling should always be")
	}
	t.Logf("available: %v", avail)
	tests := []struct {
		name    string
		prefer  string
		want    string
		wantErr bool
	}{
		{"best", "", avail[0], false},
		{"last resort by name", "proc-poll", "proc-poll", false},
		{"unknown name", "inotify", "", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src, err := Choose(Options{Prefer: tc.prefer})
			if (err != nil) != tc.wantErr {
				t.Fatalf("Choose(%q): %v", tc.prefer, err)
			}
			if err == nil && src.Name() != tc.want {
				t.Errorf("Choose(%q) = %s, want %s", tc.prefer, src.Name(), tc.want)
			}
		})
	}
	for _, name := range Names() {
		if !slices.Contains(avail, name) {
			if _, err := Choose(Options{Prefer: name}); !errors.Is(err, ErrUnavailable) {
				t.Errorf("Choose(%q) of an unavailable source: %v, want ErrUnavailable", name, err)
			}
		}
	}
	if os.Geteuid() == 0 && avail[0] != "fanotify" {
		unavailable(t, "running as root but the best source is %s", avail[0])
	}
}

// A process looked at in the moment it executes a program (its
// executable seen as the program before, the file opened as the one
// after) is reported once: the file remembered is the one reported, so
// the next scan, which sees the new program, does not report it again.
// (Under load this reported the program twice.) The scan's view of /proc
// is a fake one here, which a test can hold in that moment.
func TestProcPollReportsAnExecOnce(t *testing.T) {
	path := sleeper(t)
	pid := startSleeping(t, path, time.Minute).Process.Pid
	fake := filepath.Join(t.TempDir(), strconv.Itoa(pid))
	if err := os.Mkdir(fake, 0o755); err != nil {
		t.Fatal(err)
	}
	stat := strconv.Itoa(pid) + " (cp-sleep) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 4242 0 0"
	if err := os.WriteFile(filepath.Join(fake, "stat"), []byte(stat), 0o644); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(fake, "exe")
	if err := os.Symlink(self, exe); err != nil { // the program before the exec
		t.Fatal(err)
	}
	s := NewProcPoll(Options{})
	s.proc = filepath.Dir(fake)
	out := make(chan []Event, 4)
	d := &deliverer{out: out, max: 16, c: &s.c, log: s.log}
	seen := make(map[procKey]exeID)
	reported := func() (n int) {
		d.flush()
		for {
			select {
			case b := <-out:
				for _, ev := range b {
					if int(ev.PID) == pid {
						n++
					}
					ev.Release()
				}
			default:
				return n
			}
		}
	}
	s.scan(seen, os.Getpid(), d)
	if n := reported(); n != 1 {
		t.Fatalf("first scan reported the process %d times; want once", n)
	}
	// The scan's view catches up with the exec.
	if err := os.Remove(exe); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(path, exe); err != nil {
		t.Fatal(err)
	}
	s.scan(seen, os.Getpid(), d)
	if n := reported(); n != 0 {
		t.Errorf("the next scan reported the process %d more times; want none", n)
	}
}
