package execwatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Defaults shared by the kernel sources.
const (
	// DefaultBatchWindow is the longest a source waits after a wake-up
	// before reading, so that one wake-up serves many events. The window
	// adapts (see window): short after a quiet spell, so a lone program is
	// looked at while it still runs, this long under a steady stream.
	DefaultBatchWindow = 100 * time.Millisecond
	// minBatchWindow is the window after a quiet spell.
	minBatchWindow = 2 * time.Millisecond
	// quietSpell is how long without events makes the next window short.
	quietSpell = time.Second
	// DefaultMaxPending bounds the events a source holds while the consumer
	// is not taking them. Each pending fanotify event holds a descriptor.
	DefaultMaxPending = 4096
	// readBufSize is the size of one read of a fanotify or netlink socket.
	readBufSize = 64 << 10
	// drainLimit bounds the final read at a stop, so that a machine that
	// keeps executing programs cannot hold the stop forever.
	drainLimit = 2 * time.Second
)

var errBusy = errors.New("source is already serving")

// counters are the live numbers behind Stats.
type counters struct {
	events atomic.Uint64
	lost   atomic.Uint64
}

func (c *counters) stats() Stats {
	return Stats{Events: c.events.Load(), Lost: c.lost.Load()}
}

// waker turns the cancellation of a context into a readable eventfd, so a
// poll(2) loop waits on kernel descriptors and on cancellation at once.
type waker struct {
	fd    int
	stop  func() bool
	fired chan struct{}
}

func newWaker(ctx context.Context) (*waker, error) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("create eventfd: %w", err)
	}
	w := &waker{fd: fd, fired: make(chan struct{})}
	w.stop = context.AfterFunc(ctx, func() {
		defer close(w.fired)
		one := [8]byte{1}
		_, _ = unix.Write(fd, one[:])
	})
	return w, nil
}

// close releases the eventfd once the cancellation callback can no longer
// write to it.
func (w *waker) close() {
	if !w.stop() {
		<-w.fired
	}
	unix.Close(w.fd)
}

// pollFor waits on fds for at most timeout (negative: forever), retrying on
// EINTR. It reports whether any descriptor is ready.
func pollFor(fds []unix.PollFd, timeout time.Duration) (bool, error) {
	ms := -1
	if timeout >= 0 {
		ms = int((timeout + time.Millisecond - 1) / time.Millisecond)
	}
	for {
		for i := range fds {
			fds[i].Revents = 0
		}
		n, err := unix.Poll(fds, ms)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return false, fmt.Errorf("poll: %w", err)
		}
		return n > 0, nil
	}
}

// sleepCtx waits for d or until ctx is cancelled, on a runtime timer (no
// thread blocks in a system call). It reports whether ctx was cancelled.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() != nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return true
	case <-t.C:
		return false
	}
}

// adaptive is the batch window of a reading loop: the longest wait under
// a steady stream of events, a short one after a quiet spell.
type adaptive struct {
	max  time.Duration
	last time.Time // when events were last read
}

func (a *adaptive) window(now time.Time) time.Duration {
	if a.max <= 0 {
		return 0
	}
	if now.Sub(a.last) > quietSpell {
		return min(a.max, minBatchWindow)
	}
	return a.max
}

// deliverer hands batches to the consumer without ever blocking the read
// loop. Events the consumer does not take wait in a bounded pending batch;
// a loop that can leave events in the kernel stops reading when full
// (room reports it), the others drop beyond the bound, release the
// descriptors and count the events as lost.
type deliverer struct {
	out     chan<- []Event
	pending []Event
	max     int
	c       *counters
	log     *slog.Logger
	dropped uint64 // since the last warning
}

func (d *deliverer) add(ev Event) {
	if len(d.pending) >= d.max {
		ev.Release()
		d.c.lost.Add(1)
		d.dropped++
		return
	}
	d.pending = append(d.pending, ev)
}

// room is how many more events add keeps.
func (d *deliverer) room() int { return d.max - len(d.pending) }

// flush tries to hand the pending batch over; it never blocks.
func (d *deliverer) flush() {
	if len(d.pending) > 0 {
		select {
		case d.out <- d.pending:
			d.c.events.Add(uint64(len(d.pending)))
			d.pending = nil
		default:
		}
	}
	if d.dropped > 0 {
		d.log.Warn("consumer too slow, events dropped", "dropped", d.dropped, "pending", len(d.pending))
		d.dropped = 0
	}
}

// deliver hands the pending batch over, waiting for the consumer: only at
// a stop, when the consumer reads until every source has returned.
func (d *deliverer) deliver() {
	if len(d.pending) == 0 {
		return
	}
	d.out <- d.pending
	d.c.events.Add(uint64(len(d.pending)))
	d.pending = nil
}

func (d *deliverer) hasPending() bool { return len(d.pending) > 0 }

// discard releases what was never delivered, counting it as lost.
func (d *deliverer) discard() {
	for i := range d.pending {
		d.pending[i].Release()
	}
	d.c.lost.Add(uint64(len(d.pending)))
	d.pending = nil
}

// retryDelay is how long a loop holding undelivered events waits before it
// offers them again.
func retryDelay(window time.Duration) time.Duration {
	return max(window, 10*time.Millisecond)
}

// FDPath is the path the kernel gives for an open descriptor, "" if none.
// Fanotify events carry none: the consumer asks only for files it has not
// identified before.
func FDPath(fd int) string {
	var buf [unix.PathMax]byte
	n, err := unix.Readlink("/proc/self/fd/"+strconv.Itoa(fd), buf[:])
	if err != nil {
		return ""
	}
	return string(buf[:n])
}

func orDiscard(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}
