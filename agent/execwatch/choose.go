package execwatch

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// ErrUnavailable means a source cannot run on this kernel or with these
// privileges.
var ErrUnavailable = errors.New("exec source unavailable")

// candidate is one source in order of preference.
type candidate struct {
	name      string
	available func() error
	build     func(Options) Source
}

// candidates lists the sources from the best to the last resort.
var candidates = []candidate{
	{"fanotify", fanotifyAvailable, func(o Options) Source { return NewFanotify(o) }},
	{"fanotify-unprivileged", unprivilegedAvailable, func(o Options) Source { return NewFanotifyUnprivileged(o) }},
	{"proc-connector", procConnectorAvailable, func(o Options) Source { return NewProcConnector(o) }},
	{"proc-poll", procPollAvailable, func(o Options) Source { return NewProcPoll(o) }},
}

// Chain returns constructors of the sources to try, from the best to the
// last resort, or of the one named prefer alone. A collector serves the
// first; when its Serve fails before Ready (it cannot run here) it moves
// on to the next at once, and when it fails later, the next start does.
func Chain(prefer string) ([]func(Options) Source, error) {
	var out []func(Options) Source
	for _, c := range candidates {
		if prefer == "" || c.name == prefer {
			out = append(out, c.build)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("choose exec source: unknown source %q (known: %v)", prefer, Names())
	}
	return out, nil
}

// Names lists every source name, from the best to the last resort.
func Names() []string {
	out := make([]string, len(candidates))
	for i, c := range candidates {
		out[i] = c.name
	}
	return out
}

// Available lists the sources that can run here, best first. Each check
// opens and closes a kernel object; nothing stays open.
func Available() []string {
	var out []string
	for _, c := range candidates {
		if c.available() == nil {
			out = append(out, c.name)
		}
	}
	return out
}

// Choose returns the best source that can run here, or the one named by
// opts.Prefer. The error wraps ErrUnavailable when nothing (or not the
// preferred source) can run.
func Choose(opts Options) (Source, error) {
	log := orDiscard(opts.Logger)
	for _, c := range candidates {
		if opts.Prefer != "" && c.name != opts.Prefer {
			continue
		}
		if err := c.available(); err != nil {
			if opts.Prefer != "" {
				return nil, fmt.Errorf("choose exec source %q: %w: %w", c.name, ErrUnavailable, err)
			}
			log.Debug("exec source unavailable", "source", c.name, "err", err)
			continue
		}
		return c.build(opts), nil
	}
	if opts.Prefer != "" {
		return nil, fmt.Errorf("choose exec source: unknown source %q (known: %v)", opts.Prefer, Names())
	}
	return nil, fmt.Errorf("choose exec source: %w", ErrUnavailable)
}

func fanotifyAvailable() error {
	fd, err := unix.FanotifyInit(fanInitFlags, fanFileFlags)
	if err != nil {
		return fmt.Errorf("init fanotify: %w", err)
	}
	unix.Close(fd)
	return nil
}

func unprivilegedAvailable() error {
	fd, err := unix.FanotifyInit(unprivInitFlags, fanFileFlags)
	if err != nil {
		return fmt.Errorf("init fanotify: %w", err)
	}
	unix.Close(fd)
	return nil
}

func procConnectorAvailable() error {
	// Binding to the process events group fails without CAP_NET_ADMIN
	// before Linux 6.6.
	fd, err := openProcConnector()
	if err != nil {
		return err
	}
	unix.Close(fd)
	return nil
}

func procPollAvailable() error {
	_, err := os.Stat("/proc/self/stat")
	return err
}
