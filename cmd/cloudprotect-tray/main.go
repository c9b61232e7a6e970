// Command cloudprotect-tray is cloudprotect's status icon for the desktop
// panel: it shows cloud protection status, lets the person participate in
// the Security Network or leave it, and starts at login. It is a thin client
// of the agent's local API; package tray does the work.
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

	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/tray"
)

func main() {
	socket := flag.String("socket", localapi.DefaultSocket(), "the agent's local API socket")
	debug := flag.Bool("debug", false, "log debug messages")
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: cloudprotect-tray [flags]\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() > 0 {
		fail(fmt.Errorf("unexpected argument %q", flag.Arg(0)), "cloudprotect-tray takes only flags; see cloudprotect-tray --help")
	}
	level := slog.LevelInfo
	if *debug {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	slog.SetDefault(log) // the systray library logs through the log package

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := tray.Run(ctx, tray.Options{Socket: *socket, Logger: log})
	var se *tray.StartError
	switch {
	case errors.As(err, &se):
		fail(se.Err, se.Hint)
	case err != nil:
		fail(err, "")
	}
}

func fail(err error, hint string) {
	fmt.Fprintf(os.Stderr, "cloudprotect-tray: error: %v\n", err)
	if hint != "" {
		fmt.Fprintf(os.Stderr, "cloudprotect-tray: hint: %s\n", hint)
	}
	os.Exit(1)
}
