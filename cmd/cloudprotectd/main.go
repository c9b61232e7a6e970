// Command cloudprotectd is the cloudprotect agent: it owns participation in
// the Security Network, watches executed programs while the person
// participates, and serves the local API the tray and the CLI use.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/cloudprotect/cloudprotect/agent"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
)

func main() {
	user := flag.Bool("user", false, "run as the current user: state under $XDG_STATE_HOME, socket under $XDG_RUNTIME_DIR")
	stateDir := flag.String("state-dir", "", "folder for the consent record, queue and upload state (default: by mode)")
	socket := flag.String("socket", "", "local API socket (default: by mode)")
	policy := flag.String("policy", "", "administrator's policy file (default /etc/cloudprotect/policy.json)")
	server := flag.String("server", "", "Security Network URL: https://host, or a server on this computer (see SECURITY.md); the policy's server wins. Without one, nothing is sent")
	execSource := flag.String("exec-source", "", "force an exec source: fanotify, fanotify-unprivileged, proc-connector, proc-poll")
	debug := flag.Bool("debug", false, "log debug messages")
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: cloudprotectd [--user] [flags]\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() > 0 {
		fail(fmt.Errorf("unexpected argument %q", flag.Arg(0)), "cloudprotectd takes only flags; see cloudprotectd --help")
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
	cfg.Logger = log
	cfg.ExecSource = *execSource
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
		fail(err, "check that the state folder and the socket's folder are writable")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := a.Run(ctx); err != nil {
		fail(err, "see the messages above")
	}
}

func fail(err error, hint string) {
	fmt.Fprintf(os.Stderr, "cloudprotectd: error: %v\ncloudprotectd: hint: %s\n", err, hint)
	os.Exit(1)
}
