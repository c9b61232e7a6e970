package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/cmd/cloudprotect/setup"
)

// Each way of answering during installation records the answer with via
// "install"; with no way to answer, nothing is recorded.
func TestInstallConsentPaths(t *testing.T) {
	agentBin := buildAgent(t)
	exe, err := exec.LookPath("cloudprotect")
	if err != nil {
		t.Fatal(err)
	}
	bins := t.TempDir()
	for _, name := range setup.Programs {
		if err := os.WriteFile(filepath.Join(bins, name), []byte(name+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name      string
		args      []string
		answer    string // typed on a terminal; "" means no terminal
		agent     bool   // an agent runs and records the answer
		wantState consent.State
		wantOut   string
	}{
		{name: "question answered yes", answer: "y\n", wantState: consent.Participating,
			wantOut: "participating, recorded in"},
		{name: "question answered yes in full", answer: "yes\n", wantState: consent.Participating},
		{name: "question answered no", answer: "n\n", wantState: consent.Declined,
			wantOut: "not participating, recorded in"},
		{name: "empty answer is no", answer: "\n", wantState: consent.Declined},
		{name: "--participate", args: []string{"--participate"}, wantState: consent.Participating},
		{name: "--no-participate", args: []string{"--no-participate"}, wantState: consent.Declined},
		{name: "no terminal and no flag", wantState: consent.Undecided,
			wantOut: "not decided: there was no terminal"},
		{name: "--participate on a terminal asks nothing", args: []string{"--participate"}, answer: "n\n",
			wantState: consent.Participating},
		{name: "--no-consent on a terminal asks nothing", args: []string{"--no-consent"}, answer: "y\n",
			wantState: consent.Undecided, wantOut: "not asked about (--no-consent)"},
		{name: "question answered yes, agent running", answer: "y\n", agent: true, wantState: consent.Participating,
			wantOut: "participating, recorded by the agent"},
		{name: "--no-participate, agent running", args: []string{"--no-participate"}, agent: true,
			wantState: consent.Declined, wantOut: "not participating, recorded by the agent"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Short: the socket's path under the root must fit in a
			// socket address.
			root, err := os.MkdirTemp("", "cpi")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(root) })
			l := setup.Layout{Root: root}
			sock := setup.SocketPath(l)
			if tt.agent {
				agent := exec.Command(agentBin, "--user", "--state-dir", l.OnDisk(setup.StateDir), "--socket", sock,
					"--policy", l.OnDisk(consent.DefaultPolicyPath), "--server", "http://127.0.0.1:1")
				var log bytes.Buffer
				agent.Stderr = &log
				if err := agent.Start(); err != nil {
					t.Fatal(err)
				}
				defer func() { agent.Process.Signal(syscall.SIGTERM); agent.Wait() }()
				for i := 0; ; i++ {
					if _, err := os.Stat(sock); err == nil {
						break
					}
					if i == 250 {
						agent.Process.Kill()
						agent.Wait()
						t.Fatalf("agent did not start: %s", log.String())
					}
					time.Sleep(20 * time.Millisecond)
				}
			}

			cmd := exec.Command(exe, append([]string{"install", "--root", root, "--bin-dir", bins}, tt.args...)...)
			var out bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &out
			if tt.answer != "" {
				master, slave := openPTY(t)
				master.Write([]byte(tt.answer))
				cmd.Stdin = slave
			}
			if err := cmd.Run(); err != nil {
				t.Fatalf("install: %v\n%s", err, out.String())
			}
			asked := strings.Contains(out.String(), "Security Network Statement") &&
				strings.Contains(out.String(), "I agree to participate in the Security Network [y/N]")
			if wantAsk := tt.answer != "" && len(tt.args) == 0; asked != wantAsk {
				t.Errorf("asked = %v, want %v:\n%s", asked, wantAsk, out.String())
			}
			if !strings.Contains(out.String(), tt.wantOut) {
				t.Errorf("output lacks %q:\n%s", tt.wantOut, out.String())
			}

			// The agent's record, as the agent will read it.
			rec, notice, err := consent.NewStore(setup.RecordPath(l), nil, nil).Load()
			if err != nil || notice != "" {
				t.Fatal(err, notice)
			}
			if rec.State != tt.wantState {
				t.Errorf("recorded %s, want %s", rec.State, tt.wantState)
			}
			if tt.wantState != consent.Undecided && rec.Via != consent.ViaInstall {
				t.Errorf("recorded via %q, want install", rec.Via)
			}
			if tt.wantState == consent.Participating && rec.AcceptedVersion != consent.StatementVersion {
				t.Errorf("accepted version %d, want %d", rec.AcceptedVersion, consent.StatementVersion)
			}
			if tt.agent {
				c := localapi.NewClient(sock)
				defer c.Close()
				st, err := c.Status(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				if st.Participation.State != api.State(tt.wantState) || st.Participation.Via != "install" {
					t.Errorf("agent says %+v, want %s via install", st.Participation, tt.wantState)
				}
			}
		})
	}
}
