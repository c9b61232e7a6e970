// Package cli is the cloudprotect command: a thin client of the agent's
// local API for the "settings" way to see status and alerts, read the
// statement, participate or leave, and look at and send the statistics
// queue; and the installer.
//
// Everything it prints for a person goes through package i18n, in the
// language the environment asks for. A new command is one entry in
// commands, with a one-line summary and a help text (both i18n.Keys), and
// a run function that parses its flags with runner.parseFlags.
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
	"path/filepath"
	"regexp"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/tray/i18n"
)

// Env is what a run of the command sees of the world.
type Env struct {
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	// IsTerminal reports whether Stdin is a terminal a person types at.
	IsTerminal func() bool
	// Getenv reads the environment (the language, the socket); nil reads
	// nothing.
	Getenv func(string) string
	// Getwd returns the working folder, where `make run` leaves its
	// socket; nil means os.Getwd.
	Getwd func() (string, error)
}

// OSEnv is the process's own standard streams and environment.
func OSEnv() Env {
	return Env{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr, Getenv: os.Getenv, Getwd: os.Getwd,
		IsTerminal: func() bool {
			_, err := unix.IoctlGetTermios(int(os.Stdin.Fd()), unix.TCGETS)
			return err == nil
		}}
}

func (e Env) getenv(k string) string {
	if e.Getenv == nil {
		return ""
	}
	return e.Getenv(k)
}

// usageError is a mistake in the command line; cmd names the command
// whose help explains it ("" for the whole program).
type usageError struct {
	cmd string
	msg string
}

func (e *usageError) Error() string { return e.msg }

// hintError carries a hint a person can act on.
type hintError struct {
	err  error
	hint string
}

func (e *hintError) Error() string { return e.err.Error() }
func (e *hintError) Unwrap() error { return e.err }

// errHelp asks for the command's help on standard output.
var errHelp = errors.New("help requested")

type command struct {
	name string
	// synopsis is the command line, flags included.
	synopsis string
	// summary is one line for the list of commands; help explains the
	// command and its flags.
	summary, help i18n.Key
	// local commands need no agent.
	run func(ctx context.Context, r *runner, args []string) error
}

// commands in the order `cloudprotect help` lists them.
var commands = []command{
	{"status", "status [--json]", "show participation, protection, the agent and the queue",
		"Shows whether cloud protection is on, what the agent watches, recent alerts and what waits to be sent.\n\n" +
			"  --json   print the status as JSON, for programs\n", cmdStatus},
	{"alerts", "alerts [--json]", "list recent detections and blocked programs",
		"Lists the programs the Security Network reported as dangerous on this computer, newest first, and which of them were blocked. " +
			"Administrators see every user's; others see those of programs they ran.\n\n" +
			"  --json   print the alerts as JSON, for programs\n", cmdAlerts},
	{"statement", "statement", "print the Security Network Statement",
		"Prints the Security Network Statement: exactly what is collected and sent when you participate. " +
			"It works without the agent.\n", cmdStatement},
	{"participate", "participate [--yes]", "read the statement and agree to participate",
		"Shows the Security Network Statement and asks whether you agree to participate.\n\n" +
			"  --yes    agree without being asked: only when the person has read the statement\n", cmdParticipate},
	{"leave", "leave [--yes]", "stop participating; statistics not sent yet are deleted",
		"Stops participating in the Security Network: nothing more is collected or sent, statistics not sent yet are deleted " +
			"from this computer, and the Security Network is asked to delete what it received from it.\n\n" +
			"  --yes    do not ask for confirmation\n", cmdLeave},
	{"queue", "queue [--json]", "show everything waiting to be sent",
		"Shows every statistics record waiting to be sent, exactly as the cloud would receive it: the batch waiting for the cloud's answer first (marked *), then the rest, with totals.\n\n" +
			"  --json   print every field as JSON\n", cmdQueue},
	{"send", "send", "send pending statistics now",
		"Sends the statistics waiting to be sent now, instead of at the next regular upload.\n", cmdSend},
	{"blocked", "blocked [--json]", "list the programs that were blocked",
		"Lists the programs stopped before they ran because the Security Network knows them to be malicious, newest first: " +
			"when, the path, the SHA-256 (which `cloudprotect allow` takes) and where the verdict came from.\n\n" +
			"  --json   print them as JSON, for programs\n", cmdBlocked},
	{"allow", "allow SHA256 --reason TEXT | allow --remove SHA256 | allow --list [--json]",
		"let a program run whatever the Security Network says (administrators)",
		"Makes an exception on this computer: the program with this SHA-256 runs even when the Security Network knows it " +
			"to be malicious. It applies at once. Only root and the administrators' group may do it.\n\n" +
			"  --reason TEXT     why it may run; kept with the exception\n" +
			"  --remove SHA256   remove the exception: the Security Network's verdict applies again\n" +
			"  --list            list the exceptions\n" +
			"  --json            with --list, print them as JSON\n", cmdAllow},
	{"install", "install [--participate | --no-participate | --no-consent] [--no-start] [--root DIR] [--prefix DIR] [--bin-dir DIR]",
		"install cloudprotect (root); asks whether to participate",
		"Installs the programs, the system service, the tray's autostart entry, icons and manual pages, starts the service, " +
			"then asks whether to participate in the Security Network.\n\n" +
			"  --participate      agree without being asked (unattended installations)\n" +
			"  --no-participate   decline without being asked\n" +
			"  --no-consent       do not ask: nothing is collected until someone agrees\n" +
			"  --no-start         do not enable or start the service\n" +
			"  --root DIR         install into a staging folder instead of this computer\n" +
			"  --prefix DIR       where the programs go (default /usr/local)\n" +
			"  --bin-dir DIR      where the programs to install are (default: beside this one)\n", cmdInstall},
	{"uninstall", "uninstall [--purge [--yes]] [--root DIR] [--prefix DIR]", "remove cloudprotect (root)",
		"Stops and removes what `cloudprotect install` put in place. The consent record and the statistics not sent yet are kept " +
			"unless you ask for them to be deleted.\n\n" +
			"  --purge        also delete the agent's state\n" +
			"  --yes          do not ask before deleting it\n" +
			"  --root DIR     remove from a staging folder\n" +
			"  --prefix DIR   where it was installed (default /usr/local)\n", cmdUninstall},
	{"version", "version", "print the version",
		"Prints the version of this program and, when it answers, of the agent.\n", cmdVersion},
	{"help", "help [COMMAND]", "show help for a command",
		"Lists the commands, or explains one.\n", nil},
}

func lookup(name string) (command, bool) {
	for _, c := range commands {
		if c.name == name {
			return c, true
		}
	}
	return command{}, false
}

type runner struct {
	env Env
	p   *i18n.Printer
	// socket is the agent's; socketFrom says who chose it.
	socket     string
	socketFrom socketSource
	client     *localapi.Client
}

// socketSource is who chose the socket the command talks to.
type socketSource int

const (
	socketDefault socketSource = iota // nothing: the system agent's, else this user's
	socketFlag                        // --socket
	socketEnv                         // $CLOUDPROTECT_SOCKET
)

// Main runs the command with args (without the program name) and returns
// the exit code: 0 done, 1 failed, 2 a mistake in the command line.
func Main(args []string, env Env) int {
	p := i18n.FromEnv(env.getenv)
	r := &runner{env: env, p: p}
	return r.main(args)
}

func (r *runner) main(args []string) int {
	var socket string
	var showVersion bool
	fs := flag.NewFlagSet("cloudprotect", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&socket, "socket", "", "")
	fs.BoolVar(&showVersion, "version", false, "")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			r.usage(r.env.Stdout)
			return 0
		}
		return r.fail(r.flagError("", args, err))
	}
	if showVersion {
		return r.exit(cmdVersion(context.Background(), r, nil))
	}
	if fs.NArg() == 0 {
		r.usage(r.env.Stderr)
		return 2
	}
	name := fs.Arg(0)
	rest := fs.Args()[1:]
	if name == "help" {
		return r.help(rest)
	}
	cmd, ok := lookup(name)
	if !ok {
		return r.fail(&usageError{msg: r.p.Sprintf("unknown command %q", name)})
	}
	switch {
	case socket != "":
		r.socket, r.socketFrom = socket, socketFlag
	case env(r.env, "CLOUDPROTECT_SOCKET") != "":
		r.socket, r.socketFrom = env(r.env, "CLOUDPROTECT_SOCKET"), socketEnv
	default:
		r.socket = defaultSocket(r.env)
	}
	r.client = localapi.NewClient(r.socket)
	defer r.client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err := cmd.run(ctx, r, rest)
	if errors.Is(err, errHelp) {
		r.commandHelp(r.env.Stdout, cmd)
		return 0
	}
	return r.exit(err)
}

func env(e Env, k string) string { return e.getenv(k) }

// defaultSocket is the system agent's socket if it exists, else this
// user's if it exists, else the system agent's (the one to start).
func defaultSocket(e Env) string {
	for _, s := range []string{localapi.SystemSocket, userSocket(e)} {
		if _, err := os.Stat(s); err == nil {
			return s
		}
	}
	return localapi.SystemSocket
}

func userSocket(e Env) string {
	if d := e.getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "cloudprotect", "cloudprotectd.sock")
	}
	return localapi.UserSocket()
}

func (r *runner) exit(err error) int {
	if err == nil {
		return 0
	}
	return r.fail(err)
}

// fail prints err, and a hint when there is one, in one format for every
// kind of error.
func (r *runner) fail(err error) int {
	r.p.Fprintf(r.env.Stderr, "cloudprotect: error: %s\n", err.Error())
	var ue *usageError
	if errors.As(err, &ue) {
		if ue.cmd != "" {
			r.p.Fprintf(r.env.Stderr, "cloudprotect: hint: run `cloudprotect help %s` for its flags\n", ue.cmd)
		} else {
			r.p.Fprintf(r.env.Stderr, "cloudprotect: hint: run `cloudprotect help` for the commands\n")
		}
		return 2
	}
	if hint := r.hint(err); hint != "" {
		r.p.Fprintf(r.env.Stderr, "cloudprotect: hint: %s\n", hint)
	}
	return 1
}

func (r *runner) usage(w io.Writer) {
	r.p.Fprintf(w, "usage: cloudprotect [--socket PATH] COMMAND [flags]\n")
	r.p.Fprintf(w, "\nCloud protection on this computer: its status and alerts, the Security Network Statement, participating and leaving, and what is sent.\n")
	r.p.Fprintf(w, "\ncommands:\n")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, c := range commands {
		fmt.Fprintf(tw, "  %s\t%s\n", c.name, r.p.Sprintf(c.summary))
	}
	tw.Flush()
	r.p.Fprintf(w, "\nflags:\n")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "  --socket PATH\t%s\n", r.p.Sprintf("the agent's socket (default: $CLOUDPROTECT_SOCKET, else the system agent's, else this user's)"))
	fmt.Fprintf(tw, "  --version\t%s\n", r.p.Sprintf("print the version"))
	fmt.Fprintf(tw, "  --help\t%s\n", r.p.Sprintf("show this help"))
	tw.Flush()
	r.p.Fprintf(w, "\nRun `cloudprotect help COMMAND` or `cloudprotect COMMAND --help` for a command's flags.\n")
}

func (r *runner) commandHelp(w io.Writer, c command) {
	r.p.Fprintf(w, "usage: cloudprotect %s\n", c.synopsis)
	fmt.Fprintf(w, "\n%s", r.p.Sprintf(c.help))
}

func (r *runner) help(args []string) int {
	switch len(args) {
	case 0:
		r.usage(r.env.Stdout)
		return 0
	case 1:
		if args[0] == "help" {
			c, _ := lookup("help")
			r.commandHelp(r.env.Stdout, c)
			return 0
		}
		c, ok := lookup(args[0])
		if !ok {
			return r.fail(&usageError{msg: r.p.Sprintf("unknown command %q", args[0])})
		}
		r.commandHelp(r.env.Stdout, c)
		return 0
	}
	return r.fail(&usageError{cmd: "help", msg: r.p.Sprintf("help: unexpected argument %q", args[1])})
}

// hint finds what a person can do about err.
func (r *runner) hint(err error) string {
	var he *hintError
	var ae *localapi.APIError
	switch {
	case errors.As(err, &he):
		return he.hint
	case errors.As(err, &ae):
		return ae.Hint
	case errors.Is(err, localapi.ErrUnreachable):
		return r.unreachableHint()
	case errors.Is(err, localapi.ErrNotAnAgent):
		return r.notAnAgentHint()
	}
	return ""
}

// notAnAgentHint says what to do when the program on the socket runs as
// another user: it cannot be the agent (that runs as root, or as you),
// so nothing was sent to it.
func (r *runner) notAnAgentHint() string {
	switch r.socketFrom {
	case socketFlag:
		return r.p.Sprintf("check the path given with --socket: the agent's socket belongs to root (%s) or, for an agent of your own, to you", localapi.SystemSocket)
	case socketEnv:
		return r.p.Sprintf("CLOUDPROTECT_SOCKET names this socket: unset it to use the system agent, or point it at an agent of your own")
	}
	return r.p.Sprintf("another user's program holds the agent's socket: tell your administrator, and do not trust what it answers")
}

// unreachableHint says how to reach an agent: the one `make run` started
// in this checkout, or how to start one.
func (r *runner) unreachableHint() string {
	if dev := r.devSocket(); dev != "" && dev != r.socket {
		return r.p.Sprintf("an agent started by `make run` listens on %s: use --socket %s or export CLOUDPROTECT_SOCKET=%s", dev, dev, dev)
	}
	switch r.socketFrom {
	case socketFlag:
		return r.p.Sprintf("check the path given with --socket, or start an agent there: cloudprotectd --user --socket %s", r.socket)
	case socketEnv:
		return r.p.Sprintf("CLOUDPROTECT_SOCKET names this socket; unset it to use the system agent, or start an agent there: cloudprotectd --user --socket %s", r.socket)
	}
	if r.socket == localapi.SystemSocket {
		return r.p.Sprintf("start the system service: sudo systemctl start cloudprotectd (or, for this user only: cloudprotectd --user &)")
	}
	return r.p.Sprintf("start your agent again: cloudprotectd --user &")
}

// devSocket finds the socket `make run` leaves in a source checkout, in
// the working folder or one above it.
func (r *runner) devSocket() string {
	getwd := r.env.Getwd
	if getwd == nil {
		getwd = os.Getwd
	}
	dir, err := getwd()
	if err != nil {
		return ""
	}
	for {
		s := filepath.Join(dir, ".run", "cloudprotectd.sock")
		if fi, err := os.Stat(s); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return s
		}
		up := filepath.Dir(dir)
		if up == dir {
			return ""
		}
		dir = up
	}
}

// wrap turns a connection failure into one clear line.
func (r *runner) wrap(err error) error {
	if errors.Is(err, localapi.ErrUnreachable) {
		return r.p.Wrap(localapi.ErrUnreachable, "the cloudprotect agent is not running (no answer on %s)", r.socket)
	}
	if errors.Is(err, localapi.ErrNotAnAgent) {
		return r.p.Wrap(err, "the program answering on %s is not the cloudprotect agent: it runs as another user, so nothing was asked of it", r.socket)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return r.p.Wrap(err, "the cloudprotect agent did not answer in time (on %s)", r.socket)
	}
	return err
}

// parseFlags parses a command's flags. --help and -h return errHelp; a
// mistake returns a usageError naming the flag as the person typed it.
func (r *runner) parseFlags(name string, args []string, setup func(*flag.FlagSet)) error {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	setup(fs)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return errHelp
		}
		return r.flagError(name, args, err)
	}
	if fs.NArg() > 0 {
		if fs.Arg(0) == "help" {
			return errHelp
		}
		return &usageError{cmd: name, msg: r.p.Sprintf("%s: unexpected argument %q", name, fs.Arg(0))}
	}
	return nil
}

var flagErrors = []struct {
	re  *regexp.Regexp
	key i18n.Key
}{
	{regexp.MustCompile(`^flag provided but not defined: -(.+)$`), "%s: unknown flag %s"},
	{regexp.MustCompile(`^flag needs an argument: -(.+)$`), "%s: the flag %s needs a value"},
	{regexp.MustCompile(`^invalid (?:boolean )?value ".*" for (?:flag )?-([^:]+):`), "%s: the flag %s does not take that value"},
}

// flagError rephrases the flag package's error with the flag as typed.
func (r *runner) flagError(cmd string, args []string, err error) error {
	prog := "cloudprotect"
	if cmd != "" {
		prog = cmd
	}
	for _, fe := range flagErrors {
		m := fe.re.FindStringSubmatch(err.Error())
		if m == nil {
			continue
		}
		return &usageError{cmd: cmd, msg: r.p.Sprintf(fe.key, prog, typed(args, m[1]))}
	}
	return &usageError{cmd: cmd, msg: prog + ": " + err.Error()}
}

// typed returns the argument in which the person typed the flag name.
func typed(args []string, name string) string {
	for _, a := range args {
		if a == "--" {
			break
		}
		flag, _, _ := strings.Cut(a, "=")
		if strings.TrimLeft(flag, "-") == name && strings.HasPrefix(flag, "-") {
			return flag
		}
	}
	return "--" + name
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
			err:  r.p.Error("no terminal to ask for confirmation"),
			hint: r.p.Sprintf("run it in a terminal, or add %s if the person has already agreed", flagName),
		}
	}
	r.p.Fprintf(r.env.Stdout, "%s [y/N] ", question)
	line, err := bufio.NewReader(r.env.Stdin).ReadString('\n')
	if err != nil && line == "" {
		fmt.Fprintln(r.env.Stdout)
		return false, nil
	}
	answer := strings.ToLower(strings.TrimSpace(line))
	for _, yes := range []string{"y", "yes", r.p.Sprintf("y"), r.p.Sprintf("yes")} {
		if answer == yes {
			return true, nil
		}
	}
	return false, nil
}
