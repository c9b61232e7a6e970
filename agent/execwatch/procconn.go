package execwatch

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Proc connector definitions (linux/connector.h, linux/cn_proc.h), which
// golang.org/x/sys does not provide.
const (
	cnIdxProc = 1
	cnValProc = 1

	procCnMcastListen = 1
	procCnMcastIgnore = 2

	procEventExec = 0x00000002
	procEventComm = 0x00000200

	nlmsgHdrLen = 16
	cnMsgLen    = 20
	// Offsets in a received datagram: nlmsghdr, cn_msg, proc_event.
	procWhatOff = nlmsgHdrLen + cnMsgLen // enum what
	procDataOff = procWhatOff + 16       // event_data, after cpu and timestamp
	procExecLen = procDataOff + 8        // exec: process_pid, process_tgid

	procConnRcvBuf = 8 << 20

	// recvBatch is how many datagrams one recvmmsg(2) reads.
	recvBatch = 64
	// procMsgMax is the size of one process event datagram, rounded up.
	procMsgMax = 128
)

// ErrSilent means the process events connector accepted the subscription
// but delivered nothing: the agent runs in a private PID, user or network
// namespace, where the kernel sends no process events.
var ErrSilent = errors.New("the process events connector delivers nothing here (private PID, user or network namespace)")

// verifyWithin is how long a new subscription has to deliver the event
// the agent provokes before the connector counts as silent.
const verifyWithin = time.Second

// connector is a subscribed, verified netlink socket of process events.
// One goroutine uses it.
type connector struct {
	fd   int
	msgs []unix.Mmsghdr
	iovs []unix.Iovec
	buf  []byte
}

// openProcConnector opens and binds the netlink socket.
func openProcConnector() (int, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_CONNECTOR)
	if err != nil {
		return -1, fmt.Errorf("open netlink connector: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: cnIdxProc}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("bind netlink connector: %w", err)
	}
	return fd, nil
}

// dialConnector opens the connector, subscribes to process events and
// proves that they arrive: it renames one of its own threads and waits
// for the kernel to report that. Exec events read meanwhile are handed
// to onExec. It fails with ErrSilent when nothing arrives.
func dialConnector(ctx context.Context, log *slog.Logger, onExec func(tgid int32)) (*connector, error) {
	fd, err := openProcConnector()
	if err != nil {
		return nil, err
	}
	c := &connector{fd: fd}
	ok := false
	defer func() {
		if !ok {
			c.close()
		}
	}()
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, procConnRcvBuf); err != nil {
		// Without CAP_NET_ADMIN the size is capped by net.core.rmem_max.
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, procConnRcvBuf); err != nil {
			log.Warn("cannot enlarge receive buffer", "err", err)
		}
	}
	// Exec and comm events while the subscription is proved, exec events
	// only afterwards.
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, whatFilter(procEventExec, procEventComm)); err != nil {
		log.Warn("cannot install the process events filter; filtering in the agent", "err", err)
	}
	if err := unix.Sendto(fd, subscribeMessage(procCnMcastListen), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("subscribe to process events: %w", err)
	}
	c.msgs = make([]unix.Mmsghdr, recvBatch)
	c.iovs = make([]unix.Iovec, recvBatch)
	c.buf = make([]byte, recvBatch*procMsgMax)
	for i := range c.msgs {
		c.iovs[i].Base = &c.buf[i*procMsgMax]
		c.iovs[i].SetLen(procMsgMax)
		c.msgs[i].Hdr.Iov = &c.iovs[i]
		c.msgs[i].Hdr.SetIovlen(1)
	}
	if err := c.prove(ctx, onExec); err != nil {
		return nil, err
	}
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, whatFilter(procEventExec)); err != nil {
		log.Warn("cannot install the exec-only filter; filtering in the agent", "err", err)
	}
	ok = true
	return c, nil
}

// prove renames a thread of this process and waits for the comm event.
func (c *connector) prove(ctx context.Context, onExec func(int32)) error {
	tid, err := renameThread()
	if err != nil {
		return fmt.Errorf("prove process events: %w", err)
	}
	fds := []unix.PollFd{{Fd: int32(c.fd), Events: unix.POLLIN}}
	deadline := time.Now().Add(verifyWithin)
	for {
		left := time.Until(deadline)
		if left <= 0 || ctx.Err() != nil {
			return fmt.Errorf("subscribe to process events: %w", ErrSilent)
		}
		if _, err := pollFor(fds, min(left, 50*time.Millisecond)); err != nil {
			return err
		}
		found := false
		_, err := c.read(func(what uint32, pid, tgid int32) {
			switch what {
			case procEventComm:
				found = found || pid == tid
			case procEventExec:
				onExec(tgid)
			}
		})
		if err != nil && !errors.Is(err, unix.ENOBUFS) {
			return fmt.Errorf("read process events: %w", err)
		}
		if found {
			return nil
		}
	}
}

// renameThread sets the name of the calling OS thread to itself, which
// makes the kernel send a comm event, and returns the thread's ID.
func renameThread() (int32, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var name [16]byte
	if err := unix.Prctl(unix.PR_GET_NAME, uintptr(unsafe.Pointer(&name[0])), 0, 0, 0); err != nil {
		return 0, fmt.Errorf("read thread name: %w", err)
	}
	if err := unix.Prctl(unix.PR_SET_NAME, uintptr(unsafe.Pointer(&name[0])), 0, 0, 0); err != nil {
		return 0, fmt.Errorf("set thread name: %w", err)
	}
	return int32(unix.Gettid()), nil
}

// read reads every datagram queued, up to a bounded number of rounds,
// and calls fn for each process event. It returns the events seen, and
// unix.ENOBUFS (after reading on) when the kernel dropped some.
func (c *connector) read(fn func(what uint32, pid, tgid int32)) (int, error) {
	n := 0
	var lost error
	for round := 0; round < 1024; round++ {
		got, err := c.recvmmsg()
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return n, lost
		case err == unix.ENOBUFS:
			lost = unix.ENOBUFS
			continue
		case err != nil:
			return n, err
		}
		for i := range got {
			msg := c.buf[i*procMsgMax : i*procMsgMax+min(int(c.msgs[i].Len), procMsgMax)]
			n += parseProcEvents(msg, fn)
		}
		if got < len(c.msgs) {
			return n, lost
		}
	}
	return n, lost
}

// recvmmsg reads up to len(c.msgs) datagrams without blocking.
func (c *connector) recvmmsg() (int, error) {
	r, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, uintptr(c.fd), uintptr(unsafe.Pointer(&c.msgs[0])),
		uintptr(len(c.msgs)), unix.MSG_DONTWAIT, 0, 0)
	if errno != 0 {
		return 0, errno
	}
	return int(r), nil
}

func (c *connector) close() {
	if c.fd < 0 {
		return
	}
	unix.Sendto(c.fd, subscribeMessage(procCnMcastIgnore), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
	unix.Close(c.fd)
	c.fd = -1
}

// parseProcEvents calls fn for each process event of one datagram and
// returns how many there were. Datagrams not from the kernel's process
// connector are ignored: only the kernel can send to the multicast group.
func parseProcEvents(b []byte, fn func(what uint32, pid, tgid int32)) int {
	n := 0
	for len(b) >= nlmsgHdrLen {
		msgLen := int(binary.NativeEndian.Uint32(b[0:]))
		if msgLen < nlmsgHdrLen || msgLen > len(b) {
			break
		}
		msg := b[:msgLen]
		b = b[min(len(b), (msgLen+3)&^3):]
		if len(msg) < procExecLen {
			continue
		}
		if binary.NativeEndian.Uint32(msg[nlmsgHdrLen:]) != cnIdxProc || binary.NativeEndian.Uint32(msg[nlmsgHdrLen+4:]) != cnValProc {
			continue
		}
		what := binary.NativeEndian.Uint32(msg[procWhatOff:])
		pid := int32(binary.NativeEndian.Uint32(msg[procDataOff:]))
		tgid := int32(binary.NativeEndian.Uint32(msg[procDataOff+4:]))
		fn(what, pid, tgid)
		n++
	}
	return n
}

// ProcConnector learns about execs from the kernel's process events
// connector (netlink). Non-root use needs Linux 6.6 or later, and the
// kernel sends nothing to a listener in a private PID, user or network
// namespace: Serve proves the subscription delivers before it is Ready,
// and fails with ErrSilent otherwise. The kernel gives only the process
// ID; the executed file is opened through /proc/PID/exe when the process
// still exists, which short-lived programs often do not: those events are
// counted as lost. When the socket buffer overflows the kernel reports
// ENOBUFS without a count; each counts one.
type ProcConnector struct {
	log        *slog.Logger
	window     time.Duration
	maxPending int

	serving atomic.Bool
	c       counters
	ready   chan struct{}
	once    sync.Once // closes ready
}

// NewProcConnector returns the proc connector source. Unless
// opts.BatchWindow is positive it reads as soon as events arrive, because
// every millisecond of waiting loses the path of more short-lived programs.
func NewProcConnector(opts Options) *ProcConnector {
	return &ProcConnector{
		log:        orDiscard(opts.Logger).With("source", "proc-connector"),
		window:     max(opts.BatchWindow, 0),
		maxPending: opts.maxPending(),
		ready:      make(chan struct{}),
	}
}

// Name implements Source.
func (s *ProcConnector) Name() string { return "proc-connector" }

// Limited implements Source.
func (s *ProcConnector) Limited() (bool, string) {
	return true, "the kernel reports only process IDs, so programs that exit at once may be missed"
}

// Stats implements Source.
func (s *ProcConnector) Stats() Stats { return s.c.stats() }

// Ready implements Source: closed once the subscription delivered.
func (s *ProcConnector) Ready() <-chan struct{} { return s.ready }

// Serve implements Source.
func (s *ProcConnector) Serve(ctx context.Context, out chan<- []Event) error {
	if !s.serving.CompareAndSwap(false, true) {
		return errBusy
	}
	defer s.serving.Store(false)

	d := &deliverer{out: out, max: s.maxPending, c: &s.c, log: s.log}
	self := int32(os.Getpid())
	now := time.Now()
	onExec := func(tgid int32) {
		if tgid == self {
			return
		}
		ev, ok := procExe(tgid, now)
		if !ok {
			s.c.lost.Add(1)
			return
		}
		d.add(ev)
	}
	conn, err := dialConnector(ctx, s.log, onExec)
	if err != nil {
		return err
	}
	defer conn.close()
	w, err := newWaker(ctx)
	if err != nil {
		return err
	}
	defer w.close()
	s.once.Do(func() { close(s.ready) })
	s.log.Info("watching executions")

	fds := []unix.PollFd{
		{Fd: int32(w.fd), Events: unix.POLLIN},
		{Fd: int32(conn.fd), Events: unix.POLLIN},
	}
	fn := func(what uint32, _, tgid int32) {
		if what == procEventExec {
			onExec(tgid)
		}
	}
	for {
		d.flush()
		timeout := time.Duration(-1)
		if d.hasPending() {
			timeout = retryDelay(s.window)
		}
		if _, err := pollFor(fds, timeout); err != nil {
			d.discard()
			return err
		}
		cancelled := fds[0].Revents != 0
		if !cancelled && fds[1].Revents != 0 {
			cancelled = sleepCtx(ctx, s.window)
		}
		now = time.Now()
		if _, err := conn.read(fn); err != nil {
			if !errors.Is(err, unix.ENOBUFS) {
				d.discard()
				return fmt.Errorf("read process events: %w", err)
			}
			s.c.lost.Add(1)
			s.log.Warn("process events lost: receive buffer overflowed")
		}
		if cancelled {
			d.deliver()
			return ctx.Err()
		}
	}
}

// procExe opens the file a process executes, through /proc/PID/exe. It
// reports false when the process is gone or not ours to inspect.
func procExe(pid int32, now time.Time) (Event, bool) {
	link := "/proc/" + strconv.Itoa(int(pid)) + "/exe"
	path, err := os.Readlink(link)
	if err != nil {
		return Event{}, false
	}
	ev := Event{FD: -1, Path: path, PID: pid, UID: UIDUnknown, Time: now, Kind: KindExec}
	if fd, err := unix.Open(link, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0); err == nil {
		ev.FD = fd
	}
	return ev, true
}

// subscribeMessage builds the netlink message that starts or stops the
// process events. It carries the operation alone, which every kernel
// accepts; newer kernels also take a per-listener event type, but its size
// has changed across versions, so a socket filter does that job instead.
func subscribeMessage(op uint32) []byte {
	const dataLen = 4
	total := nlmsgHdrLen + cnMsgLen + dataLen
	b := make([]byte, total)
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], uint32(total))
	ne.PutUint16(b[4:], unix.NLMSG_DONE)
	cn := b[nlmsgHdrLen:]
	ne.PutUint32(cn[0:], cnIdxProc)
	ne.PutUint32(cn[4:], cnValProc)
	ne.PutUint16(cn[16:], dataLen)
	ne.PutUint32(cn[cnMsgLen:], op)
	return b
}

// whatFilter is a socket filter that keeps the process events of the
// given types only, so other events never take room in the receive
// buffer.
func whatFilter(whats ...uint32) *unix.SockFprog {
	prog := []unix.SockFilter{{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: procWhatOff}}
	for i, w := range whats {
		var b [4]byte
		binary.NativeEndian.PutUint32(b[:], w)
		// BPF loads words in network byte order. On a match, jump to the
		// accepting return after the remaining comparisons.
		prog = append(prog, unix.SockFilter{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K,
			Jt: uint8(len(whats) - i), Jf: 0, K: binary.BigEndian.Uint32(b[:])})
	}
	prog = append(prog,
		unix.SockFilter{Code: unix.BPF_RET | unix.BPF_K, K: 0},
		unix.SockFilter{Code: unix.BPF_RET | unix.BPF_K, K: 0xffffffff},
	)
	return &unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
}
