package faults

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/testenv"
)

// The agent's memory stays bounded whatever local users do to it. With
// programs of 4 KiB paths queued (the cloud unreachable),
// local users attack at once: an account and 20 uids without account
// (as one person gets with user namespaces) each hold every connection
// they may, half of them event streams they never read; an account asks
// for the queue on 32 connections and never reads; an administrator does
// the same. Root is still answered, and the agent's peak resident memory
// (VmHWM) stays under 40 MiB.
func TestMemoryUnderLocalAttacks(t *testing.T) {
	faultCase(t)
	group, _ := testenv.AddGroup(t, "cpadm")
	admin := testenv.AddUser(t, "cpma", "", group)
	attacker := testenv.AddUser(t, "cpmx", "")
	a := newAgent(t, agentOpts{System: true})
	if err := os.WriteFile(a.Policy, []byte(`{"admin_group":"`+group+`"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	a.start()
	a.participate()
	work := worldDir(t, "cloudprotect-faults-memory-")
	a.waitWatching(work)

	// Programs whose paths are 4 KiB long, each run once.
	n := scale(300, 2000)
	deep := work
	for len(deep) < 3900 {
		deep = filepath.Join(deep, strings.Repeat("d", 200))
	}
	if err := os.MkdirAll(deep, 0o755); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for i := range n {
		prog, _ := uniqueProgram(t, deep, fmt.Sprintf("p%05d", i))
		runN(t, prog, 1)
		os.Remove(prog)
	}
	a.waitStatus("the programs to be queued", func(s api.Status) bool { return s.Queue.Records >= n })
	t.Logf("%d programs with %d-byte paths run and queued in %s", n, len(deep)+7, time.Since(start).Round(time.Second))
	before := readProc(t, a.pid())

	// The attacks, all at once.
	var holders []*exec.Cmd
	var stdins []*os.File
	hold := func(uid, gid uint32, op string) {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd := runAs(t, int(uid), int(gid), a.Socket, op, r)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		r.Close()
		if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || !strings.HasPrefix(line, "opened ") {
			t.Fatalf("attacker %d %s: %q %v", uid, op, line, err)
		}
		holders = append(holders, cmd)
		stdins = append(stdins, w)
	}
	defer func() {
		for i, c := range holders {
			stdins[i].Close()
			c.Wait()
		}
	}()
	hold(attacker.UID, attacker.GID, "hold:64")
	for i := range 20 {
		hold(uint32(3_100_000+os.Getpid()%1000*100+i), 3_100_000, "hold:64")
	}
	// Queue requests never read, by the attacker (refused) and by an
	// administrator (answered one at a time, each never read).
	hold(attacker.UID, attacker.GID, "ask:32:/v1/queue")
	hold(admin.UID, admin.GID, "ask:32:/v1/queue")
	// Root is answered throughout, while the stuck answers are given up
	// (10 s without progress each, one at a time).
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		a.status()
		time.Sleep(500 * time.Millisecond)
	}
	after := readProc(t, a.pid())
	t.Logf("agent before the attacks: %v; after: %v", before, after)
	if after.HWMKiB > 40<<10 {
		t.Errorf("peak resident memory %d KiB under the attacks, want under 40 MiB", after.HWMKiB)
	}
}
