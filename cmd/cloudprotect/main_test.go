package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"
	"golang.org/x/sys/unix"

	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/cmd/cloudprotect/cli"
)

// agentBin is the real cloudprotectd, built once for the scripts.
var agentBin string

func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){
		"cloudprotect":           func() { os.Exit(cli.Main(os.Args[1:], cli.OSEnv())) },
		"cloudprotect-fakeagent": func() { os.Exit(fakeAgent(os.Args[1:])) },
	})
}

func buildAgent(t *testing.T) string {
	t.Helper()
	if agentBin != "" {
		return agentBin
	}
	dir, err := os.MkdirTemp("", "cloudprotect-cli-test-")
	if err != nil {
		t.Fatal(err)
	}
	agentBin = filepath.Join(dir, "cloudprotectd")
	out, err := exec.Command("go", "build", "-o", agentBin, "../cloudprotectd").CombinedOutput()
	if err != nil {
		t.Fatalf("build cloudprotectd: %v\n%s", err, out)
	}
	return agentBin
}

func TestScripts(t *testing.T) {
	bin := buildAgent(t)
	testscript.Run(t, testscript.Params{
		Dir: "testdata",
		Setup: func(env *testscript.Env) error {
			env.Setenv("CLOUDPROTECT_SOCKET", filepath.Join(env.WorkDir, "run", "cloudprotectd.sock"))
			env.Setenv("XDG_RUNTIME_DIR", filepath.Join(env.WorkDir, "xdg-run"))
			return nil
		},
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			// waitstatus REGEXP: waits (at most 10s) until the agent's status
			// as JSON matches, for changes the agent applies on its own.
			"waitstatus": func(ts *testscript.TestScript, neg bool, args []string) {
				if len(args) != 1 {
					ts.Fatalf("usage: waitstatus REGEXP")
				}
				re := regexp.MustCompile(args[0])
				c := localapi.NewClient(ts.Getenv("CLOUDPROTECT_SOCKET"))
				defer c.Close()
				var last []byte
				for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
					st, err := c.Status(context.Background())
					if err != nil {
						continue
					}
					last, _ = json.Marshal(st)
					if re.Match(last) {
						return
					}
				}
				ts.Fatalf("status never matched %s; last: %s", args[0], last)
			},
			// makesocket PATH: a unix socket at PATH with nobody answering,
			// as a stopped `make run` leaves it.
			"makesocket": func(ts *testscript.TestScript, neg bool, args []string) {
				if len(args) != 1 {
					ts.Fatalf("usage: makesocket PATH")
				}
				path := ts.MkAbs(args[0])
				ts.Check(os.MkdirAll(filepath.Dir(path), 0o755))
				l, err := net.Listen("unix", path)
				ts.Check(err)
				l.(*net.UnixListener).SetUnlinkOnClose(false)
				ts.Check(l.Close())
			},
			// fakeagent PATH=[CODE:]FILE...: serves canned answers on
			// $CLOUDPROTECT_SOCKET, for what a real agent does only with a
			// real cloud behind it (a server refusing records): each request
			// for PATH gets FILE's contents as JSON, with status CODE
			// (default 200).
			"fakeagent": func(ts *testscript.TestScript, neg bool, args []string) {
				if len(args) == 0 {
					ts.Fatalf("usage: fakeagent PATH=[CODE:]FILE...")
				}
				mux := http.NewServeMux()
				for _, a := range args {
					path, file, ok := strings.Cut(a, "=")
					if !ok {
						ts.Fatalf("fakeagent: want PATH=[CODE:]FILE, got %q", a)
					}
					code := http.StatusOK
					if c, f, ok := strings.Cut(file, ":"); ok {
						n, err := strconv.Atoi(c)
						ts.Check(err)
						code, file = n, f
					}
					body := ts.ReadFile(file)
					mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
						w.Header().Set("Content-Type", "application/json")
						w.WriteHeader(code)
						io.WriteString(w, body)
					})
				}
				sock := ts.Getenv("CLOUDPROTECT_SOCKET")
				ts.Check(os.MkdirAll(filepath.Dir(sock), 0o755))
				ln, err := net.Listen("unix", sock)
				ts.Check(err)
				srv := &http.Server{Handler: mux}
				go srv.Serve(ln)
				ts.Defer(func() { srv.Close() })
			},
			// startagent [flags...]: runs the real agent in user mode with its
			// state under $WORK and waits until it answers.
			"startagent": func(ts *testscript.TestScript, neg bool, args []string) {
				sock := ts.Getenv("CLOUDPROTECT_SOCKET")
				work := ts.Getenv("WORK")
				cmdArgs := append([]string{"--user", "--state-dir", filepath.Join(work, "state"), "--socket", sock,
					"--policy", filepath.Join(work, "policy.json"), "--server", "http://127.0.0.1:1"}, args...)
				cmd := exec.Command(bin, cmdArgs...)
				var log bytes.Buffer
				cmd.Stderr = &log
				ts.Check(cmd.Start())
				ts.Defer(func() {
					cmd.Process.Signal(syscall.SIGTERM)
					cmd.Wait()
				})
				for i := 0; i < 100; i++ {
					if _, err := os.Stat(sock); err == nil {
						return
					}
					time.Sleep(20 * time.Millisecond)
				}
				ts.Fatalf("agent did not start: %s", log.String())
			},
		},
	})
}

// openPTY returns the two ends of a new pseudo-terminal.
func openPTY(t *testing.T) (master, slave *os.File) {
	t.Helper()
	fd, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	master = os.NewFile(uintptr(fd), "/dev/ptmx")
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetUint32(fd, unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	slave, err = os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { master.Close(); slave.Close() })
	return master, slave
}

// The question is asked on a terminal, and only "y" or "yes" agrees.
func TestParticipateAsksOnTerminal(t *testing.T) {
	bin := buildAgent(t)
	// The real command, as testscript put it on PATH.
	exe, err := exec.LookPath("cloudprotect")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, answer, wantState string
	}{
		{"yes", "yes\n", "participating"},
		{"y", "y\n", "participating"},
		{"no", "n\n", "undecided"},
		{"empty answer is no", "\n", "undecided"},
		{"anything else is no", "sure\n", "undecided"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			sock := filepath.Join(dir, "agent.sock")
			agent := exec.Command(bin, "--user", "--state-dir", filepath.Join(dir, "state"), "--socket", sock, "--policy", filepath.Join(dir, "p.json"))
			if err := agent.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() { agent.Process.Signal(syscall.SIGTERM); agent.Wait() }()
			for i := 0; i < 100; i++ {
				if _, err := os.Stat(sock); err == nil {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			master, slave := openPTY(t)
			run := func(args ...string) string {
				cmd := exec.Command(exe, append([]string{"--socket", sock}, args...)...)
				var out bytes.Buffer
				cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, &out, &out
				if err := cmd.Run(); err != nil {
					t.Fatalf("cloudprotect %v: %v\n%s", args, err, out.String())
				}
				return out.String()
			}
			master.Write([]byte(tt.answer))
			out := run("participate")
			if !strings.Contains(out, "Security Network Statement") || !strings.Contains(out, "I agree to participate in the Security Network [y/N]") {
				t.Errorf("participate did not show the statement and the question:\n%s", out)
			}
			if st := run("status", "--json"); !strings.Contains(st, `"state": "`+tt.wantState+`"`) {
				t.Errorf("after answering %q: %s", tt.answer, st)
			}
		})
	}
}
