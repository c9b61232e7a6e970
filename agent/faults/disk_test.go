package faults

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/queue"
)

// mountTmpfs mounts a tmpfs of size bytes on a fresh folder, unmounted
// when the test ends (after the agent, whose cleanup is registered later).
func mountTmpfs(t *testing.T, size int) string {
	t.Helper()
	dir := filepath.Join(worldDir(t, "cloudprotect-faults-tmpfs-"), "state")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d,mode=0700", size)); err != nil {
		t.Skipf("cannot mount a tmpfs here (%v): not supported in this environment", err)
	}
	t.Cleanup(func() { syscall.Unmount(dir, syscall.MNT_DETACH) })
	return dir
}

// fill writes a file until the file system is full and returns its path.
func fill(t *testing.T, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "filler")
	f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			return p
		}
	}
}

// The state folder fills up: the agent keeps running and answering, says
// why in its log, keeps what it could not write in memory and writes it
// when space returns; the queue is never set aside as damaged.
func TestDiskFull(t *testing.T) {
	faultCase(t)
	state := mountTmpfs(t, 2<<20)
	a := newAgent(t, agentOpts{StateDir: state, Cloud: startCloud(t)})
	work := worldDir(t, "cloudprotect-faults-disk-")
	a.start()
	a.participate()
	a.waitWatching(work)

	filler := fill(t, state)
	n := scale(60, 400)
	sums := make([]string, n)
	for i := range n {
		var p string
		p, sums[i] = uniqueProgram(t, work, fmt.Sprintf("p%03d", i))
		runN(t, p, 1)
	}
	// Reported: the commit failure is logged with its reason.
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(a.logText(), "no space left on device") {
		if time.Now().After(deadline) {
			t.Fatalf("no report of the full disk in the agent's log")
		}
		time.Sleep(100 * time.Millisecond)
	}
	st := a.waitStatus("the status to say the state folder is full", func(s api.Status) bool {
		return s.Agent.Limited && strings.Contains(s.Agent.LimitedReason, "cannot be written")
	})
	if !a.running() || !st.Participation.Collecting {
		t.Fatalf("with a full disk: running=%v status %+v", a.running(), st.Participation)
	}
	t.Logf("status with a full disk: limited=%v reason=%q", st.Agent.Limited, st.Agent.LimitedReason)

	// Space returns: everything that was executed meanwhile is written.
	os.Remove(filler)
	for _, sum := range sums {
		a.waitSeen(sum, 1, "a program run while the disk was full")
	}
	if bad := a.corruptFiles(); len(bad) > 0 {
		t.Fatalf("files set aside: %v", bad)
	}
	a.waitStatus("the status to stop reporting the full disk", func(s api.Status) bool {
		return !strings.Contains(s.Agent.LimitedReason, "cannot be written")
	})

	os.Remove(filler)
	a.stop()
	q, err := queue.Open(filepath.Join(state, "queue.db"), queue.Options{})
	if err != nil {
		t.Fatal(err)
	}
	q.Close()
	if bad, _ := filepath.Glob(filepath.Join(state, "*.corrupt-*")); len(bad) > 0 {
		t.Fatalf("queue set aside: %v", bad)
	}
}

// Leaving while the state folder is full stops collection at once and
// for good (the consent record cannot be written, so it is removed), and
// deletes the pending statistics from the disk.
func TestLeaveWithFullDisk(t *testing.T) {
	faultCase(t)
	state := mountTmpfs(t, 2<<20)
	a := newAgent(t, agentOpts{StateDir: state})
	work := worldDir(t, "cloudprotect-faults-disk-")
	a.start()
	a.participate()
	a.waitWatching(work)
	var sums []string
	for i := range 20 {
		p, sum := uniqueProgram(t, work, fmt.Sprintf("p%03d", i))
		runN(t, p, 1)
		sums = append(sums, sum)
	}
	a.waitStatus("records to be queued", func(s api.Status) bool { return s.Queue.Records >= 20 })
	filler := fill(t, state)
	defer os.Remove(filler)

	_, err := a.Client.SetParticipation(t.Context(), api.ParticipationRequest{Participate: false, Via: "cli"})
	st := a.status()
	if err != nil || st.Participation.Collecting || st.Agent.ExecSource != "" {
		t.Fatalf("leaving with a full disk (answer: %v): collecting=%v source=%q",
			err, st.Participation.Collecting, st.Agent.ExecSource)
	}
	if st.Participation.Notice == "" {
		t.Errorf("no notice that the choice could not be saved")
	}
	if st.Queue.Records != 0 {
		t.Errorf("after leaving, the queue holds %d records", st.Queue.Records)
	}
	a.stop()
	a.start()
	if st := a.status(); st.Participation.Collecting || st.Participation.State == "participating" {
		t.Errorf("after a restart, a leave made while the disk was full is forgotten: %+v", st.Participation)
	}
	if st := a.status(); st.Queue.Records != 0 {
		t.Errorf("after a restart the queue holds %d records", st.Queue.Records)
	}
	// No file in the state folder holds the hash of a program run before
	// leaving (the queue's keys are the raw SHA-256).
	files, _ := filepath.Glob(filepath.Join(state, "*"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, sum := range sums {
			raw, _ := hex.DecodeString(sum)
			if bytes.Contains(b, raw) || bytes.Contains(b, []byte(sum)) {
				t.Errorf("%s still holds the hash of a program run before leaving", filepath.Base(f))
				break
			}
		}
	}
	if bad := a.corruptFiles(); len(bad) > 0 {
		t.Errorf("files holding statistics left after leaving: %v", bad)
	}
}
