package execwatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Defaults shared by the kernel sources.
const (
	// DefaultBatchWindow is how long a source waits after a wake-up before
	// reading, so that one wake-up serves many events.
	DefaultBatchWindow = 50 * time.Millisecond
	// DefaultMaxPending bounds the events a source holds while the consumer
	// is not taking them. Each pending fanotify event holds a descriptor.
	DefaultMaxPending = 4096
	// readBufSize is the size of one read of a fanotify or netlink socket.
	readBufSize = 64 << 10
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

// sleepUnlessCancelled waits for d, or less if the waker fires. It reports
// whether the context was cancelled.
func sleepUnlessCancelled(w *waker, d time.Duration) (bool, error) {
	if d <= 0 {
		return false, nil
	}
	fds := []unix.PollFd{{Fd: int32(w.fd), Events: unix.POLLIN}}
	ready, err := pollFor(fds, d)
	return ready, err
}

// deliverer hands batches to the consumer without ever blocking the read
// loop. Events the consumer does not take wait in a bounded pending batch;
// beyond the bound they are dropped (their descriptors closed) and counted
// as lost.
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
		closeEvent(ev)
		d.c.lost.Add(1)
		d.dropped++
		return
	}
	d.pending = append(d.pending, ev)
}

// flush tries to hand the pending batch over; it never blocks.
func (d *deliverer) flush() {
	if len(d.pending) == 0 {
		return
	}
	select {
	case d.out <- d.pending:
		d.c.events.Add(uint64(len(d.pending)))
		d.pending = nil
	default:
	}
	if d.dropped > 0 {
		d.log.Warn("consumer too slow, events dropped", "dropped", d.dropped, "pending", len(d.pending))
		d.dropped = 0
	}
}

func (d *deliverer) hasPending() bool { return len(d.pending) > 0 }

// discard releases what was never delivered, counting it as lost.
func (d *deliverer) discard() {
	for _, ev := range d.pending {
		closeEvent(ev)
	}
	d.c.lost.Add(uint64(len(d.pending)))
	d.pending = nil
}

func closeEvent(ev Event) {
	if ev.File != nil {
		ev.File.Close()
	}
}

func orDiscard(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}
