package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/testenv"
)

// A program of another user on the agent's socket is not the agent: the
// command asks it nothing, says so, and says what to do about it, for
// each way the socket was chosen.
func TestNotAnAgentHint(t *testing.T) {
	testenv.NeedRoot(t)
	// The real command and a stand-in agent, as testscript put them on
	// PATH, copied where every user may run them.
	dir, err := os.MkdirTemp("", "cloudprotect-cli-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	copyExe := func(name string) string {
		exe, err := exec.LookPath(name)
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(exe)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cli, fake := copyExe("cloudprotect"), copyExe("cloudprotect-fakeagent")
	// nobody's program on a socket in nobody's folder, answering as an
	// agent would: only the check of who it is keeps the command from
	// believing it.
	theirs := filepath.Join(dir, "nobody")
	if err := os.Mkdir(theirs, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(theirs, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(theirs, "cloudprotectd.sock")
	agent := exec.Command(fake, sock)
	agent.Env = []string{"GORACE=atexit_sleep_ms=0"}
	agent.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}}}
	stop, err := agent.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var agentOut bytes.Buffer
	agent.Stdout, agent.Stderr = &agentOut, &agentOut
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stop.Close(); agent.Wait() })
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the stand-in agent did not start: %s", agentOut.String())
		}
	}
	// The person running the command: a real account of its own.
	person := testenv.AddUser(t, "cpcli", "")
	tests := []struct {
		name string
		args []string
		env  []string
		hint string
	}{
		{"--socket", []string{"--socket", sock, "status"}, nil, "check the path given with --socket"},
		{"CLOUDPROTECT_SOCKET", []string{"status"}, []string{"CLOUDPROTECT_SOCKET=" + sock}, "CLOUDPROTECT_SOCKET names this socket: unset it"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cmd := exec.Command(cli, tt.args...)
			cmd.Env = append([]string{"GORACE=atexit_sleep_ms=0", "LANG=C.UTF-8", "PATH=/usr/bin:/bin"}, tt.env...)
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: person.UID, Gid: person.GID, Groups: []uint32{}}}
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
				t.Fatalf("exit %v; want 1\n%s%s", err, stdout.String(), stderr.String())
			}
			want := "cloudprotect: error: the program answering on " + sock + " is not the cloudprotect agent: it runs as another user, so nothing was asked of it\n" +
				"cloudprotect: hint: " + tt.hint
			if !strings.HasPrefix(stderr.String(), want) || stdout.Len() != 0 {
				t.Errorf("stdout %q, stderr:\n%s\nwant stderr beginning:\n%s", stdout.String(), stderr.String(), want)
			}
		})
	}
}

// fakeAgent listens on the socket args[0], open to every user, and
// answers every request with a status, until its standard input closes.
func fakeAgent(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "usage: cloudprotect-fakeagent SOCKET")
		return 2
	}
	ln, err := net.Listen("unix", args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	os.Chmod(args[0], 0o777)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"participation":{"state":"participating"},"can_change":true}`)
	})}
	go srv.Serve(ln)
	io.Copy(io.Discard, os.Stdin)
	srv.Close()
	return 0
}
