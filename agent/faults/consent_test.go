package faults

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/wire"
)

// Participate and leave in a tight loop while programs run. After every
// leave the answer already shows an empty queue and no exec source, and
// after the last one nothing more is collected: the same program run
// again leaves no record and no kernel watch stays open.
func TestParticipateLeaveLoop(t *testing.T) {
	faultCase(t)
	loops := scale(25, 200)
	work := worldDir(t, "cloudprotect-faults-consent-")
	prog, sum := uniqueProgram(t, work, "looped")

	a := newAgent(t, agentOpts{Cloud: startCloud(t)})
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
			deadline := time.Now().Add(20 * time.Second)
			for a.seen(sum) == 0 {
				if time.Now().After(deadline) {
					t.Fatalf("loop %d: the looped program is not counted", i)
				}
				time.Sleep(100 * time.Millisecond)
			}
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
	if st.Queue.Records != 0 || len(q.Records) != 0 || len(recs) != 0 {
		t.Fatalf("after leaving, the queue holds %d records, %d pending, preview %+v", st.Queue.Records, q.Totals.Programs, recs)
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

// Consent withdrawn while a batch is on its way to the cloud, by the
// person (leave) or by the administrator (policy off): after the change
// is applied no statistics or lookups go out, the queue is empty, and
// once the held batch lands the cloud deletes the installation with it.
func TestWithdrawDuringUpload(t *testing.T) {
	faultCase(t)
	t.Parallel()
	for _, how := range []string{"leave", "policy"} {
		t.Run(how, func(t *testing.T) {
			srv := startCloud(t)
			front := startHostileFront(t, srv.URL)
			work := worldDir(t, "cloudprotect-faults-withdraw-")
			a := newAgent(t, agentOpts{Server: front.srv.URL})
			a.cloud = srv
			a.start()
			a.participate()
			a.waitWatching(work)
			a.drain()

			prog, sum := uniqueProgram(t, work, "inflight")
			runN(t, prog, 4)
			a.waitRecord(sum, "the program", func(r wire.Record) bool { return r.ExecCount == 4 })
			front.set("hold")
			upDone := make(chan error, 1)
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				defer cancel()
				c := localapi.NewClient(a.Socket)
				defer c.Close()
				_, err := c.Upload(ctx)
				upDone <- err
			}()
			deadline := time.Now().Add(20 * time.Second)
			for front.holding() == 0 {
				if time.Now().After(deadline) {
					t.Fatal("the upload did not reach the server")
				}
				time.Sleep(20 * time.Millisecond)
			}
			// Withdraw while the batch is held.
			switch how {
			case "leave":
				a.leave()
			case "policy":
				os.WriteFile(a.Policy, []byte(`{"participation":"off"}`), 0o644)
				a.waitStatus("the policy to apply", func(s api.Status) bool { return !s.Participation.Collecting })
			}
			withdrawn := time.Now()
			// The purge follows the policy change at once (the answer to a
			// leave waits for it).
			a.waitStatus("the queue to be purged", func(s api.Status) bool { return s.Queue.Records == 0 })
			st := a.status()
			if st.Queue.Records != 0 || st.Participation.Collecting {
				t.Fatalf("after withdrawing: collecting=%v records=%d", st.Participation.Collecting, st.Queue.Records)
			}
			// Programs keep running; the held batch is let through.
			runN(t, prog, 3)
			front.unhold()
			front.set("good")
			<-upDone
			a.waitStatus("the deletion to be confirmed", func(s api.Status) bool {
				return !s.Upload.DeletionPending && !s.Upload.Registered
			})
			time.Sleep(1500 * time.Millisecond) // a queue commit's time for anything left to show
			for _, ar := range front.since(withdrawn) {
				if ar.method != "DELETE" {
					t.Errorf("%s %s reached the server after consent was withdrawn", ar.method, ar.path)
				}
			}
			if n := srv.installations(t); n != 0 {
				t.Errorf("the cloud still knows %d installations", n)
			}
			if c := srv.counts(t); len(c) != 0 {
				t.Errorf("the cloud still holds statistics of %d files", len(c))
			}
			if q, recs := a.queued(); len(q.Records) != 0 || len(recs) != 0 || a.status().Queue.Records != 0 {
				t.Errorf("the queue holds %d records after withdrawing", len(recs))
			}
		})
	}
}
