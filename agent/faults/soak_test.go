package faults

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/testenv"
)

// TestSoak is a long mixed run (`make soak`; CLOUDPROTECT_SOAK=10m):
// an exec storm, new programs and downloads, uploads to the real
// reference cloud, consent changes and agent restarts. The agent's
// resident memory, descriptors and threads are sampled every few seconds
// and must stay flat within each agent's life (the agent exposes no
// goroutine count; its threads stand in for it).
func TestSoak(t *testing.T) {
	d, err := time.ParseDuration(os.Getenv("CLOUDPROTECT_SOAK"))
	if err != nil || d <= 0 {
		t.Skip("a long run: set CLOUDPROTECT_SOAK to a duration (make soak)")
	}
	testenv.NeedRoot(t)
	const segments = 3 // agent lives; a restart between each
	srv := startCloud(t)
	work := worldDir(t, "cloudprotect-faults-soak-")
	a := newAgent(t, agentOpts{Server: srv.URL})
	a.cloud = srv
	a.start()
	a.participate()
	a.waitWatching(work)
	stormProg, _ := uniqueProgram(t, work, "soak-storm")
	s := startStorm(stormProg, 1, 5*time.Millisecond)
	defer s.stop()

	type sample struct {
		at time.Duration
		procStats
	}
	var worst struct{ rss, fds, threads int }
	start := time.Now()
	segLen := d / segments
	for seg := range segments {
		if seg > 0 {
			if seg%2 == 1 {
				a.kill()
			} else {
				a.stop()
			}
			a.start()
		}
		segStart := time.Now()
		var samples []sample
		tick := 0
		for time.Since(segStart) < segLen {
			tick++
			// New programs and a download every tick.
			p, _ := uniqueProgram(t, work, fmt.Sprintf("soak-%d", tick%50))
			runN(t, p, 1+tick%3)
			uniqueProgram(t, filepath.Join(a.Home, "Downloads"), fmt.Sprintf("dl-%d", tick%20))
			if tick%3 == 0 {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				a.Client.Upload(ctx)
				cancel()
			}
			if tick%15 == 0 {
				a.leave()
				a.participate()
			}
			samples = append(samples, sample{time.Since(start), readProc(t, a.pid())})
			time.Sleep(2 * time.Second)
		}
		// Flat: the last samples against those after a warm-up of a
		// fifth of the segment.
		warm := samples[len(samples)/5]
		last := samples[len(samples)-1]
		maxRSS := 0
		for _, s := range samples[len(samples)/5:] {
			maxRSS = max(maxRSS, s.RSSKiB)
		}
		dRSS, dFDs, dThreads := last.RSSKiB-warm.RSSKiB, last.FDs-warm.FDs, last.Threads-warm.Threads
		worst.rss, worst.fds, worst.threads = max(worst.rss, dRSS), max(worst.fds, dFDs), max(worst.threads, dThreads)
		t.Logf("segment %d (%d samples over %s): warm %v; last %v; peak RSS %d KiB; drift rss %+d KiB, fds %+d, threads %+d",
			seg+1, len(samples), segLen.Round(time.Second), warm.procStats, last.procStats, maxRSS, dRSS, dFDs, dThreads)
		if dFDs > 10 {
			t.Errorf("segment %d: descriptors grew by %d", seg+1, dFDs)
		}
		if dThreads > 8 {
			t.Errorf("segment %d: threads grew by %d", seg+1, dThreads)
		}
		if maxRSS > 2*warm.RSSKiB+16<<10 {
			t.Errorf("segment %d: resident memory rose to %d KiB from %d KiB", seg+1, maxRSS, warm.RSSKiB)
		}
	}
	t.Logf("soak %s: %d executions in the storm; worst drift: rss %+d KiB, fds %+d, threads %+d; restarts %d",
		d, s.Attempts.Load(), worst.rss, worst.fds, worst.threads, a.starts-1)
}
