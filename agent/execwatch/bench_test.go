package execwatch

import (
	"context"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/internal/spawn"
	"golang.org/x/sys/unix"
)

// benchConsumer drains a source the way the agent does at the least: it
// checks whether each file is the benchmark's program (an fstat, as the
// identification cache does) and closes it.
type benchConsumer struct {
	st      *unix.Stat_t
	events  atomic.Int64
	matched atomic.Int64
	first   chan struct{}
	once    sync.Once
}

func (c *benchConsumer) run(out <-chan []Event) {
	for b := range out {
		for _, ev := range b {
			if ev.Kind != KindExec {
				continue // the connector's process events
			}
			c.events.Add(1)
			if sameFile(ev, c.st) {
				c.matched.Add(1)
				c.once.Do(func() { close(c.first) })
			}
			ev.Release()
		}
	}
}

// benchSource is a fanotify source with its consumer, started and ready.
type benchSource struct {
	src    *Fanotify
	c      *benchConsumer
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func startBenchSource(b *testing.B, bin string, st *unix.Stat_t, window time.Duration, noConnector bool) *benchSource {
	b.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s := &benchSource{
		src:    NewFanotify(Options{BatchWindow: window, NoConnector: noConnector}),
		c:      &benchConsumer{st: st, first: make(chan struct{})},
		cancel: cancel,
	}
	out := make(chan []Event, 256)
	s.wg.Go(func() {
		if err := s.src.Serve(ctx, out); err != context.Canceled {
			b.Errorf("serve: %v", err)
		}
		close(out)
	})
	s.wg.Go(func() { s.c.run(out) })
	// Run the program until the source reports it: marks are in place.
	deadline := time.Now().Add(10 * time.Second)
	for {
		runN(b, bin, 1)
		select {
		case <-s.c.first:
			return s
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			b.Fatal("fanotify source never reported the program")
		}
	}
}

// stop waits until the consumer saw want executions of the program (or a
// few seconds passed), then stops the source.
func (s *benchSource) stop(want int64) (matched int64, lost uint64) {
	deadline := time.Now().Add(5 * time.Second)
	for s.c.matched.Load() < want && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	s.cancel()
	s.wg.Wait()
	return s.c.matched.Load(), s.src.Stats().Lost
}

func benchSetup(b *testing.B) (string, *unix.Stat_t) {
	b.Helper()
	requireFanotify(b)
	bin := tinyProgram(b, b.TempDir())
	return bin, statPath(b, bin)
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// BenchmarkExecThroughput measures fork+exec of a small static program as
// fast as the machine allows (one spawning thread per CPU, in a child
// process), with no source and with the fanotify source running and
// consumed, alternating three times one second each.
func BenchmarkExecThroughput(b *testing.B) {
	bin, st := benchSetup(b)
	cfg := spawn.Config{Path: bin, Workers: runtime.NumCPU(), Duration: time.Second}
	var off, on []float64
	var lost uint64
	var missing int64
	for range 3 {
		res, _, err := spawn.RunChild(context.Background(), cfg)
		if err != nil {
			b.Fatal(err)
		}
		off = append(off, res.PerSecond())

		s := startBenchSource(b, bin, st, 0, false)
		before := s.c.matched.Load()
		res, _, err = spawn.RunChild(context.Background(), cfg)
		if err != nil {
			b.Fatal(err)
		}
		matched, l := s.stop(before + int64(res.Execs))
		on = append(on, res.PerSecond())
		lost += l
		missing += before + int64(res.Execs) - matched
	}
	b.ReportMetric(median(off), "execs/s-without")
	b.ReportMetric(median(on), "execs/s-with-fanotify")
	b.ReportMetric(median(on)/median(off), "ratio")
	b.ReportMetric(float64(lost), "lost")
	b.ReportMetric(float64(missing), "missing")
	b.ReportMetric(loadAverage(), "loadavg")
}

// loadAverage is the one-minute load average, reported beside CPU figures:
// on a machine shared with other work they are inflated.
func loadAverage() float64 {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return -1
	}
	f := strings.Fields(string(data))
	if len(f) == 0 {
		return -1
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

func cpuTime() time.Duration {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkExecCPU measures the CPU time this process spends per exec
// while a child process spawns the program at 1,000 execs/s for two
// seconds: without a source, then with the fanotify source (and the
// process events connector beside it) at several longest batch windows,
// and without the connector. The source's cost is the difference. It
// also measures the source's CPU while nothing executes.
func BenchmarkExecCPU(b *testing.B) {
	bin, st := benchSetup(b)
	cfg := spawn.Config{Path: bin, Workers: 2, Rate: 1000, Duration: 2 * time.Second}
	measure := func() (time.Duration, spawn.Result) {
		c0 := cpuTime()
		res, _, err := spawn.RunChild(context.Background(), cfg)
		if err != nil {
			b.Fatal(err)
		}
		return cpuTime() - c0, res
	}
	baseCPU, baseRes := measure()
	base := float64(baseCPU.Microseconds()) / float64(baseRes.Execs)

	for _, w := range []struct {
		name        string
		window      time.Duration
		noConnector bool
	}{
		{"window=none", -1, false},
		{"window=10ms", 10 * time.Millisecond, false},
		{"window=100ms", DefaultBatchWindow, false},
		{"window=100ms,no-connector", DefaultBatchWindow, true},
	} {
		b.Run(w.name, func(b *testing.B) {
			s := startBenchSource(b, bin, st, w.window, w.noConnector)
			before := s.c.matched.Load()
			events0 := s.c.events.Load()
			cpu, res := measure()
			matched, lost := s.stop(before + int64(res.Execs))
			perExec := float64(cpu.Microseconds())/float64(res.Execs) - base
			b.ReportMetric(perExec, "µs-cpu/exec")
			b.ReportMetric(base, "µs-cpu/exec-without")
			b.ReportMetric(res.PerSecond(), "execs/s")
			b.ReportMetric(float64(s.c.events.Load()-events0)/float64(res.Execs), "events/exec")
			b.ReportMetric(float64(lost), "lost")
			b.ReportMetric(float64(before+int64(res.Execs)-matched), "missing")
			b.ReportMetric(loadAverage(), "loadavg")
		})
	}
	b.Run("idle", func(b *testing.B) {
		s := startBenchSource(b, bin, st, DefaultBatchWindow, false)
		c0, e0 := cpuTime(), s.c.events.Load()
		time.Sleep(2 * time.Second)
		cpu, events := cpuTime()-c0, s.c.events.Load()-e0
		s.stop(0)
		b.ReportMetric(float64(cpu.Microseconds())/2, "µs-cpu/s")
		b.ReportMetric(float64(events)/2, "events/s")
		b.ReportMetric(loadAverage(), "loadavg")
	})
}

// BenchmarkConnectorKernelCost measures what the process events connector
// costs the programs that run, not the agent: while anyone listens, the
// kernel builds and sends a message at each fork, exec, rename and exit,
// in the context of the process concerned. This process forks, executes
// and waits for the static program 5,000 times with no listener and with
// the connector subscribed (and read, as the source reads it), alternating
// five times; the figure is the CPU time of the children (the fork's
// child, the exec and the exit) per execution, from
// getrusage(RUSAGE_CHILDREN). The message at the fork is paid by the
// parent and is not in it.
func BenchmarkConnectorKernelCost(b *testing.B) {
	bin, _ := benchSetup(b)
	const n = 5000
	run := func() float64 {
		var r0, r1 unix.Rusage
		if err := unix.Getrusage(unix.RUSAGE_CHILDREN, &r0); err != nil {
			b.Fatal(err)
		}
		for range n {
			pid, err := syscall.ForkExec(bin, []string{bin}, &syscall.ProcAttr{})
			if err != nil {
				b.Fatal(err)
			}
			var ws syscall.WaitStatus
			for {
				if _, err := syscall.Wait4(pid, &ws, 0, nil); err != syscall.EINTR {
					break
				}
			}
		}
		if err := unix.Getrusage(unix.RUSAGE_CHILDREN, &r1); err != nil {
			b.Fatal(err)
		}
		cpu := func(r unix.Rusage) int64 { return r.Utime.Nano() + r.Stime.Nano() }
		return float64(cpu(r1)-cpu(r0)) / 1e3 / n
	}
	var off, on []float64
	for range 5 {
		off = append(off, run())
		c, err := dialConnector(context.Background(), orDiscard(nil), func(int32) {})
		if err != nil {
			b.Fatal(err)
		}
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Go(func() {
			for {
				if _, err := c.read(func(uint32, int32, int32) {}); err != nil && err != unix.ENOBUFS {
					b.Errorf("read process events: %v", err)
					return
				}
				select {
				case <-stop:
					return
				case <-time.After(10 * time.Millisecond):
				}
			}
		})
		on = append(on, run())
		close(stop)
		wg.Wait()
		c.close()
	}
	b.ReportMetric(median(off), "µs-cpu/exec-without")
	b.ReportMetric(median(on), "µs-cpu/exec-with-connector")
	b.ReportMetric(median(on)-median(off), "µs-cpu/exec-added")
	b.ReportMetric(loadAverage(), "loadavg")
}
