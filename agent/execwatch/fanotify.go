package execwatch

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// errNoMarks means no filesystem or directory could be watched.
var errNoMarks = errors.New("nothing could be watched")

const (
	fanMetaLen = 24 // sizeof(struct fanotify_event_metadata)

	fanInitFlags = unix.FAN_CLASS_NOTIF | unix.FAN_CLOEXEC | unix.FAN_NONBLOCK | unix.FAN_UNLIMITED_QUEUE
	fanFileFlags = unix.O_RDONLY | unix.O_LARGEFILE | unix.O_CLOEXEC

	mountinfoPath = "/proc/self/mountinfo"
)

// Fanotify watches every exec on every local filesystem with fanotify
// FAN_OPEN_EXEC filesystem marks. It needs CAP_SYS_ADMIN. Each event
// carries a descriptor of the exact file that was executed; the dynamic
// loader and the interpreter of a "#!" script are reported as executions
// too, each with the PID of the process that executed it.
//
// The kernel queue is unlimited, so the kernel drops nothing; the source
// reads in batches and, when the consumer falls behind, holds at most
// MaxPending events before it drops (and counts) the rest.
type Fanotify struct {
	log        *slog.Logger
	window     time.Duration
	maxPending int
	mountinfo  string

	serving atomic.Bool
	c       counters

	ready     chan struct{} // closed once the first Serve has set its marks
	readyOnce sync.Once
}

// NewFanotify returns the fanotify source; Serve reports whether the
// kernel and the privileges allow it.
func NewFanotify(opts Options) *Fanotify {
	return &Fanotify{
		log:        orDiscard(opts.Logger).With("source", "fanotify"),
		window:     opts.batchWindow(),
		maxPending: opts.maxPending(),
		mountinfo:  mountinfoPath,
		ready:      make(chan struct{}),
	}
}

// Ready implements Readier: the channel is closed once every filesystem
// is marked, so every exec from then on is seen.
func (s *Fanotify) Ready() <-chan struct{} { return s.ready }

// Name implements Source.
func (s *Fanotify) Name() string { return "fanotify" }

// Limited implements Source: fanotify sees every exec.
func (s *Fanotify) Limited() (bool, string) { return false, "" }

// Stats implements Source.
func (s *Fanotify) Stats() Stats { return s.c.stats() }

// Serve implements Source.
func (s *Fanotify) Serve(ctx context.Context, out chan<- []Event) error {
	if !s.serving.CompareAndSwap(false, true) {
		return errBusy
	}
	defer s.serving.Store(false)

	fd, err := unix.FanotifyInit(fanInitFlags, fanFileFlags)
	if err != nil {
		return fmt.Errorf("init fanotify: %w", err)
	}
	defer unix.Close(fd)
	mfd, err := unix.Open(s.mountinfo, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open mountinfo: %w", err)
	}
	defer unix.Close(mfd)
	w, err := newWaker(ctx)
	if err != nil {
		return err
	}
	defer w.close()

	marked := make(map[string]string)
	if s.mark(fd, marked) == 0 {
		return fmt.Errorf("mark filesystems: %w", errNoMarks)
	}
	s.log.Info("watching executions", "filesystems", len(marked))
	s.readyOnce.Do(func() { close(s.ready) })

	self := os.Getpid()
	return serveFanotify(ctx, w, out, fanLoop{
		fd:      fd,
		mountFD: mfd,
		onMounts: func() {
			n := s.mark(fd, marked)
			s.log.Debug("mounts changed", "filesystems", n)
		},
		parse: func(b []byte, now time.Time, d *deliverer) {
			parseFanotify(b, self, now, d, s.log)
		},
		window:     s.window,
		maxPending: s.maxPending,
		c:          &s.c,
		log:        s.log,
	})
}

// fanLoop is what the read loop of a fanotify group needs.
type fanLoop struct {
	fd         int
	mountFD    int    // -1: no mount watching
	onMounts   func() // called when the mount table changed
	parse      func(b []byte, now time.Time, d *deliverer)
	window     time.Duration
	maxPending int
	c          *counters
	log        *slog.Logger
}

// serveFanotify waits for events, lets them gather for the batch window,
// reads them all and hands them over, until the waker fires.
func serveFanotify(ctx context.Context, w *waker, out chan<- []Event, l fanLoop) error {
	d := &deliverer{out: out, max: l.maxPending, c: l.c, log: l.log}
	defer d.discard()
	fds := []unix.PollFd{
		{Fd: int32(w.fd), Events: unix.POLLIN},
		{Fd: int32(l.fd), Events: unix.POLLIN},
	}
	if l.mountFD >= 0 {
		fds = append(fds, unix.PollFd{Fd: int32(l.mountFD), Events: unix.POLLPRI})
	}
	buf := make([]byte, readBufSize)
	for {
		timeout := time.Duration(-1)
		if d.hasPending() {
			timeout = retryDelay(l.window)
		}
		if _, err := pollFor(fds, timeout); err != nil {
			return err
		}
		if fds[0].Revents != 0 {
			return ctx.Err()
		}
		if len(fds) > 2 && fds[2].Revents&(unix.POLLPRI|unix.POLLERR) != 0 {
			l.onMounts()
		}
		if fds[1].Revents != 0 {
			if cancelled, err := sleepUnlessCancelled(w, l.window); err != nil {
				return err
			} else if cancelled {
				return ctx.Err()
			}
			drainFanotify(l, buf, d)
		}
		d.flush()
	}
}

// retryDelay is how long a loop holding undelivered events waits before it
// offers them again.
func retryDelay(window time.Duration) time.Duration {
	return max(window, 10*time.Millisecond)
}

// mark adds a filesystem mark for every watchable filesystem in mountinfo
// not yet marked, and forgets filesystems that are gone. A failing mark is
// logged and retried at the next change. It returns how many filesystems
// are marked.
func (s *Fanotify) mark(fd int, marked map[string]string) int {
	data, err := os.ReadFile(s.mountinfo)
	if err != nil {
		s.log.Warn("cannot read mounts", "err", err)
		return len(marked)
	}
	present := make(map[string]bool)
	for _, m := range filesystemsToMark(parseMountinfo(data)) {
		present[m.dev] = true
		if _, ok := marked[m.dev]; ok {
			continue
		}
		err := unix.FanotifyMark(fd, unix.FAN_MARK_ADD|unix.FAN_MARK_FILESYSTEM, unix.FAN_OPEN_EXEC, unix.AT_FDCWD, m.point)
		if err != nil {
			s.log.Warn("cannot watch filesystem", "mount", m.point, "type", m.fstype, "err", err)
			continue
		}
		marked[m.dev] = m.point
		s.log.Debug("watching filesystem", "mount", m.point, "type", m.fstype, "dev", m.dev)
	}
	for dev := range marked {
		if !present[dev] {
			delete(marked, dev)
		}
	}
	return len(marked)
}

// drainFanotify reads the fanotify queue until it is empty.
func drainFanotify(l fanLoop, buf []byte, d *deliverer) {
	now := time.Now()
	for {
		n, err := unix.Read(l.fd, buf)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return
		case err != nil:
			// The kernel could not open the file (EMFILE, ENFILE, …) and
			// dropped that event.
			l.c.lost.Add(1)
			l.log.Warn("cannot read exec event", "err", err)
			return
		case n == 0:
			return
		}
		l.parse(buf[:n], now, d)
	}
}

// parseFanotify turns a buffer of fanotify events (each with a descriptor)
// into Events on d. Queue overflows count as lost; events of our own
// process are dropped.
func parseFanotify(b []byte, self int, now time.Time, d *deliverer, log *slog.Logger) {
	for len(b) >= fanMetaLen {
		evLen := binary.NativeEndian.Uint32(b[0:])
		vers := b[4]
		mask := binary.NativeEndian.Uint64(b[8:])
		fd := int(int32(binary.NativeEndian.Uint32(b[16:])))
		pid := int(int32(binary.NativeEndian.Uint32(b[20:])))
		if evLen < fanMetaLen || int(evLen) > len(b) {
			log.Warn("malformed exec event", "len", evLen)
			return
		}
		b = b[evLen:]
		switch {
		case vers != unix.FANOTIFY_METADATA_VERSION:
			if fd >= 0 {
				unix.Close(fd)
			}
			d.c.lost.Add(1)
			log.Warn("unknown exec event version", "version", vers)
		case mask&unix.FAN_Q_OVERFLOW != 0:
			d.c.lost.Add(1)
			log.Warn("kernel exec queue overflowed")
		case fd < 0:
			// Nothing to identify: not an event this source asked for.
		case pid == self:
			unix.Close(fd)
		default:
			path := fdPath(fd)
			d.add(Event{File: os.NewFile(uintptr(fd), path), Path: path, PID: pid, Time: now})
		}
	}
}

// fdPath is the path the kernel gives for an open descriptor, "" if none.
func fdPath(fd int) string {
	var buf [unix.PathMax]byte
	n, err := unix.Readlink("/proc/self/fd/"+strconv.Itoa(fd), buf[:])
	if err != nil {
		return ""
	}
	return string(buf[:n])
}
