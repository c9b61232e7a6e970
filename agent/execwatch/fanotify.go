package execwatch

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
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
// Fanotify cannot see a program executed from memory (memfd_create), nor
// one on a filesystem mounted in another mount namespace. So beside the
// fanotify group the source subscribes to the kernel's process events
// connector and reports every exec it announces as a KindProcess event: the
// consumer compares them with the fanotify events and identifies what
// fanotify missed through /proc/PID/exe, and may then mark that
// filesystem too (WatchFilesystemOf). Without the connector the source
// says it is limited.
//
// The kernel queue is unlimited, so the kernel drops nothing; the source
// reads in batches and, while the consumer falls behind, holds at most
// MaxPending events and leaves the rest in the kernel.
type Fanotify struct {
	log         *slog.Logger
	window      time.Duration
	maxPending  int
	mountinfo   string
	noConnector bool

	serving atomic.Bool
	c       counters
	ready   chan struct{}
	once    sync.Once // closes ready

	mu      sync.Mutex // protects fd and limited
	fd      int        // the fanotify group while serving, else -1
	limited string
}

// NewFanotify returns the fanotify source; Serve reports whether the
// kernel and the privileges allow it.
func NewFanotify(opts Options) *Fanotify {
	return &Fanotify{
		log:         orDiscard(opts.Logger).With("source", "fanotify"),
		window:      opts.batchWindow(),
		maxPending:  opts.maxPending(),
		mountinfo:   mountinfoPath,
		noConnector: opts.NoConnector,
		ready:       make(chan struct{}),
		fd:          -1,
	}
}

// Ready implements Source: the channel is closed once every filesystem
// is marked and the connector's subscription is proved (or found
// missing), so every exec from then on is seen or accounted for.
func (s *Fanotify) Ready() <-chan struct{} { return s.ready }

// Name implements Source.
func (s *Fanotify) Name() string { return "fanotify" }

// Limited implements Source: fanotify with the connector beside it sees
// every exec; without the connector, programs run from memory or from
// other mount namespaces' filesystems are missed.
func (s *Fanotify) Limited() (bool, string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.limited != "", s.limited
}

// Stats implements Source.
func (s *Fanotify) Stats() Stats { return s.c.stats() }

// WatchFilesystemOf marks the filesystem of the open file fd (one that
// fanotify missed, found through /proc/PID/exe), so its later executions
// are reported. It fails for filesystems that cannot be marked (the
// kernel's internal one behind memfd_create) and when not serving.
func (s *Fanotify) WatchFilesystemOf(fd int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fd < 0 {
		return errors.New("watch filesystem: source not serving")
	}
	if err := unix.FanotifyMark(s.fd, unix.FAN_MARK_ADD|unix.FAN_MARK_FILESYSTEM, unix.FAN_OPEN_EXEC, fd, ""); err != nil {
		return fmt.Errorf("watch filesystem: %w", err)
	}
	return nil
}

// IgnoreFile asks the kernel to report no more executions of the open
// file fd, until it is modified (the mark does not survive a write) or
// leaves the inode cache. The agent uses it for the dynamic loader, which
// runs beside every dynamically linked program: its executions are then
// counted from the programs that name it as their interpreter, at half
// the events.
func (s *Fanotify) IgnoreFile(fd int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fd < 0 {
		return errors.New("ignore file: source not serving")
	}
	err := unix.FanotifyMark(s.fd, unix.FAN_MARK_ADD|unix.FAN_MARK_IGNORE|unix.FAN_MARK_EVICTABLE, unix.FAN_OPEN_EXEC, fd, "")
	if errors.Is(err, unix.EINVAL) {
		// Before Linux 6.0: the older form of an ignore mask.
		err = unix.FanotifyMark(s.fd, unix.FAN_MARK_ADD|unix.FAN_MARK_IGNORED_MASK, unix.FAN_OPEN_EXEC, fd, "")
	}
	if err != nil {
		return fmt.Errorf("ignore file: %w", err)
	}
	return nil
}

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
	marked := make(map[string]string)
	if s.mark(fd, marked) == 0 {
		return fmt.Errorf("mark filesystems: %w", errNoMarks)
	}
	s.mu.Lock()
	s.fd = fd
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.fd = -1
		s.mu.Unlock()
	}()

	self := int32(os.Getpid())
	d := &deliverer{out: out, max: s.maxPending, c: &s.c, log: s.log}
	now := time.Now()
	var conn *connector
	if s.noConnector {
		s.setLimited("programs run from memory, or from filesystems mounted in other mount namespaces, are not seen (the process events connector is turned off)")
	} else {
		onExec := func(tgid int32) {
			if tgid != self {
				d.add(Event{FD: -1, PID: tgid, UID: UIDUnknown, Time: now, Kind: KindProcess})
			}
		}
		conn, err = dialConnector(ctx, s.log, onExec)
		if err != nil {
			s.log.Warn("executions fanotify cannot see will be missed", "err", err)
			s.setLimited(fmt.Sprintf("programs run from memory, or from filesystems mounted in other mount namespaces, are not seen (%v)", err))
		} else {
			defer conn.close()
			s.setLimited("")
		}
	}
	s.log.Info("watching executions", "filesystems", len(marked), "connector", conn != nil)
	s.once.Do(func() { close(s.ready) })

	// Mount changes: /proc/self/mountinfo reports them to poll(2) once
	// (polling consumes the change, so it cannot sit in the epoll
	// instance, which polls twice); a goroutine waits for them.
	mctx, stopMounts := context.WithCancel(ctx)
	defer stopMounts()
	w, err := newWaker(mctx)
	if err != nil {
		return err
	}
	defer w.close()
	mounts := make(chan struct{})
	go func() {
		defer close(mounts)
		s.watchMounts(w, mfd, fd, marked)
	}()
	defer func() {
		stopMounts()
		<-mounts
	}()
	rd, err := newReadiness(ctx)
	if err != nil {
		return err
	}
	defer rd.close()
	armedFDs := []int{fd}
	if conn != nil {
		armedFDs = append(armedFDs, conn.fd)
	}
	for _, x := range armedFDs {
		if err := rd.add(x, unix.EPOLLIN); err != nil {
			return err
		}
	}
	buf := make([]byte, readBufSize)
	win := adaptive{max: s.window}
	// read reads what the kernel reported and says how many events it
	// read.
	read := func() (int, error) {
		now = time.Now()
		got := 0
		if conn != nil {
			// The connector first: fanotify reports an exec when the file
			// is opened, before the connector does, so the fanotify event
			// of every KindProcess event read here is read just after.
			m, err := conn.read(func(what uint32, _, tgid int32) {
				if what == procEventExec {
					d.add(Event{FD: -1, PID: tgid, UID: UIDUnknown, Time: now, Kind: KindProcess})
				}
			})
			got += m
			if err != nil {
				if !errors.Is(err, unix.ENOBUFS) {
					return got, fmt.Errorf("read process events: %w", err)
				}
				s.c.lost.Add(1)
				s.log.Warn("process events lost: receive buffer overflowed")
			}
		}
		n, empty := readFanotify(fd, buf, self, now, d, &s.c, s.log)
		if n > 0 {
			win.last = now
		}
		if conn != nil && empty && d.room() > 0 {
			d.add(Event{FD: -1, Time: now, Kind: KindCheckpoint})
		}
		return got + n, nil
	}
	// drain delivers what the kernel reported up to now, waiting for the
	// consumer, at a stop.
	drain := func() error {
		deadline := time.Now().Add(drainLimit)
		for {
			d.deliver()
			if _, err := read(); err != nil {
				d.discard()
				return err
			}
			if !d.hasPending() || time.Now().After(deadline) {
				break
			}
		}
		d.deliver()
		return ctx.Err()
	}
	// fanArmed says whether fanotify's descriptor waits to fire: not while
	// the consumer is behind and the pending batch is full (the kernel
	// keeps the events meanwhile).
	fanArmed := true
	// steady says events kept coming at the longest window: the next
	// batch is then read when the window has passed, with no descriptor
	// armed, so that a batch costs one wake-up (the timer's) instead of
	// two (the descriptor's, then the timer's) and no epoll changes.
	steady := false
	for {
		d.flush()
		// events says the descriptors are out of the epoll instance for
		// a batch; w is the window it gathered for.
		events, cancelled, w := steady, false, win.max
		if steady {
			cancelled = sleepCtx(ctx, w)
		} else {
			if !fanArmed && d.room() > 0 {
				if err := rd.rearm(fd); err != nil {
					d.discard()
					return err
				}
				fanArmed = true
			}
			timeout := time.Duration(-1)
			if d.hasPending() {
				timeout = retryDelay(s.window)
			}
			fired, c, err := rd.wait(ctx, timeout)
			if err != nil {
				d.discard()
				return err
			}
			cancelled = c
			for _, f := range fired {
				events = events || int(f) == fd || (conn != nil && int(f) == conn.fd)
			}
			if events {
				// Nothing wakes anyone while the batch gathers and is
				// read: what fired is disarmed by the kernel, the rest
				// here.
				fanArmed = false
				for _, x := range armedFDs {
					if err := rd.disarm(x); err != nil {
						d.discard()
						return err
					}
				}
			}
			w = win.window(time.Now())
			if !cancelled && events {
				cancelled = sleepCtx(ctx, w)
			}
		}
		got, err := read()
		if err != nil {
			d.discard()
			return err
		}
		if cancelled {
			return drain()
		}
		// While the stream lasts at the longest window, the descriptors
		// stay out of the epoll instance.
		steady = events && got > 0 && w > 0 && w == win.max
		if steady {
			continue
		}
		// Armed again only now: what arrived while the batch gathered
		// was read above, without waking anyone. Fanotify's descriptor
		// is armed at the top of the loop, when the consumer has room.
		if events && conn != nil {
			if err := rd.rearm(conn.fd); err != nil {
				d.discard()
				return err
			}
		}
	}
}

// watchMounts marks the filesystems mounted later, until the waker
// fires.
func (s *Fanotify) watchMounts(w *waker, mfd, fd int, marked map[string]string) {
	fds := []unix.PollFd{
		{Fd: int32(w.fd), Events: unix.POLLIN},
		{Fd: int32(mfd), Events: unix.POLLPRI},
	}
	for {
		if _, err := pollFor(fds, -1); err != nil {
			s.log.Warn("cannot watch mounts", "err", err)
			return
		}
		if fds[0].Revents != 0 {
			return
		}
		if fds[1].Revents&(unix.POLLPRI|unix.POLLERR) != 0 {
			s.remark(fd, marked)
		}
	}
}

func (s *Fanotify) setLimited(why string) {
	s.mu.Lock()
	s.limited = why
	s.mu.Unlock()
}

func (s *Fanotify) remark(fd int, marked map[string]string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.mark(fd, marked)
	s.log.Debug("mounts changed", "filesystems", n)
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

// readFanotify reads the fanotify queue until it is empty or d is full,
// and returns the number of events read and whether the queue was found
// empty. Only as many events are read as d has room for: the rest stay
// in the kernel's queue.
func readFanotify(fd int, buf []byte, self int32, now time.Time, d *deliverer, c *counters, log *slog.Logger) (int, bool) {
	n := 0
	for {
		room := d.room()
		if room <= 0 {
			return n, false
		}
		m, err := unix.Read(fd, buf[:min(len(buf), room*fanMetaLen)])
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return n, true
		case err != nil:
			// The kernel could not open the file (EMFILE, ENFILE, …) and
			// dropped that event.
			c.lost.Add(1)
			log.Warn("cannot read exec event", "err", err)
			return n, false
		case m == 0:
			return n, true
		}
		n += parseFanotify(buf[:m], self, now, d, log)
	}
}

// parseFanotify turns a buffer of fanotify events (each with a descriptor)
// into Events on d and returns how many it read. Queue overflows count as
// lost; events of our own process are dropped.
func parseFanotify(b []byte, self int32, now time.Time, d *deliverer, log *slog.Logger) int {
	n := 0
	for len(b) >= fanMetaLen {
		evLen := binary.NativeEndian.Uint32(b[0:])
		vers := b[4]
		mask := binary.NativeEndian.Uint64(b[8:])
		fd := int(int32(binary.NativeEndian.Uint32(b[16:])))
		pid := int32(binary.NativeEndian.Uint32(b[20:]))
		if evLen < fanMetaLen || int(evLen) > len(b) {
			log.Warn("malformed exec event", "len", evLen)
			return n
		}
		b = b[evLen:]
		n++
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
			d.add(Event{FD: fd, PID: pid, UID: UIDUnknown, Time: now, Kind: KindExec})
		}
	}
	return n
}
