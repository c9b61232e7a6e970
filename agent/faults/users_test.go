package faults

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/testenv"
)

// longProgram writes a copy of /bin/sleep with random bytes appended (a
// new SHA-256) that every user can run, and returns its path and hash.
// It runs long enough for the agent to learn who ran it.
func longProgram(t *testing.T, dir, name string) (string, string) {
	t.Helper()
	b, err := os.ReadFile("/bin/sleep")
	if err != nil {
		t.Fatal(err)
	}
	b = append(b, []byte(rand.Text())...)
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b, 0o755); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return p, hex.EncodeToString(sum[:])
}

// runAsUser runs path with args as the account. An execution the agent
// blocks (EPERM) is not an error: it is the agent at work.
func runAsUser(t *testing.T, acct testenv.Account, path string, args ...string) {
	t.Helper()
	cmd := exec.Command(path, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: acct.UID, Gid: acct.GID, Groups: []uint32{}}}
	cmd.Dir = "/"
	if out, err := cmd.CombinedOutput(); err != nil && !errors.Is(err, syscall.EPERM) {
		t.Fatalf("run %s as %s: %v %s", path, acct.Name, err, out)
	}
}

// follower is a user's event stream, read by a child process.
type follower struct {
	cmd   *exec.Cmd
	stdin interface{ Close() error }
	out   *bufio.Reader
}

func follow(t *testing.T, a *agentProc, acct testenv.Account) *follower {
	t.Helper()
	cmd := runAs(t, int(acct.UID), int(acct.GID), a.Socket, "events", nil)
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	f := &follower{cmd: cmd, stdin: in, out: bufio.NewReader(out)}
	if line, err := f.out.ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("%s's event stream: %q %v", acct.Name, line, err)
	}
	return f
}

// alerts ends the stream and returns the alerts it carried.
func (f *follower) alerts(t *testing.T) []string {
	t.Helper()
	f.stdin.Close()
	var got []string
	for {
		line, err := f.out.ReadString('\n')
		if sha, ok := strings.CutPrefix(strings.TrimSpace(line), "alert "); ok {
			got = append(got, sha)
		} else if strings.TrimSpace(line) != "" {
			t.Errorf("event stream: %q", line)
		}
		if err != nil {
			break
		}
	}
	f.cmd.Wait()
	slices.Sort(got)
	return got
}

// userAlerts returns what GET /v1/alerts shows the account.
func userAlerts(t *testing.T, a *agentProc, acct testenv.Account) []string {
	t.Helper()
	out := output(t, runAs(t, int(acct.UID), int(acct.GID), a.Socket, "alerts", nil))
	lines := strings.Split(out, "\n")
	got := lines[:len(lines)-1]
	slices.Sort(got)
	return got
}

// Alerts say which programs someone ran. Two people, each a real account,
// run a program the Security Network knows as malicious on a machine with
// the system agent (which blocks them): each of them is told about their
// own program, on the
// event stream and in GET /v1/alerts, and nothing of the other's; neither
// may read the queue; root sees both alerts; and the alerts are still
// there after the agent restarts.
func TestAlertsOnlyForWhoRanThem(t *testing.T) {
	faultCase(t)
	alice := testenv.AddUser(t, "cpal", "")
	bob := testenv.AddUser(t, "cpbo", "")
	work := worldDir(t, "cloudprotect-faults-alerts-")
	progA, sumA := longProgram(t, work, "alice-tool")
	progB, sumB := longProgram(t, work, "bob-tool")
	srv := startSystemCloud(t, []string{sumA, sumB})
	a := newAgent(t, agentOpts{System: true, Server: srv.URL})
	a.cloud = srv
	a.start()
	a.participate()
	a.waitWatching(work)

	fa, fb := follow(t, a, alice), follow(t, a, bob)
	runAsUser(t, alice, progA, "1")
	runAsUser(t, bob, progB, "1")
	deadline := time.Now().Add(30 * time.Second)
	for {
		l, err := a.Client.Alerts(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, al := range l.Alerts {
			got = append(got, al.SHA256)
		}
		if slices.Contains(got, sumA) && slices.Contains(got, sumB) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("root sees alerts %v 30 s after the programs ran; want both", got)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// A status event after the alerts ends each stream's wait.
	a.setParticipation(true)
	if got := fa.alerts(t); !slices.Equal(got, []string{sumA}) {
		t.Errorf("alice's event stream carried alerts %v; want only her program's %s", got, sumA)
	}
	if got := fb.alerts(t); !slices.Equal(got, []string{sumB}) {
		t.Errorf("bob's event stream carried alerts %v; want only his program's %s", got, sumB)
	}
	check := func(when string) {
		t.Helper()
		if got := userAlerts(t, a, alice); !slices.Equal(got, []string{sumA}) {
			t.Errorf("%s: alice's alerts %v; want only %s", when, got, sumA)
		}
		if got := userAlerts(t, a, bob); !slices.Equal(got, []string{sumB}) {
			t.Errorf("%s: bob's alerts %v; want only %s", when, got, sumB)
		}
		if got := output(t, runAs(t, int(alice.UID), int(alice.GID), a.Socket, "queue", nil)); got != "code=403 hint=true" {
			t.Errorf("%s: alice reading the queue: %q; want 403 with a hint", when, got)
		}
		if st := a.status(); st.Alerts < 2 {
			t.Errorf("%s: root's status counts %d alerts; want both", when, st.Alerts)
		}
	}
	check("while running")
	a.stop()
	a.start()
	check("after a restart")
}
