// Package cli is the cloudprotect command: a thin client of the agent's
// local API for the "settings" way to see status, read the statement,
// participate or leave, and look at and send the statistics queue.
package cli

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cloudprotect/cloudprotect/agent/localapi"
)

// Env is what a run of the command sees of the world.
type Env struct {
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	// IsTerminal reports whether Stdin is a terminal a person types at.
	IsTerminal func() bool
}

// OSEnv is the process's own standard streams.
func OSEnv() Env {
	return Env{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr, IsTerminal: func() bool {
		_, err := unix.IoctlGetTermios(int(os.Stdin.Fd()), unix.TCGETS)
		return err == nil
	}}
}

// usageError is a mistake in the command line.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

// hintError carries a hint a person can act on.
type hintError struct {
	err  error
	hint string
}

func (e *hintError) Error() string { return e.err.Error() }
func (e *hintError) Unwrap() error { return e.err }

const usage = `usage: cloudprotect [--socket PATH] COMMAND [flags]

commands:
  status [--json]       show participation, the agent and the queue
  statement             print the Security Network Statement
  participate [--yes]   read the statement and agree to participate
  leave [--yes]         stop participating; pending statistics are deleted
  queue [--json]        show exactly what would be sent next
  send                  send pending statistics now
  install [flags]       install cloudprotect (root); asks whether to participate
                        (--participate, --no-participate, --no-consent, --no-start,
                        --root DIR, --prefix DIR, --bin-dir DIR)
  uninstall [flags]     remove it (root); --purge [--yes] also deletes its state
`

type command struct {
	run func(ctx context.Context, c *runner, args []string) error
}

var commands = map[string]command{
	"status":      {cmdStatus},
	"statement":   {cmdStatement},
	"participate": {cmdParticipate},
	"leave":       {cmdLeave},
	"queue":       {cmdQueue},
	"send":        {cmdSend},
	"install":     {cmdInstall},
	"uninstall":   {cmdUninstall},
}

type runner struct {
	env    Env
	socket string
	client *localapi.Client
}

// Main runs the command with args (without the program name) and returns
// the exit code.
func Main(args []string, env Env) int {
	fs := flag.NewFlagSet("cloudprotect", flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	fs.Usage = func() { fmt.Fprint(env.Stderr, usage) }
	socket := fs.String("socket", "", "the agent's socket (default: $CLOUDPROTECT_SOCKET, the system agent's, else this user's)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() == 0 {
		fmt.Fprint(env.Stderr, usage)
		return 2
	}
	name := fs.Arg(0)
	cmd, ok := commands[name]
	if !ok {
		if name == "help" {
			fmt.Fprint(env.Stdout, usage)
			return 0
		}
		fmt.Fprintf(env.Stderr, "cloudprotect: error: unknown command %q\ncloudprotect: hint: run `cloudprotect help` for the list\n", name)
		return 2
	}
	r := &runner{env: env, socket: *socket}
	if r.socket == "" {
		r.socket = localapi.DefaultSocket()
	}
	r.client = localapi.NewClient(r.socket)
	defer r.client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err := cmd.run(ctx, r, fs.Args()[1:])
	if err == nil {
		return 0
	}
	var ue *usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(env.Stderr, "cloudprotect: error: %s\ncloudprotect: hint: run `cloudprotect help`\n", ue.msg)
		return 2
	}
	fmt.Fprintf(env.Stderr, "cloudprotect: error: %v\n", err)
	if hint := r.hint(err); hint != "" {
		fmt.Fprintf(env.Stderr, "cloudprotect: hint: %s\n", hint)
	}
	return 1
}

func (r *runner) hint(err error) string {
	var he *hintError
	var ae *localapi.APIError
	switch {
	case errors.As(err, &he):
		return he.hint
	case errors.As(err, &ae):
		return ae.Hint
	case errors.Is(err, localapi.ErrUnreachable):
		return "start the agent: `sudo systemctl start cloudprotectd`, or `cloudprotectd --user &` for this user only (`make run` in a source checkout)"
	}
	return ""
}

// wrapUnreachable turns a connection failure into one clear line.
func (r *runner) wrap(err error) error {
	if errors.Is(err, localapi.ErrUnreachable) {
		return fmt.Errorf("the cloudprotect agent is not running (no answer on %s): %w", r.socket, localapi.ErrUnreachable)
	}
	return err
}

func parseFlags(name string, args []string, env Env, setup func(*flag.FlagSet)) error {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	setup(fs)
	if err := fs.Parse(args); err != nil {
		return &usageError{fmt.Sprintf("%s: %v", name, err)}
	}
	if fs.NArg() > 0 {
		return &usageError{fmt.Sprintf("%s: unexpected argument %q", name, fs.Arg(0))}
	}
	return nil
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// confirm asks a yes/no question on the terminal; the default is No.
// Without a terminal it refuses, since nobody could have read the question.
func (r *runner) confirm(question, flagName string) (bool, error) {
	if r.env.IsTerminal == nil || !r.env.IsTerminal() {
		return false, &hintError{
			err:  errors.New("no terminal to ask for confirmation"),
			hint: fmt.Sprintf("run it in a terminal, or add %s if the person has already agreed", flagName),
		}
	}
	fmt.Fprintf(r.env.Stdout, "%s [y/N] ", question)
	line, err := bufio.NewReader(r.env.Stdin).ReadString('\n')
	if err != nil && line == "" {
		fmt.Fprintln(r.env.Stdout)
		return false, nil
	}
	switch strings.ToLower(strings.TrimSpace(line)) {
	case "y", "yes":
		return true, nil
	}
	return false, nil
}
