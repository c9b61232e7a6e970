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

func startDaemon(tb testing.TB, bin, dir string) *benchAgent {
	tb.Helper()
	sock := filepath.Join(dir, "agent.sock")
	cmd := exec.Command(bin, "--user", "--state-dir", filepath.Join(dir, "state"), "--socket", sock,
		"--policy", filepath.Join(dir, "policy.json"), "--server", "http://127.0.0.1:1")
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	a := &benchAgent{cmd: cmd, client: localapi.NewClient(sock)}
	tb.Cleanup(a.stop)
	for i := 0; ; i++ {
		if _, err := a.client.Status(context.Background()); err == nil {
			break
		}
		if i == 200 {
			tb.Fatal("agent did not start")
		}
		time.Sleep(25 * time.Millisecond)
	}
	if _, err := a.client.SetParticipation(context.Background(), api.ParticipationRequest{
		Participate: true, StatementVersion: consent.StatementVersion, Via: "cli"}); err != nil {
		tb.Fatal(err)
	}
	return a
}

func (a *benchAgent) stop() {
	if a.cmd.Process != nil {
		a.cmd.Process.Signal(syscall.SIGTERM)
		a.cmd.Wait()
		a.cmd.Process = nil
	}
	a.client.Close()
}

// cpu returns the agent's CPU time (user + system) so far.
func (a *benchAgent) cpu(tb testing.TB) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", a.cmd.Process.Pid))
	if err != nil {
		tb.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * time.Second / 100 // USER_HZ
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

// threadSwitches sums the voluntary context switches of all the agent's
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

// BenchmarkAgentExecOverhead measures, side by side in one run, what the
// participating agent costs the machine's programs: fork+exec throughput of
// a tiny static program on both cores with the agent stopped and running
// (alternating rounds, the ratio reported), lost events at that rate, the
// agent's CPU per exec at 1,000 execs/s, its wake-ups when idle, and its
// peak RSS.
func BenchmarkAgentExecOverhead(b *testing.B) {
	testenv.NeedRoot(b)
	dir := b.TempDir()
	bin := buildDaemon(b, dir)
	prog, err := spawn.BuildTiny(context.Background(), dir, "tiny", "agent-bench")
	if err != nil {
		b.Fatal(err)
	}
	const rounds = 3
	storm := spawn.Config{Path: prog, Duration: 2 * time.Second}
	var off, on float64
	var lost, seen uint64
	var peakRSS int64
	for r := 0; r < rounds; r++ {
		res, _, err := spawn.RunChild(context.Background(), storm)
		if err != nil {
			b.Fatal(err)
		}
		off += res.PerSecond()

		a := startDaemon(b, bin, filepath.Join(dir, fmt.Sprintf("on-%d", r)))
		if st := a.status(b); st.Agent.ExecSource == "" {
			b.Fatalf("agent is not collecting: %+v", st.Agent)
		}
		before := a.status(b).Agent
		res, _, err = spawn.RunChild(context.Background(), storm)
		if err != nil {
			b.Fatal(err)
		}
		on += res.PerSecond()
		time.Sleep(300 * time.Millisecond) // let the agent drain
		after := a.status(b).Agent
		lost += after.EventsLost - before.EventsLost
		seen += after.EventsSeen - before.EventsSeen
		peakRSS = max(peakRSS, a.procStatus(b, "VmHWM")["VmHWM"])
		a.stop()
	}
	b.ReportMetric(off/rounds, "execs/s-off")
	b.ReportMetric(on/rounds, "execs/s-on")
	b.ReportMetric(on/off, "ratio-on/off")
	b.ReportMetric(float64(lost), "lost-events")
	b.ReportMetric(float64(seen), "events-seen")

	// CPU per exec at 1,000 execs/s, and idle wake-ups.
	a := startDaemon(b, bin, filepath.Join(dir, "rate"))
	time.Sleep(time.Second)
	idleStart, idleCPU, idleSeen := a.wakeups(b), a.cpu(b), a.status(b).Agent.EventsSeen
	time.Sleep(5 * time.Second)
	idleWake, idleCPUUsed := a.wakeups(b)-idleStart, a.cpu(b)-idleCPU
	idleEvents := a.status(b).Agent.EventsSeen - idleSeen
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
		b.ReportMetric(float64(cpuUsed.Microseconds())/float64(events), "µs-cpu/exec")
	}
	b.ReportMetric(float64(idleWake)/5, "idle-wakeups/s")
	b.ReportMetric(float64(idleCPUUsed.Milliseconds())/5, "idle-ms-cpu/s")
	b.ReportMetric(float64(idleEvents)/5, "idle-execs/s-others")
	b.ReportMetric(float64(peakRSS)/1024, "peak-RSS-MB")
}
