package execwatch

import (
	"log/slog"
	"time"
)

// Options configures the exec sources. The zero value is usable.
type Options struct {
	// Logger receives warnings (failed marks, losses); nil discards.
	Logger *slog.Logger
	// Prefer forces Choose to pick the source with this name (see
	// Source.Name), or fail when it is not available. Empty picks the best.
	Prefer string
	// BatchWindow is the longest a kernel source waits after a wake-up
	// before reading, so one wake-up serves many events. Zero means
	// DefaultBatchWindow; negative means no wait.
	BatchWindow time.Duration
	// MaxPending bounds the events held while the consumer is not taking
	// them; zero means DefaultMaxPending.
	MaxPending int
	// NoConnector keeps the fanotify source from subscribing to the
	// process events connector beside it (tests, measurements).
	NoConnector bool
	// Home is the home directory of the person whose ~/.local/bin the
	// unprivileged fanotify source watches; empty means $HOME.
	Home string
	// Dirs replaces the directories the unprivileged fanotify source
	// watches (by default $PATH, ~/.local/bin and /opt/*/bin).
	Dirs []string
	// PollInterval is the period of the /proc polling source; zero means
	// DefaultPollInterval.
	PollInterval time.Duration
}

func (o Options) batchWindow() time.Duration {
	switch {
	case o.BatchWindow == 0:
		return DefaultBatchWindow
	case o.BatchWindow < 0:
		return 0
	}
	return o.BatchWindow
}

func (o Options) maxPending() int {
	if o.MaxPending <= 0 {
		return DefaultMaxPending
	}
	return o.MaxPending
}
