package execwatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"sync/atomic"
	"syscall"
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
			d.c.events.Add(files(d.pending))
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
	d.c.events.Add(files(d.pending))
	d.pending = nil
}

// files counts the events of a batch that name a file (executed or
// loaded): what Stats.Events counts.
func files(b []Event) uint64 {
	var n uint64
	for i := range b {
		if b[i].Kind == KindExec || b[i].Kind == KindLoaded {
			n++
		}
	}
	return n
}

func (d *deliverer) hasPending() bool { return len(d.pending) > 0 }

// discard releases what was never delivered, counting it as lost.
func (d *deliverer) discard() {
	for i := range d.pending {
		d.pending[i].Release()
	}
	d.c.lost.Add(files(d.pending))
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

// readiness waits for kernel descriptors without a thread blocked in a
// system call: the descriptors sit in an epoll instance of their own,
// armed one-shot, and that instance sits in the Go runtime's poller. A
// descriptor that fired stays quiet until it is armed again, so events
// that arrive while a batch gathers or is read wake nobody.
type readiness struct {
	f    *os.File // the epoll instance
	rc   syscall.RawConn
	evs  []unix.EpollEvent
	arm  map[int32]uint32 // descriptor → events to arm it for
	off  map[int32]bool   // descriptors taken out by disarm
	stop func() bool
}

// newReadiness makes an epoll instance whose waits end when ctx is
// cancelled.
func newReadiness(ctx context.Context) (*readiness, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("create epoll: %w", err)
	}
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("create epoll: %w", err)
	}
	f := os.NewFile(uintptr(epfd), "epoll")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("create epoll: %w", err)
	}
	r := &readiness{f: f, rc: rc, evs: make([]unix.EpollEvent, 8), arm: make(map[int32]uint32), off: make(map[int32]bool)}
	r.stop = context.AfterFunc(ctx, func() { f.SetReadDeadline(time.Unix(1, 0)) })
	return r, nil
}

// add watches fd for events (EPOLLIN), armed.
func (r *readiness) add(fd int, events uint32) error {
	r.arm[int32(fd)] = events
	return r.ctl(unix.EPOLL_CTL_ADD, fd, events|unix.EPOLLONESHOT)
}

// rearm arms fd again after it fired or was disarmed.
func (r *readiness) rearm(fd int) error {
	if r.off[int32(fd)] {
		delete(r.off, int32(fd))
		return r.ctl(unix.EPOLL_CTL_ADD, fd, r.arm[int32(fd)]|unix.EPOLLONESHOT)
	}
	return r.ctl(unix.EPOLL_CTL_MOD, fd, r.arm[int32(fd)]|unix.EPOLLONESHOT)
}

// disarm keeps fd from waking anyone until it is armed again. It takes
// fd out of the epoll instance: a descriptor modified to wait for no
// event still wakes the instance for every event whose wake-up carries
// no event mask (fanotify's), since the kernel always adds EPOLLERR and
// EPOLLHUP; one that fired one-shot does not, but the others may not
// have fired.
func (r *readiness) disarm(fd int) error {
	if r.off[int32(fd)] {
		return nil
	}
	r.off[int32(fd)] = true
	return r.ctl(unix.EPOLL_CTL_DEL, fd, 0)
}

func (r *readiness) ctl(op, fd int, events uint32) error {
	var err error
	cerr := r.rc.Control(func(epfd uintptr) {
		ev := unix.EpollEvent{Events: events, Fd: int32(fd)}
		err = unix.EpollCtl(int(epfd), op, fd, &ev)
	})
	if err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("watch descriptor: %w", err)
	}
	return nil
}

// wait parks until an armed descriptor fires, ctx is cancelled, or
// timeout passes (negative: no timeout), and returns the descriptors that
// fired. It reports cancelled when ctx is done.
func (r *readiness) wait(ctx context.Context, timeout time.Duration) (fired []int32, cancelled bool, err error) {
	var deadline time.Time
	if timeout >= 0 {
		deadline = time.Now().Add(timeout)
	}
	r.f.SetReadDeadline(deadline)
	if ctx.Err() != nil {
		return nil, true, nil
	}
	n := 0
	var werr error
	rerr := r.rc.Read(func(epfd uintptr) bool {
		n, werr = unix.EpollWait(int(epfd), r.evs, 0)
		if werr == unix.EINTR {
			n, werr = 0, nil
		}
		return n > 0 || werr != nil
	})
	if ctx.Err() != nil {
		return nil, true, nil
	}
	if rerr != nil && !errors.Is(rerr, os.ErrDeadlineExceeded) {
		return nil, false, fmt.Errorf("wait for events: %w", rerr)
	}
	if werr != nil {
		return nil, false, fmt.Errorf("wait for events: %w", werr)
	}
	for _, ev := range r.evs[:n] {
		fired = append(fired, ev.Fd)
	}
	return fired, false, nil
}

// close releases the epoll instance.
func (r *readiness) close() {
	r.stop()
	r.f.Close()
}
