package main

import (
	"bufio"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	dt "github.com/cloudprotect/cloudprotect/tray/desktoptest"
)

// BenchmarkStartToIcon starts the real tray against a real agent and a
// panel on a private session bus, and measures the time from starting the
// process to its icon being registered with the panel, and the tray's
// memory once it shows the agent's state. Figures: ms-to-icon (mean),
// MB-rss (largest resident set seen), MB-peak (largest VmHWM).
func BenchmarkStartToIcon(b *testing.B) {
	s := newSession(b)
	dt.StartNotifications(b, s.bus, true)
	watcher := dt.StartWatcher(b, s.bus)
	s.startAgent()
	var total time.Duration
	var rss, peak int
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		p := s.startTray()
		reg := waitRegistered(b, watcher)
		total += reg.At.Sub(start)
		b.StopTimer()
		time.Sleep(300 * time.Millisecond) // let it follow the agent and settle
		r, h := memory(p.cmd.Process.Pid)
		rss, peak = max(rss, r), max(peak, h)
		p.cmd.Process.Signal(syscall.SIGTERM)
		<-p.done
		p.done <- nil
		b.StartTimer()
	}
	b.ReportMetric(float64(total.Microseconds())/1000/float64(b.N), "ms-to-icon")
	b.ReportMetric(float64(rss)/1024, "MB-rss")
	b.ReportMetric(float64(peak)/1024, "MB-peak")
}

// memory returns VmRSS and VmHWM of pid in KiB.
func memory(pid int) (rss, hwm int) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ":")
		var n int
		fmt.Sscan(strings.TrimSuffix(strings.TrimSpace(v), " kB"), &n)
		switch k {
		case "VmRSS":
			rss = n
		case "VmHWM":
			hwm = n
		}
	}
	return rss, hwm
}
