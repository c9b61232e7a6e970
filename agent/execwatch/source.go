// Package execwatch reports the programs executed on the machine, and the
// executable files that appear in download folders, through one interface
// over several kernel mechanisms: fanotify (root), unprivileged fanotify,
// the netlink proc connector and /proc polling as the last resort.
package execwatch

import (
	"context"
	"os"
	"time"
)

// Event is one executed (or loaded) file.
type Event struct {
	// File is an open descriptor of the exact file that was executed, when
	// the source has one (fanotify); the consumer must Close it. Nil
	// otherwise, and the consumer opens Path.
	File *os.File
	// Path is the file's path as the source saw it (may be empty when File
	// is set and the path could not be resolved).
	Path string
	// PID is the process that executed the file, 0 when unknown.
	PID int
	// Time is when the event was read.
	Time time.Time
	// Loaded marks a file that appeared in a watched folder (seen, not run).
	Loaded bool
}

// Stats counts what a source saw and what it lost.
type Stats struct {
	// Events counts events delivered on the out channel.
	Events uint64 `json:"events"`
	// Lost counts events the kernel or the source dropped (queue overflow,
	// ENOBUFS). Where the exact number is unknown, each loss counts one.
	Lost uint64 `json:"lost"`
}

// Source is one way of learning about executed programs. Serve delivers
// events in batches on out until ctx is cancelled, then releases every
// kernel resource it holds (no descriptor stays open) and returns ctx.Err().
//
// Serve never blocks on out: while the consumer is not taking batches, the
// source holds a bounded number of events (Options.MaxPending) and drops,
// closes and counts as lost the rest, so out should have room for a few
// dozen batches. Batches not delivered when Serve returns are released and
// counted as lost too. The consumer owns every delivered Event.File and must
// close it. A source may be served again after Serve returns (consent given
// again); calling Serve while it is serving is an error. Stats accumulate
// over every run.
type Source interface {
	// Name is what status reports: "fanotify", "fanotify-unprivileged",
	// "proc-connector" or "proc-poll".
	Name() string
	// Limited reports whether the source misses events by design, and why
	// in words a person understands.
	Limited() (limited bool, why string)
	Serve(ctx context.Context, out chan<- []Event) error
	Stats() Stats
}

// Readier is implemented by a source that needs a moment after Serve
// starts before it sees every exec (fanotify marks each filesystem
// first). Ready's channel is closed once it does.
type Readier interface {
	Ready() <-chan struct{}
}
