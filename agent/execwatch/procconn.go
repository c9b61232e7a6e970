package execwatch

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"sync/atomic"
	"time"

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

	nlmsgHdrLen = 16
	cnMsgLen    = 20
	// Offsets in a received datagram: nlmsghdr, cn_msg, proc_event.
	procWhatOff = nlmsgHdrLen + cnMsgLen // enum what
	procDataOff = procWhatOff + 16       // event_data, after cpu and timestamp
	procExecLen = procDataOff + 8        // exec: process_pid, process_tgid

	procConnRcvBuf = 8 << 20
)

// ProcConnector learns about execs from the kernel's process events
// connector (netlink). Non-root use needs Linux 6.6 or later. The kernel
// gives only the process ID; the executed file is opened through
// /proc/PID/exe when the process still exists, which short-lived programs
// often do not: those events are counted as lost. When the socket buffer
// overflows the kernel reports ENOBUFS without a count; each counts one.
type ProcConnector struct {
	log        *slog.Logger
	window     time.Duration
	maxPending int

	serving atomic.Bool
	c       counters
}

// NewProcConnector returns the proc connector source. Unless
// opts.BatchWindow is positive it reads as soon as events arrive, because
// every millisecond of waiting loses the path of more short-lived programs.
func NewProcConnector(opts Options) *ProcConnector {
	return &ProcConnector{
		log:        orDiscard(opts.Logger).With("source", "proc-connector"),
		window:     max(opts.BatchWindow, 0),
		maxPending: opts.maxPending(),
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

// Serve implements Source.
func (s *ProcConnector) Serve(ctx context.Context, out chan<- []Event) error {
	if !s.serving.CompareAndSwap(false, true) {
		return errBusy
	}
	defer s.serving.Store(false)

	fd, err := openProcConnector()
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, procConnRcvBuf); err != nil {
		// Without CAP_NET_ADMIN the size is capped by net.core.rmem_max.
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, procConnRcvBuf); err != nil {
			s.log.Warn("cannot enlarge receive buffer", "err", err)
		}
	}
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, execOnlyFilter()); err != nil {
		s.log.Warn("cannot install exec-only filter; filtering in the agent", "err", err)
	}
	w, err := newWaker(ctx)
	if err != nil {
		return err
	}
	defer w.close()
	if err := unix.Sendto(fd, subscribeMessage(procCnMcastListen), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("subscribe to process events: %w", err)
	}
	defer unix.Sendto(fd, subscribeMessage(procCnMcastIgnore), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
	s.log.Info("watching executions")

	d := &deliverer{out: out, max: s.maxPending, c: &s.c, log: s.log}
	defer d.discard()
	fds := []unix.PollFd{
		{Fd: int32(w.fd), Events: unix.POLLIN},
		{Fd: int32(fd), Events: unix.POLLIN},
	}
	buf := make([]byte, readBufSize)
	self := os.Getpid()
	for {
		timeout := time.Duration(-1)
		if d.hasPending() {
			timeout = retryDelay(s.window)
		}
		if _, err := pollFor(fds, timeout); err != nil {
			return err
		}
		if fds[0].Revents != 0 {
			return ctx.Err()
		}
		if fds[1].Revents != 0 {
			if cancelled, err := sleepUnlessCancelled(w, s.window); err != nil {
				return err
			} else if cancelled {
				return ctx.Err()
			}
			s.drain(fd, buf, self, d)
		}
		d.flush()
	}
}

func (s *ProcConnector) drain(fd int, buf []byte, self int, d *deliverer) {
	for {
		n, from, err := unix.Recvfrom(fd, buf, 0)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return
		case err == unix.ENOBUFS:
			s.c.lost.Add(1)
			s.log.Warn("process events lost: receive buffer overflowed")
			continue
		case err != nil:
			s.log.Warn("cannot read process events", "err", err)
			return
		}
		if sa, ok := from.(*unix.SockaddrNetlink); !ok || sa.Pid != 0 {
			continue // not from the kernel
		}
		now := time.Now()
		for _, pid := range parseProcEvents(buf[:n]) {
			if pid == self {
				continue
			}
			ev, ok := procExe(pid, now)
			if !ok {
				s.c.lost.Add(1)
				continue
			}
			d.add(ev)
		}
	}
}

// parseProcEvents returns the process IDs of the exec events in one
// datagram.
func parseProcEvents(b []byte) []int {
	var pids []int
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
		if binary.NativeEndian.Uint32(msg[procWhatOff:]) != procEventExec {
			continue
		}
		tgid := int(binary.NativeEndian.Uint32(msg[procDataOff+4:]))
		pids = append(pids, tgid)
	}
	return pids
}

// procExe opens the file a process executes, through /proc/PID/exe. It
// reports false when the process is gone or not ours to inspect.
func procExe(pid int, now time.Time) (Event, bool) {
	link := "/proc/" + strconv.Itoa(pid) + "/exe"
	path, err := os.Readlink(link)
	if err != nil {
		return Event{}, false
	}
	ev := Event{Path: path, PID: pid, Time: now}
	if fd, err := unix.Open(link, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0); err == nil {
		ev.File = os.NewFile(uintptr(fd), path)
	}
	return ev, true
}

// subscribeMessage builds the netlink message that starts or stops the
// process events. It carries the operation alone, which every kernel
// accepts; newer kernels also take a per-listener event type, but its size
// has changed across versions, so the exec-only socket filter does that
// job instead.
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

// execOnlyFilter is a socket filter that keeps exec events only, so other
// process events never take room in the receive buffer.
func execOnlyFilter() *unix.SockFprog {
	var what [4]byte
	binary.NativeEndian.PutUint32(what[:], procEventExec)
	// BPF loads words in network byte order.
	k := binary.BigEndian.Uint32(what[:])
	prog := []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: procWhatOff},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 0, Jf: 1, K: k},
		{Code: unix.BPF_RET | unix.BPF_K, K: 0xffffffff},
		{Code: unix.BPF_RET | unix.BPF_K, K: 0},
	}
	return &unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
}
