package agent

import (
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/internal/spawn"
	"github.com/cloudprotect/cloudprotect/agent/testenv"
)

// BenchmarkProtectExec measures what blocking at exec costs, side by side
// in one run, with the real cloudprotectd (a child process, participating)
// and the reference cloud on loopback in this process:
//
//   - fork+exec throughput of a known 9 KB static program on both cores
//     (spawned from a child process, 1.5 s each): agent not running, agent
//     with "protection": "alert" (no permission group), agent blocking;
//     five rounds in rotating order; the median of the rounds' ratios to
//     "not running";
//   - the CPU time the spawner and its programs spend per exec (fork,
//     exec, exit, wait: the kernel's side of an execution, which the
//     machine's other work disturbs much less than the rate);
//   - the wall time of one exec (fork, exec, wait) of that known program,
//     1,000 in a row from this process: p50 and p99 for each setting;
//   - exec to decision for an unfamiliar program: a fresh file (new hash)
//     in a user folder for each exec, so each is held while the agent asks
//     the cloud: p50 and p99 of its exec wall time, blocking vs. not
//     running (the difference is the hold);
//   - the agent's CPU per exec at 1,000 execs/s of the known program, in
//     alert mode and blocking.
//
// Run it alone: `go test -run '^$' -bench ProtectExec -benchtime 1x ./agent/`.
func BenchmarkProtectExec(b *testing.B) {
	testenv.NeedRoot(b)
	daemon, _ := protectBinaries(b)
	cloud := startTestCloud(b, cloudOpts{})
	dir := b.TempDir()
	known, err := spawn.BuildTiny(context.Background(), dir, "known", "protect-bench")
	if err != nil {
		b.Fatal(err)
	}
	tiny, err := os.ReadFile(known)
	if err != nil {
		b.Fatal(err)
	}
	users := filepath.Join(dir, "Downloads")
	os.Mkdir(users, 0o755)
	// fresh writes a program no one has seen: the known one with bytes
	// of its own appended (it still runs).
	fresh := func(i int) string {
		p := filepath.Join(users, "fresh-"+strconv.Itoa(i))
		if err := os.WriteFile(p, append(append([]byte(nil), tiny...), rand.Text()...), 0o755); err != nil {
			b.Fatal(err)
		}
		return p
	}

	type setting struct {
		name   string
		policy string // "" : agent not running
	}
	settings := []setting{{"off", ""}, {"alert", `{"protection": "alert"}`}, {"block", `{"protection": "block"}`}}
	// Each round runs the three settings back to back, in a rotating
	// order; the ratios are taken within each round (moments apart, so
	// the machine's other work weighs on both alike) and their median
	// reported.
	const rounds = 5
	const latencyN = 1000
	rate := map[string]float64{}
	spawnCPU := map[string]float64{} // µs of CPU per exec of the spawner and its programs
	lat := map[string][]time.Duration{}
	var ratioBlock, ratioAlert, ratioOwn []float64
	for r := range rounds {
		got := map[string]float64{}
		for k := range settings {
			s := settings[(k+r)%len(settings)]
			var a *protectingAgent
			if s.policy != "" {
				a = startProtectingAgent(b, daemon, cloud.URL, s.policy)
				a.participate(b)
				a.waitStatus(b, "collecting", func(st api.Status) bool {
					return st.Agent.ExecSource != "" && st.Protection.Active == (s.name == "block")
				})
				runExec(b, known) // first sight: decided, then marked
			}
			res, ru, err := spawn.RunChild(context.Background(), spawn.Config{Path: known, Duration: 1500 * time.Millisecond})
			if err != nil {
				b.Fatal(err)
			}
			got[s.name] = res.PerSecond()
			if ru != nil && res.Execs > 0 {
				spawnCPU[s.name] += float64((ru.Utime.Nano()+ru.Stime.Nano())/1000) / float64(res.Execs) / rounds
			}
			rate[s.name] += res.PerSecond() / rounds
			for range latencyN / rounds {
				lat[s.name] = append(lat[s.name], runExec(b, known))
			}
			if a != nil {
				a.stop()
			}
		}
		ratioBlock = append(ratioBlock, got["block"]/got["off"])
		ratioAlert = append(ratioAlert, got["alert"]/got["off"])
		ratioOwn = append(ratioOwn, got["block"]/got["alert"])
	}
	for _, s := range settings {
		b.ReportMetric(rate[s.name], "execs/s-"+s.name)
		p50, p99 := percentiles(lat[s.name])
		b.ReportMetric(us(p50), "µs-exec-p50-"+s.name)
		b.ReportMetric(us(p99), "µs-exec-p99-"+s.name)
		b.ReportMetric(spawnCPU[s.name], "µs-cpu/exec-spawner-"+s.name)
	}
	b.ReportMetric(median(ratioBlock), "ratio-block/off")
	b.ReportMetric(median(ratioAlert), "ratio-alert/off")
	b.ReportMetric(median(ratioOwn), "ratio-block/alert")
	b.Logf("ratios block/off by round: %.3f", ratioBlock)

	// Unfamiliar programs: not running, then blocking.
	const unfamiliarN = 200
	var unOff, unOn []time.Duration
	for i := range unfamiliarN {
		unOff = append(unOff, runExec(b, fresh(i)))
	}
	a := startProtectingAgent(b, daemon, cloud.URL, "")
	a.participate(b)
	a.active(b)
	runExec(b, fresh(-1)) // registers with the cloud
	held0 := a.waitStatus(b, "ready", func(api.Status) bool { return true }).Protection.Held
	for i := range unfamiliarN {
		unOn = append(unOn, runExec(b, fresh(unfamiliarN+i)))
	}
	held := a.waitStatus(b, "ready", func(api.Status) bool { return true }).Protection.Held - held0
	p50off, p99off := percentiles(unOff)
	p50on, p99on := percentiles(unOn)
	b.ReportMetric(us(p50off), "µs-unfamiliar-p50-off")
	b.ReportMetric(us(p99off), "µs-unfamiliar-p99-off")
	b.ReportMetric(us(p50on), "µs-unfamiliar-p50-block")
	b.ReportMetric(us(p99on), "µs-unfamiliar-p99-block")
	b.ReportMetric(float64(held), "unfamiliar-held")

	// CPU per exec at 1,000 execs/s, blocking and alert only.
	b.ReportMetric(cpuPerExec(b, a), "µs-cpu/exec-block")
	a.stop()
	alert := startProtectingAgent(b, daemon, cloud.URL, `{"protection": "alert"}`)
	alert.participate(b)
	alert.waitStatus(b, "collecting", func(st api.Status) bool { return st.Agent.ExecSource != "" })
	b.ReportMetric(cpuPerExec(b, alert), "µs-cpu/exec-alert")
	b.ReportMetric(load1(), "load-1min")
}

// cpuPerExec runs the known tiny program at 1,000 execs/s for 5 s from a
// child process and returns the agent's CPU time per exec it saw.
func cpuPerExec(b *testing.B, a *protectingAgent) float64 {
	b.Helper()
	prog := filepath.Join(b.TempDir(), "paced")
	if p, err := spawn.BuildTiny(context.Background(), filepath.Dir(prog), "paced", "protect-bench-paced"); err != nil {
		b.Fatal(err)
	} else {
		prog = p
	}
	runExec(b, prog)
	// The spawner (this test binary) may be new to this agent: let it
	// identify it first, so that what is measured is the steady cost.
	if _, _, err := spawn.RunChild(context.Background(), spawn.Config{Path: prog, Rate: 100, Workers: 1, Duration: 200 * time.Millisecond}); err != nil {
		b.Fatal(err)
	}
	time.Sleep(time.Second)
	cpu0, seen0 := threadCPU(b, a.cmd.Process.Pid), a.waitStatus(b, "ready", func(api.Status) bool { return true }).Agent.EventsSeen
	if _, _, err := spawn.RunChild(context.Background(), spawn.Config{Path: prog, Rate: 1000, Workers: 1, Duration: 5 * time.Second}); err != nil {
		b.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	cpu := threadCPU(b, a.cmd.Process.Pid) - cpu0
	seen := a.waitStatus(b, "ready", func(api.Status) bool { return true }).Agent.EventsSeen - seen0
	if seen == 0 {
		b.Fatal("the agent saw no execution")
	}
	return float64(cpu.Nanoseconds()) / 1e3 / float64(seen)
}

// runExec forks, executes and waits for path, and returns how long it took.
func runExec(b *testing.B, path string) time.Duration {
	b.Helper()
	t0 := time.Now()
	pid, err := syscall.ForkExec(path, []string{filepath.Base(path)}, &syscall.ProcAttr{})
	if err != nil {
		b.Fatalf("exec %s: %v", path, err)
	}
	var ws syscall.WaitStatus
	for {
		if _, err := syscall.Wait4(pid, &ws, 0, nil); err != syscall.EINTR {
			break
		}
	}
	return time.Since(t0)
}

func percentiles(d []time.Duration) (p50, p99 time.Duration) {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2], s[len(s)*99/100]
}

func median(x []float64) float64 {
	s := slices.Clone(x)
	slices.Sort(s)
	return s[len(s)/2]
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1000 }

// load1 is the one-minute load average.
func load1() float64 {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return -1
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}
