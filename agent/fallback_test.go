package agent

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/agent/testenv"
)

var (
	daemonOnce sync.Once
	daemonDir  string
	daemonBin  string
	daemonErr  error
)

// daemon builds cloudprotectd once per test run.
func daemon(t testing.TB) string {
	t.Helper()
	daemonOnce.Do(func() {
		daemonDir, daemonErr = os.MkdirTemp("", "cloudprotectd-bin-")
		if daemonErr != nil {
			return
		}
		daemonBin = filepath.Join(daemonDir, "cloudprotectd")
		out, err := exec.Command("go", "build", "-o", daemonBin, "../cmd/cloudprotectd").CombinedOutput()
		if err != nil {
			daemonErr = err
			t.Logf("%s", out)
		}
	})
	if daemonErr != nil {
		t.Fatalf("build cloudprotectd: %v", daemonErr)
	}
	return daemonBin
}

// isolatedStatus starts the real agent in user mode in the namespaces
// given by cloneflags (and a user namespace mapping root to root when
// CLONE_NEWUSER is among them), with extra environment, makes it
// participate and returns its status once it collects.
func isolatedStatus(t *testing.T, cloneflags uintptr, env ...string) api.AgentInfo {
	t.Helper()
	bin := daemon(t)
	dir, err := os.MkdirTemp("", "cloudprotect-isolated-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "agent.sock")
	cmd := exec.Command(bin, "--user", "--state-dir", filepath.Join(dir, "state"), "--socket", sock,
		"--policy", filepath.Join(dir, "policy.json"), "--server", "http://127.0.0.1:1")
	cmd.Env = append([]string{"HOME=" + dir, "PATH=" + os.Getenv("PATH")}, env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: cloneflags}
	if cloneflags&syscall.CLONE_NEWUSER != 0 {
		cmd.SysProcAttr.UidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: 0, Size: 1}}
		cmd.SysProcAttr.GidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: 0, Size: 1}}
	}
	log, err := os.Create(filepath.Join(dir, "log"))
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		testenv.Unavailable(t, "cannot start the agent in new namespaces: %v", err)
	}
	c := localapi.NewClient(sock)
	defer func() {
		c.Close()
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	}()
	ctx := context.Background()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := c.Status(ctx); err == nil {
			break
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(filepath.Join(dir, "log"))
			t.Fatalf("the agent did not answer:\n%s", b)
		}
		time.Sleep(25 * time.Millisecond)
	}
	st, err := c.SetParticipation(ctx, api.ParticipationRequest{Participate: true, StatementVersion: consent.StatementVersion, Via: "cli"})
	if err != nil {
		t.Fatal(err)
	}
	if st.Agent.ExecSource == "" {
		b, _ := os.ReadFile(filepath.Join(dir, "log"))
		t.Fatalf("not collecting after participating: %+v\n%s", st.Agent, b)
	}
	return st.Agent
}

// The exec sources fall back when the kernel refuses the better ones, in
// namespaces where it really does, and the status says why.
func TestSourcesFallBackInNamespaces(t *testing.T) {
	testenv.NeedRoot(t)
	tests := []struct {
		name       string
		flags      uintptr
		env        []string
		wantSource string
		wantWhy    []string
	}{
		{
			name: "private PID namespace: no process events beside fanotify", flags: syscall.CLONE_NEWPID,
			wantSource: "fanotify",
			wantWhy:    []string{"programs run from memory", "process events connector delivers nothing here"},
		},
		{
			name: "user namespace: no fanotify filesystem marks", flags: syscall.CLONE_NEWUSER | syscall.CLONE_NEWPID,
			wantSource: "fanotify-unprivileged",
			wantWhy:    []string{"only programs started from the PATH directories", "fanotify: init fanotify: operation not permitted"},
		},
		{
			name: "user namespace without program folders: down to /proc", flags: syscall.CLONE_NEWUSER | syscall.CLONE_NEWPID,
			env:        []string{"PATH="},
			wantSource: "proc-poll",
			wantWhy: []string{"short-lived programs are missed", "fanotify: init fanotify: operation not permitted",
				"fanotify-unprivileged: mark directories: nothing could be watched", "proc-connector: "},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st := isolatedStatus(t, tc.flags, tc.env...)
			t.Logf("source %s: %s", st.ExecSource, st.LimitedReason)
			if st.ExecSource != tc.wantSource || !st.Limited {
				t.Fatalf("source %q limited %v (%s), want %s, limited", st.ExecSource, st.Limited, st.LimitedReason, tc.wantSource)
			}
			for _, w := range tc.wantWhy {
				if !strings.Contains(st.LimitedReason, w) {
					t.Errorf("limited reason %q does not say %q", st.LimitedReason, w)
				}
			}
		})
	}
}
