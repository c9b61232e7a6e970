// Package execwatch reports the programs executed on the machine, and the
// executable files that appear in download folders, through one interface
// over several kernel mechanisms: fanotify (root, with the process events
// connector beside it for what fanotify cannot see), unprivileged
// fanotify, the netlink proc connector and /proc polling as the last
// resort.
package execwatch

import (
	"context"
	"time"

	"golang.org/x/sys/unix"
)

// Kind says what an Event reports.
type Kind uint8

const (
	// KindExec is a file that was executed: FD or Path names it. The dynamic
	// loader and the interpreter of a "#!" script count as executed too.
	KindExec Kind = iota
	// KindLoaded is an executable file that appeared in a watched folder: seen,
	// not run.
	KindLoaded
	// KindProcess says that process PID executed a program, without saying
	// which (the proc connector beside fanotify). At the next KindCheckpoint
	// the consumer checks whether an Exec of a program (not merely of its
	// dynamic loader) by that PID has arrived; if not, fanotify missed it,
	// and the consumer identifies it through /proc/PID/exe.
	KindProcess
	// KindCheckpoint says that every Exec the kernel reported before the
	// KindProcess events delivered so far has been delivered too (fanotify
	// reports an exec before the connector does).
	KindCheckpoint
)

// UIDUnknown is Event.UID when the user is not known.
const UIDUnknown = ^uint32(0)

// Event is one executed (or loaded) file. It is a small value with a raw
// descriptor, so a batch of events costs no allocation per event.
type Event struct {
	// FD is a descriptor of the exact file, owned by the consumer, who
	// must close it (Release); -1 when the source has none and the
	// consumer opens Path.
	FD int
	// Path is the file's path as the source saw it. Fanotify leaves it
	// empty: the consumer asks FDPath only when it needs the path (a file
	// it has not identified before).
	Path string
	// PID is the process that executed the file, 0 when unknown.
	PID int32
	// UID is the user the file belongs to for a KindLoaded event (the owner of
	// the watched folder's file), UIDUnknown otherwise: the consumer
	// learns who ran a program from /proc/PID.
	UID uint32
	// Time is when the event was read.
	Time time.Time
	Kind Kind
}

// Release closes the event's descriptor, if it has one.
func (e *Event) Release() {
	if e.FD >= 0 {
		unix.Close(e.FD)
		e.FD = -1
	}
}

// Stats counts what a source saw and what it lost.
type Stats struct {
	// Events counts the executed (or loaded) files delivered on the out
	// channel.
	Events uint64 `json:"events"`
	// Lost counts events the kernel or the source dropped (queue overflow,
	// ENOBUFS). Where the exact number is unknown, each loss counts one.
	Lost uint64 `json:"lost"`
}

// Source is one way of learning about executed programs.
//
// Serve sets the source up, closes Ready's channel once it sees every
// execution it can, and delivers events in batches on out until ctx is
// cancelled. An error before Ready means the source cannot run here; an
// error after it means it stopped working.
//
// While serving, Serve never blocks on out: when the consumer falls
// behind, it holds a bounded number of events (Options.MaxPending) and
// then stops reading the kernel (fanotify's unlimited queue keeps the
// rest) or drops and counts what it cannot keep. When ctx is cancelled,
// Serve reads what the kernel has already queued, delivers it and what
// it holds, blocking on out (the consumer reads out until every source
// returned), releases every kernel resource and returns ctx.Err(). So a
// stop loses nothing the kernel reported; a consumer that must discard
// (consent withdrawn) releases what it receives.
//
// The consumer owns every delivered descriptor. A source may be served
// again after Serve returns; calling Serve while it is serving is an
// error. Stats accumulate over every run.
type Source interface {
	// Name is what status reports: "fanotify", "fanotify-unprivileged",
	// "proc-connector", "proc-poll" or "loaded".
	Name() string
	// Limited reports whether the source misses executions, and why in
	// words a person understands. It may change once Ready is closed.
	Limited() (limited bool, why string)
	Serve(ctx context.Context, out chan<- []Event) error
	// Ready's channel is closed once Serve sees every execution it can
	// (fanotify marks each filesystem first).
	Ready() <-chan struct{}
	Stats() Stats
}
