package agent

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/internal/spawn"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/agent/testenv"
)

// benchAgent is the real cloudprotectd, started as its own process so its
// CPU time and memory can be read from /proc.
type benchAgent struct {
	cmd    *exec.Cmd
	client *localapi.Client
}

func buildDaemon(tb testing.TB, dir string) string {
	tb.Helper()
	bin := filepath.Join(dir, "cloudprotectd")
	out, err := exec.Command("go", "build", "-o", bin, "../cmd/cloudprotectd").CombinedOutput()
	if err != nil {
		tb.Fatalf("build cloudprotectd: %v\n%s", err, out)
	}
	return bin
}

// startDaemon runs the agent in user mode with its state in dir (kept
// across starts), participating, with blocking at exec off (the policy
// says "alert"): what is measured is the exec path alone. It returns once
// the exec source sees every execution.
func startDaemon(tb testing.TB, bin, dir string) *benchAgent {
	tb.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	policy := filepath.Join(dir, "policy.json")
	if err := os.WriteFile(policy, []byte(`{"protection": "alert"}`), 0o644); err != nil {
		tb.Fatal(err)
	}
	sock := filepath.Join(dir, "agent.sock")
	cmd := exec.Command(bin, "--user", "--state-dir", filepath.Join(dir, "state"), "--socket", sock,
		"--policy", policy, "--server", "http://127.0.0.1:1")
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	a := &benchAgent{cmd: cmd, client: localapi.NewClient(sock)}
	tb.Cleanup(a.stop)
	for i := 0; ; i++ {
		if _, err := a.client.Status(context.Background()); err == nil {
			break
		}
		if i == 400 {
			tb.Fatal("agent did not start")
		}
		time.Sleep(25 * time.Millisecond)
	}
	st, err := a.client.SetParticipation(context.Background(), api.ParticipationRequest{
		Participate: true, StatementVersion: consent.StatementVersion, Via: "cli"})
	if err != nil {
		tb.Fatal(err)
	}
	if st.Agent.ExecSource != "fanotify" {
		tb.Fatalf("agent is not watching with fanotify: %+v", st.Agent)
	}
	return a
}

// stop sends SIGTERM and waits: the agent drains what the kernel reported.
func (a *benchAgent) stop() {
	if a.cmd.Process != nil {
		a.cmd.Process.Signal(syscall.SIGTERM)
		a.cmd.Wait()
		a.cmd.Process = nil
	}
	a.client.Close()
}

// cpu returns the agent's CPU time so far, to the nanosecond: the sum of
// its threads' run time from /proc/PID/task/*/schedstat.
func (a *benchAgent) cpu(tb testing.TB) time.Duration { return threadCPU(tb, a.cmd.Process.Pid) }

// threadCPU returns a process's CPU time so far, to the nanosecond: the
// sum of its threads' run time from /proc/PID/task/*/schedstat (the
// clock ticks of /proc/PID/stat count in 10 ms steps).
func threadCPU(tb testing.TB, pid int) time.Duration {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	if err != nil || len(tasks) == 0 {
		tb.Fatalf("read the agent's threads: %v", err)
	}
	var ns int64
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue // a thread that just ended
		}
		f := strings.Fields(string(b))
		v, _ := strconv.ParseInt(f[0], 10, 64)
		ns += v
	}
	return time.Duration(ns)
}

// procStatus reads fields of /proc/PID/status (kB values and counters).
func (a *benchAgent) procStatus(tb testing.TB, keys ...string) map[string]int64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", a.cmd.Process.Pid))
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	out := map[string]int64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		for _, want := range keys {
			if k == want {
				n, _ := strconv.ParseInt(strings.Fields(v)[0], 10, 64)
				out[k] = n
			}
		}
	}
	return out
}

// wakeups sums the voluntary context switches of all the agent's
// threads: how often it woke up.
func (a *benchAgent) wakeups(tb testing.TB) int64 {
	dirs, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*", a.cmd.Process.Pid))
	var n int64
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "status"))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "voluntary_ctxt_switches:"); ok {
				x, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
				n += x
			}
		}
	}
	return n
}

func (a *benchAgent) status(tb testing.TB) api.Status {
	st, err := a.client.Status(context.Background())
	if err != nil {
		tb.Fatal(err)
	}
	return st
}

// queued returns the executions of sha the agent has queued.
func (a *benchAgent) queued(tb testing.TB, sha string) uint64 {
	q, err := a.client.Queue(context.Background())
	if err != nil {
		tb.Fatal(err)
	}
	var n uint64
	for _, r := range q.Records {
		if r.SHA256 == sha {
			n += r.ExecCount
		}
	}
	return n
}

// workload is a real program run, and what it cost.
type workload struct {
	wall time.Duration
	cpu  time.Duration // of the workload and all its children
}

// run runs cmd and returns its wall time and the CPU time of it and every
// process it waited for.
func run(tb testing.TB, cmd *exec.Cmd) workload {
	tb.Helper()
	start := time.Now()
	out, err := cmd.CombinedOutput()
	wall := time.Since(start)
	if err != nil {
		tb.Fatalf("%s: %v\n%s", cmd, err, out)
	}
	ru := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	return workload{wall: wall, cpu: time.Duration(ru.Utime.Nano() + ru.Stime.Nano())}
}

// cBuild writes a C project of n generated files and a Makefile that
// builds them into one program: a parallel build as developers run it
// (the compiler driver, cc1, as and the linker for each file).
func cBuild(tb testing.TB, dir string, n int) {
	tb.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	var objs []string
	for i := range n {
		src := fmt.Sprintf(`#include <stdio.h>
#include <string.h>
#include <stdlib.h>
struct rec%[1]d { int a[%[1]d %% 7 + 1]; char name[32]; double w; };
static int cmp%[1]d(const void *x, const void *y) { return *(const int *)x - *(const int *)y; }
int f%[1]d(int k) {
	struct rec%[1]d r;
	memset(&r, 0, sizeof r);
	for (int i = 0; i < (int)(sizeof r.a / sizeof r.a[0]); i++) r.a[i] = (k * 31 + i * %[1]d) %% 97;
	qsort(r.a, sizeof r.a / sizeof r.a[0], sizeof r.a[0], cmp%[1]d);
	snprintf(r.name, sizeof r.name, "rec-%%d", k);
	r.w = k * 0.5 + %[1]d;
	return r.a[0] + (int)strlen(r.name) + (int)r.w;
}
`, i)
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%d.c", i)), []byte(src), 0o644); err != nil {
			tb.Fatal(err)
		}
		objs = append(objs, fmt.Sprintf("f%d.o", i))
	}
	main := "int main(void) { return 0; }\n"
	if err := os.WriteFile(filepath.Join(dir, "main.c"), []byte(main), 0o644); err != nil {
		tb.Fatal(err)
	}
	mk := "OBJS = main.o " + strings.Join(objs, " ") + "\n" +
		"prog: $(OBJS)\n\t$(CC) -o $@ $(OBJS)\n" +
		"%.o: %.c\n\t$(CC) -O1 -c -o $@ $<\n" +
		"clean:\n\trm -f prog *.o\n"
	if err := os.WriteFile(filepath.Join(dir, "Makefile"), []byte(mk), 0o644); err != nil {
		tb.Fatal(err)
	}
}

// configureScript writes a shell loop shaped like a configure script:
// pipelines of sed and grep, and expr.
func configureScript(tb testing.TB, path string, n int) {
	tb.Helper()
	s := fmt.Sprintf(`i=0
while [ $i -lt %d ]; do
	echo "checking for feature$i in libfoo... " | sed -e 's/feature/HAVE_FEATURE_/' -e 's/\.\.\. //' | grep -q HAVE
	i=$(expr $i + 1)
done
`, n)
	if err := os.WriteFile(path, []byte(s), 0o755); err != nil {
		tb.Fatal(err)
	}
}

// BenchmarkExecPath measures, side by side in one run, what the
// participating agent costs the machine's programs, against the agent not
// running, over alternating rounds:
//
//   - fork+exec throughput of a tiny static program on both cores (ratio);
//   - a parallel C build (make -j2 of 300 generated files) and a
//     configure-like shell loop (sed | grep, expr): the agent's CPU as a
//     share of the workload's CPU, and the wall-time slowdown;
//   - executions lost at the maximum spawn rate when the agent is stopped
//     (SIGTERM) the moment the storm ends, counted in its queue after a
//     restart;
//   - the agent's CPU per exec at 1,000 execs/s, its wake-ups when idle,
//     and its peak resident memory.
//
// Blocking at exec is off (policy "alert"): this is the exec path alone.
func BenchmarkExecPath(b *testing.B) {
	testenv.NeedRoot(b)
	testenv.NeedCommand(b, "make", "make")
	dir := b.TempDir()
	bin := buildDaemon(b, dir)
	prog, err := spawn.BuildTiny(context.Background(), dir, "tiny", fmt.Sprint("exec-path-", time.Now().UnixNano()))
	if err != nil {
		b.Fatal(err)
	}
	sum := sha256File(b, prog)
	cdir := filepath.Join(dir, "cbuild")
	cBuild(b, cdir, 300)
	script := filepath.Join(dir, "configure.sh")
	configureScript(b, script, 1000)
	build := func() workload {
		run(b, exec.Command("make", "-s", "-C", cdir, "clean"))
		return run(b, exec.Command("make", "-s", "-j2", "-C", cdir))
	}
	configure := func() workload { return run(b, exec.Command("/bin/sh", script)) }
	build() // warm the page cache
	configure()

	const rounds = 3
	storm := spawn.Config{Path: prog, Workers: 2, Duration: 2 * time.Second}
	var offRate, onRate float64
	var cOff, cOn, sOff, sOn workload
	var cAgent, sAgent time.Duration
	var cExecs, sExecs uint64
	var ran, counted uint64
	var peakRSS int64
	for r := 0; r < rounds; r++ {
		res, _, err := spawn.RunChild(context.Background(), storm)
		if err != nil {
			b.Fatal(err)
		}
		offRate += res.PerSecond()
		w := build()
		cOff.wall, cOff.cpu = cOff.wall+w.wall, cOff.cpu+w.cpu
		w = configure()
		sOff.wall, sOff.cpu = sOff.wall+w.wall, sOff.cpu+w.cpu

		adir := filepath.Join(dir, fmt.Sprintf("agent-%d", r))
		a := startDaemon(b, bin, adir)
		res, _, err = spawn.RunChild(context.Background(), storm)
		if err != nil {
			b.Fatal(err)
		}
		onRate += res.PerSecond()
		ran += uint64(res.Execs)

		seen0, cpu0 := a.status(b).Agent.EventsSeen, a.cpu(b)
		w = build()
		time.Sleep(200 * time.Millisecond) // the last batch
		seen1, cpu1 := a.status(b).Agent.EventsSeen, a.cpu(b)
		cOn.wall, cOn.cpu = cOn.wall+w.wall, cOn.cpu+w.cpu
		cAgent += cpu1 - cpu0
		cExecs += seen1 - seen0
		w = configure()
		time.Sleep(200 * time.Millisecond)
		seen2, cpu2 := a.status(b).Agent.EventsSeen, a.cpu(b)
		sOn.wall, sOn.cpu = sOn.wall+w.wall, sOn.cpu+w.cpu
		sAgent += cpu2 - cpu1
		sExecs += seen2 - seen1

		// The maximum rate, and a stop the moment it ends.
		res, _, err = spawn.RunChild(context.Background(), storm)
		if err != nil {
			b.Fatal(err)
		}
		peakRSS = max(peakRSS, a.procStatus(b, "VmHWM")["VmHWM"])
		a.stop()
		ran += uint64(res.Execs)
		a = startDaemon(b, bin, adir)
		counted += a.queued(b, sum)
		a.stop()
	}
	b.ReportMetric(offRate/rounds, "execs/s-off")
	b.ReportMetric(onRate/rounds, "execs/s-on")
	b.ReportMetric(onRate/offRate, "ratio-on/off")
	b.ReportMetric(float64(ran-min(counted, ran)), "lost-execs")
	b.ReportMetric(float64(ran), "storm-execs")
	b.ReportMetric(100*float64(cAgent)/float64(cOn.cpu), "cbuild-agent-%cpu")
	b.ReportMetric(float64(cOn.wall)/float64(cOff.wall), "cbuild-wall-on/off")
	b.ReportMetric(float64(cExecs)/cOn.wall.Seconds(), "cbuild-execs/s")
	b.ReportMetric(100*float64(sAgent)/float64(sOn.cpu), "configure-agent-%cpu")
	b.ReportMetric(float64(sOn.wall)/float64(sOff.wall), "configure-wall-on/off")
	b.ReportMetric(float64(sExecs)/sOn.wall.Seconds(), "configure-execs/s")

	// CPU per exec at 1,000 execs/s, and idle wake-ups.
	a := startDaemon(b, bin, filepath.Join(dir, "rate"))
	time.Sleep(time.Second)
	idleStart, idleCPU, idleSeen := a.wakeups(b), a.cpu(b), a.status(b).Agent.EventsSeen
	time.Sleep(5 * time.Second)
	idleWake, idleCPUUsed := a.wakeups(b)-idleStart, a.cpu(b)-idleCPU
	idleEvents := a.status(b).Agent.EventsSeen - idleSeen
	// The spawner (this test binary, tens of megabytes) and the program
	// are new to this agent: identify them first, so that what is
	// measured is the steady cost of executions, not one first sight
	// (its cost is in the identification figures).
	if _, _, err := spawn.RunChild(context.Background(), spawn.Config{Path: prog, Rate: 100, Workers: 1, Duration: 200 * time.Millisecond}); err != nil {
		b.Fatal(err)
	}
	time.Sleep(time.Second)
	cpu0, seen0 := a.cpu(b), a.status(b).Agent.EventsSeen
	res, _, err := spawn.RunChild(context.Background(), spawn.Config{Path: prog, Rate: 1000, Workers: 1, Duration: 5 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	cpuUsed, events := a.cpu(b)-cpu0, a.status(b).Agent.EventsSeen-seen0
	peakRSS = max(peakRSS, a.procStatus(b, "VmHWM")["VmHWM"])
	b.ReportMetric(res.PerSecond(), "execs/s-paced")
	if events > 0 {
		b.ReportMetric(float64(cpuUsed.Nanoseconds())/1e3/float64(events), "µs-cpu/exec")
	}
	b.ReportMetric(float64(idleWake)/5, "idle-wakeups/s")
	b.ReportMetric(float64(idleCPUUsed.Microseconds())/5e3, "idle-ms-cpu/s")
	b.ReportMetric(float64(idleEvents)/5, "idle-execs/s-others")
	b.ReportMetric(float64(peakRSS)/1024, "peak-RSS-MB")
	b.ReportMetric(loadAverage(), "load-avg")
}

// loadAverage is the one-minute load average: figures taken on a busy
// machine are inflated.
func loadAverage() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return -1
	}
	v, _ := strconv.ParseFloat(strings.Fields(string(b))[0], 64)
	return v
}
