// Command cloudprotect-tray is cloudprotect's status icon for the desktop
// panel: it shows cloud protection status and recent detections, lets the
// person participate in the Security Network or leave it, and starts at
// login. It is a thin client of the agent's local API; package tray does
// the work.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/cmd/internal/version"
	"github.com/cloudprotect/cloudprotect/tray"
	"github.com/cloudprotect/cloudprotect/tray/i18n"
)

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

func usage(p *i18n.Printer, w io.Writer) {
	p.Fprintf(w, "usage: cloudprotect-tray [--socket PATH] [--debug]\n")
	p.Fprintf(w, "\nShows cloud protection in the desktop panel: its status, recent detections, and participating in the Security Network.\n\n")
	p.Fprintf(w, "  --socket PATH   the agent's socket (default: $CLOUDPROTECT_SOCKET, else the system agent's, else this user's)\n")
	p.Fprintf(w, "  --debug         log debug messages\n")
	p.Fprintf(w, "  --version       print the version\n")
}

func run(args []string, stdout, stderr io.Writer) int {
	p := i18n.FromEnv(os.Getenv)
	fail := func(err error, hint string) int {
		p.Fprintf(stderr, "cloudprotect-tray: error: %s\n", err.Error())
		if hint != "" {
			p.Fprintf(stderr, "cloudprotect-tray: hint: %s\n", hint)
		}
		return 1
	}
	if len(args) == 1 && args[0] == "help" {
		usage(p, stdout)
		return 0
	}
	if len(args) == 1 && args[0] == "version" {
		fmt.Fprintf(stdout, "cloudprotect-tray %s\n", version.String())
		return 0
	}
	fs := flag.NewFlagSet("cloudprotect-tray", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	socket := fs.String("socket", "", "")
	debug := fs.Bool("debug", false, "")
	showVersion := fs.Bool("version", false, "")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			usage(p, stdout)
			return 0
		}
		fail(err, "")
		p.Fprintf(stderr, "cloudprotect-tray: hint: %s\n", p.Sprintf("run `cloudprotect-tray --help` for its flags"))
		return 2
	}
	if *showVersion {
		fmt.Fprintf(stdout, "cloudprotect-tray %s\n", version.String())
		return 0
	}
	if fs.NArg() > 0 {
		p.Fprintf(stderr, "cloudprotect-tray: error: %s\n", p.Sprintf("unexpected argument %q", fs.Arg(0)))
		p.Fprintf(stderr, "cloudprotect-tray: hint: %s\n", p.Sprintf("run `cloudprotect-tray --help` for its flags"))
		return 2
	}
	given := *socket != ""
	if !given {
		*socket = localapi.DefaultSocket()
	}
	level := slog.LevelInfo
	if *debug {
		level = slog.LevelDebug
	}
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	// The systray library logs through the log package: its lines are
	// put in the tray's words and levels.
	log.SetFlags(0)
	log.SetOutput(tray.LibraryLog(logger))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := tray.Run(ctx, tray.Options{Socket: *socket, SocketGiven: given, Logger: logger, Printer: p})
	var se *tray.StartError
	var running *tray.AlreadyRunningError
	switch {
	case errors.As(err, &running):
		p.Fprintf(stderr, "cloudprotect-tray: already running in this session (process %d): its icon is in the panel\n", running.PID)
		return 0
	case errors.As(err, &se):
		return fail(se.Err, se.Hint)
	case err != nil:
		return fail(err, "")
	}
	return 0
}
