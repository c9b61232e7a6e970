// Command cloudprotectd is the cloudprotect agent: it owns participation in
// the Security Network, watches executed programs while the person
// participates, and serves the local API the tray and the CLI use.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	rtdebug "runtime/debug"
	"syscall"

	"github.com/cloudprotect/cloudprotect/agent"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/cmd/internal/version"
)

func main() {
	fs := flag.NewFlagSet("cloudprotectd", flag.ContinueOnError)
	user := fs.Bool("user", false, "run as the current user: state under $XDG_STATE_HOME, socket under $XDG_RUNTIME_DIR")
	stateDir := fs.String("state-dir", "", "folder for the consent record, queue and upload state (default: by mode)")
	socket := fs.String("socket", "", "local API socket (default: by mode)")
	policy := fs.String("policy", "", "administrator's policy file (default /etc/cloudprotect/policy.json)")
	server := fs.String("server", "", "Security Network URL: https://host, or a server on this computer (see SECURITY.md); the policy's server wins. Without one, nothing is sent")
	execSource := fs.String("exec-source", "", "force an exec source: fanotify, fanotify-unprivileged, proc-connector, proc-poll")
	protectOnly := fs.String("protect-only", "", "check programs before they run only on the filesystem holding this folder (tests, diagnosis; default: every local filesystem)")
	debug := fs.Bool("debug", false, "log debug messages")
	showVersion := fs.Bool("version", false, "print the version")
	if code := parseArgs(fs, os.Args[1:], os.Stdout, os.Stderr); code >= 0 {
		os.Exit(code)
	}
	if *showVersion {
		fmt.Printf("cloudprotectd %s\n", version.String())
		return
	}

	level := slog.LevelInfo
	if *debug {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	mode := agent.ModeSystem
	if *user {
		mode = agent.ModeUser
	}
	if mode == agent.ModeSystem && os.Geteuid() != 0 {
		fail(errors.New("the system agent needs root"), "run it as a service (systemctl start cloudprotectd) or use cloudprotectd --user")
	}
	cfg := agent.DefaultConfig(mode)
	cfg.Version = version.String()
	cfg.Logger = log
	cfg.ExecSource = *execSource
	if *protectOnly != "" {
		cfg.ProtectPaths = []string{*protectOnly}
	}
	for _, f := range []struct {
		dst *string
		v   string
	}{{&cfg.StateDir, *stateDir}, {&cfg.Socket, *socket}, {&cfg.PolicyPath, *policy}, {&cfg.Server, *server}} {
		if f.v != "" {
			*f.dst = f.v
		}
	}

	a, err := agent.New(cfg)
	if errors.Is(err, localapi.ErrAlreadyRunning) {
		fail(err, "stop the other agent first (systemctl stop cloudprotectd), or give this one another --socket")
	}
	if err != nil {
		fail(err, "the state folder and the socket's folder must be this user's own, and writable; "+
			"a folder that belongs to someone else is refused: remove it, or choose another with --state-dir, --socket or XDG_RUNTIME_DIR")
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		// The agent's memory is bounded by design; a soft limit makes the
		// garbage collector keep its peak close to what it uses.
		rtdebug.SetMemoryLimit(agent.MemoryLimit)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := a.Run(ctx); err != nil {
		fail(err, "see the messages above")
	}
}

// parseArgs parses the command line: -1 to go on, or the exit code when
// there is nothing more to do (help asked for: the usage on stdout, 0; a
// mistake: on stderr, 2). "help" and "version" work as commands too.
func parseArgs(fs *flag.FlagSet, args []string, stdout, stderr io.Writer) int {
	usage := func(w io.Writer) {
		fmt.Fprintf(w, "usage: cloudprotectd [--user] [flags]\n\nThe cloudprotect agent. Flags:\n")
		fs.SetOutput(w)
		fs.PrintDefaults()
	}
	switch {
	case len(args) == 1 && args[0] == "help":
		usage(stdout)
		return 0
	case len(args) == 1 && args[0] == "version":
		fmt.Fprintf(stdout, "cloudprotectd %s\n", version.String())
		return 0
	}
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			usage(stdout)
			return 0
		}
		fmt.Fprintf(stderr, "cloudprotectd: error: %v\ncloudprotectd: hint: see cloudprotectd --help\n", err)
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "cloudprotectd: error: unexpected argument %q\ncloudprotectd: hint: cloudprotectd takes only flags; see cloudprotectd --help\n", fs.Arg(0))
		return 2
	}
	return -1
}

func fail(err error, hint string) {
	fmt.Fprintf(os.Stderr, "cloudprotectd: error: %v\ncloudprotectd: hint: %s\n", err, hint)
	os.Exit(1)
}
