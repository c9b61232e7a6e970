package faults

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/internal/spawn"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/agent/queue"
)

// The agent is killed (SIGKILL) at random points of an exec storm and
// started again, many times. After every restart the queue opens without
// being set aside, the agent answers, the count of the stormed program
// never exceeds the executions that were attempted, and never goes below
// what the queue had already acknowledged (GET /v1/queue commits first).
func TestKillDuringExecStorm(t *testing.T) {
	faultCase(t)
	kills := scale(8, 60)
	work := worldDir(t, "cloudprotect-faults-storm-")
	prog, sum := uniqueProgram(t, work, "stormed")

	// A reachable cloud: with none, a batch cut for it stays in flight
	// and the preview shows only that batch.
	a := newAgent(t, agentOpts{Cloud: startCloud(t)})
	a.start()
	a.participate()
	a.waitWatching(work)

	s := startStorm(prog, 1, 2*time.Millisecond)
	defer s.stop()
	var acked uint64 // the count the queue showed last: durable
	for i := range kills {
		// A random point: let the storm run a while, sometimes hardly at all.
		time.Sleep(time.Duration(rand.IntN(600)) * time.Millisecond)
		if i%3 == 0 {
			// Sometimes right after a commit was asked for.
			a.queued()
		}
		a.kill()
		if bad := a.corruptFiles(); len(bad) > 0 {
			t.Fatalf("kill %d: files set aside before restart: %v", i+1, bad)
		}
		a.start()
		if bad := a.corruptFiles(); len(bad) > 0 {
			t.Fatalf("kill %d: the queue or the consent record was set aside on restart: %v\n%s", i+1, bad, tail(a.logText(), 20))
		}
		st := a.status()
		if st.Participation.State != "participating" {
			t.Fatalf("kill %d: state %s after restart, want participating", i+1, st.Participation.State)
		}
		a.waitCollecting()
		got := a.seen(sum)
		if attempts := uint64(s.Attempts.Load()); got > attempts {
			t.Fatalf("kill %d: %d executions queued, only %d attempted", i+1, got, attempts)
		}
		if got < acked {
			t.Fatalf("kill %d: %d executions queued, %d were acknowledged before the kill", i+1, got, acked)
		}
		acked = got
	}
	attempts := s.stop()
	time.Sleep(1500 * time.Millisecond) // the last commit
	a.drain()
	final := a.seen(sum)
	if final > uint64(attempts) || final < acked {
		t.Fatalf("final count %d, want between %d acknowledged and %d attempted", final, acked, attempts)
	}
	a.stop()
	// The file the agent left opens cleanly on its own.
	q, err := queue.Open(filepath.Join(a.StateDir, "queue.db"), queue.Options{})
	if err != nil {
		t.Fatal(err)
	}
	q.Close()
	if bad, _ := filepath.Glob(filepath.Join(a.StateDir, "*.corrupt-*")); len(bad) > 0 {
		t.Fatalf("queue set aside when opened after the run: %v", bad)
	}
	t.Logf("kills survived: %d; executions attempted %d, counted %d (%.1f%%; the rest ran while the agent was down or were buffered when it was killed)",
		kills, attempts, final, 100*float64(final)/float64(attempts))
}

// The agent is killed at random points of uploads to the real reference
// cloud, many times. Each round runs a new program exactly n times, waits
// until the queue acknowledged them, starts an upload and kills the agent
// during it. At the end, after a last full upload, the cloud holds
// exactly n executions of every round's program: nothing lost, nothing
// counted twice.
func TestKillDuringUpload(t *testing.T) {
	faultCase(t)
	const n = 5
	rounds := scale(8, 50)
	srv := startCloud(t)
	work := worldDir(t, "cloudprotect-faults-upload-")
	a := newAgent(t, agentOpts{Server: srv.URL})
	a.cloud = srv
	a.start()
	a.participate()
	a.waitWatching(work)

	sums := make([]string, rounds)
	for i := range rounds {
		var prog string
		prog, sums[i] = uniqueProgram(t, work, fmt.Sprintf("round%02d", i))
		runN(t, prog, n)
		a.waitSeen(sums[i], n, "the round's executions")
		// Upload, and kill somewhere in it: before, during or after the
		// request, between the server's answer and the queue's update.
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c := localapi.NewClient(a.Socket)
			defer c.Close()
			c.Upload(ctx)
		}()
		time.Sleep(time.Duration(rand.IntN(120)) * time.Millisecond)
		a.kill()
		a.start()
		if bad := a.corruptFiles(); len(bad) > 0 {
			t.Fatalf("round %d: files set aside: %v", i, bad)
		}
		a.waitWatching(work)
	}
	a.drain()
	got := srv.counts(t)
	lost, doubled := 0, 0
	for i, sum := range sums {
		switch c := got[sum]; {
		case c < n:
			lost++
			t.Errorf("round %d: the cloud holds %d executions, want %d (lost)", i, c, n)
		case c > n:
			doubled++
			t.Errorf("round %d: the cloud holds %d executions, want %d (counted twice)", i, c, n)
		}
	}
	if srv.installations(t) != 1 {
		t.Errorf("the cloud knows %d installations, want 1", srv.installations(t))
	}
	t.Logf("kills during uploads: %d; programs lost %d, counted twice %d", rounds, lost, doubled)
}

// The agent is stopped (SIGTERM) the moment an exec storm of two
// spawners at full rate ends, several times. It drains what the kernel
// reported before it exits: every execution reaches the queue or the
// cloud, none is lost.
func TestStopRightAfterStorm(t *testing.T) {
	faultCase(t)
	work := worldDir(t, "cloudprotect-faults-stop-")
	prog, sum := uniqueProgram(t, work, "stopped")
	a := newAgent(t, agentOpts{Cloud: startCloud(t)})
	a.start()
	a.participate()
	a.waitWatching(work)
	var ran uint64
	for i := range scale(3, 10) {
		res, err := spawn.Run(context.Background(), spawn.Config{Path: prog, Workers: 2, Duration: time.Duration(1+i%2) * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		a.stop()
		ran += uint64(res.Execs)
		a.start()
		a.waitCollecting()
		if got := a.seen(sum); got != ran {
			t.Fatalf("stop %d: %d executions counted, %d ran (%d at %.0f/s in the last storm)", i+1, got, ran, res.Execs, res.PerSecond())
		}
		t.Logf("stop %d: %d executions at %.0f/s, all counted", i+1, res.Execs, res.PerSecond())
	}
}
