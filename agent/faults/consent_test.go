package faults

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/server/wire"
)

// Participate and leave in a tight loop while programs run. After every
// leave the answer already shows an empty queue and no exec source, and
// after the last one nothing more is collected: the same program run
// again leaves no record and no kernel watch stays open.
func TestParticipateLeaveLoop(t *testing.T) {
	needRoot(t)
	loops := scale(25, 200)
	work := worldDir(t, "cloudprotect-faults-consent-")
	prog, sum := uniqueProgram(t, work, "looped")

	a := newAgent(t, agentOpts{})
	a.start()
	s := startStorm(prog, 1, time.Millisecond)
	defer s.stop()
	for i := range loops {
		st := a.participate()
		if !st.Participation.Collecting {
			t.Fatalf("loop %d: participating but not collecting: %+v", i, st.Participation)
		}
		if i%5 == 0 {
			// Now and then long enough for records to be queued.
			a.waitRecord(sum, "the looped program", func(r wire.Record) bool { return r.ExecCount > 0 })
		}
		st = a.leave()
		if st.Participation.Collecting || st.Agent.ExecSource != "" {
			t.Fatalf("loop %d: after leaving: collecting=%v source=%q", i, st.Participation.Collecting, st.Agent.ExecSource)
		}
		if st.Queue.Pending != 0 || st.Queue.Records != 0 {
			t.Fatalf("loop %d: after leaving the queue holds %d records (%d pending)", i, st.Queue.Records, st.Queue.Pending)
		}
	}
	// The storm goes on after the last leave: nothing of it may be kept.
	time.Sleep(1500 * time.Millisecond) // longer than a queue commit
	s.stop()
	st := a.status()
	q, recs := a.queued()
	if st.Queue.Records != 0 || q.Pending != 0 || len(recs) != 0 {
		t.Fatalf("after leaving, the queue holds %d records, %d pending, preview %d", st.Queue.Records, q.Pending, len(recs))
	}
	if n := kernelWatches(t, a.pid()); n != 0 {
		t.Fatalf("after leaving, the agent holds %d fanotify descriptors", n)
	}
	if bad := a.corruptFiles(); len(bad) > 0 {
		t.Fatalf("files set aside: %v", bad)
	}
	// And it stays so across a restart.
	a.stop()
	a.start()
	if st := a.status(); st.Participation.State != "declined" || st.Queue.Records != 0 || st.Participation.Collecting {
		t.Fatalf("after restart: %+v queue %+v", st.Participation, st.Queue)
	}
	t.Logf("participate/leave loops: %d; executions during the loops: %d", loops, s.Attempts.Load())
}

// kernelWatches counts a process's fanotify descriptors.
func kernelWatches(t *testing.T, pid int) int {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if l, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil && strings.Contains(l, "fanotify") {
			n++
		}
	}
	return n
}
