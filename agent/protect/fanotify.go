package protect

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cloudprotect/cloudprotect/agent/execwatch"
	"github.com/cloudprotect/cloudprotect/agent/identify"
)

const (
	fanMetaLen    = 24 // sizeof(struct fanotify_event_metadata)
	readBufSize   = 16 << 10
	mountinfoPath = "/proc/self/mountinfo"
)

// read answers the agent's own executions at once and hands every other
// event to the workers, until ctx is cancelled. When the workers are
// behind by Backlog events, executions are allowed at once.
func (g *Guard) read(ctx context.Context, w *waker, m *marker, work chan<- *event) error {
	fds := []unix.PollFd{
		{Fd: int32(w.fd), Events: unix.POLLIN},
		{Fd: int32(g.fd), Events: unix.POLLIN},
	}
	if m.mountFD >= 0 {
		fds = append(fds, unix.PollFd{Fd: int32(m.mountFD), Events: unix.POLLPRI})
	}
	buf := make([]byte, readBufSize)
	for {
		for i := range fds {
			fds[i].Revents = 0
		}
		if _, err := unix.Poll(fds, -1); err != nil {
			if err == unix.EINTR {
				continue
			}
			return fmt.Errorf("wait for executions: %w", err)
		}
		if fds[0].Revents != 0 {
			return ctx.Err()
		}
		if len(fds) > 2 && fds[2].Revents&(unix.POLLPRI|unix.POLLERR) != 0 {
			m.mark()
		}
		if fds[1].Revents != 0 {
			g.drain(buf, work)
		}
	}
}

// drain reads permission events until the queue is empty.
func (g *Guard) drain(buf []byte, work chan<- *event) {
	for {
		n, err := unix.Read(g.fd, buf)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return
		case err != nil:
			// The kernel could not hand an event over (no descriptor
			// left, …) and answered it itself.
			g.c.failed.Add(1)
			g.log.Warn("cannot read permission event", "err", err)
			return
		case n <= 0:
			return
		}
		g.parse(buf[:n], time.Now(), work)
	}
}

// parse handles a buffer of events.
func (g *Guard) parse(b []byte, now time.Time, work chan<- *event) {
	for len(b) >= fanMetaLen {
		evLen := binary.NativeEndian.Uint32(b[0:])
		vers := b[4]
		mask := binary.NativeEndian.Uint64(b[8:])
		fd := int(int32(binary.NativeEndian.Uint32(b[16:])))
		pid := int(int32(binary.NativeEndian.Uint32(b[20:])))
		if evLen < fanMetaLen || int(evLen) > len(b) {
			g.log.Error("malformed permission event", "len", evLen)
			return
		}
		b = b[evLen:]
		switch {
		case fd < 0:
			// No descriptor (a queue overflow): nothing is held.
		case vers != unix.FANOTIFY_METADATA_VERSION || mask&unix.FAN_OPEN_EXEC_PERM == 0 || pid == g.self:
			// The agent's own executions, and anything not understood,
			// are allowed as read.
			if pid == g.self {
				g.c.self.Add(1)
			}
			g.respMu.RLock()
			g.writeResponse(fd, unix.FAN_ALLOW)
			g.respMu.RUnlock()
			unix.Close(fd)
		default:
			e := g.newEvent(fd, pid, now)
			select {
			case work <- e:
			default:
				g.c.busy.Add(1)
				g.release(e)
			}
		}
	}
}

// marker keeps the permission mark on every local filesystem (or on the
// filesystems of Options.Paths).
type marker struct {
	g       *Guard
	fd      int
	mountFD int // -1 when following mounts is off
	marked  map[string]string
}

func newMarker(g *Guard, fd int) (*marker, error) {
	m := &marker{g: g, fd: fd, mountFD: -1, marked: make(map[string]string)}
	if len(g.opts.Paths) == 0 {
		mfd, err := unix.Open(mountinfoPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("open mountinfo: %w", err)
		}
		m.mountFD = mfd
	}
	return m, nil
}

func (m *marker) close() {
	if m.mountFD >= 0 {
		unix.Close(m.mountFD)
	}
}

func (m *marker) count() int { return len(m.marked) }

// mark adds the mark to filesystems not yet marked and forgets those that
// are gone; it returns how many are marked.
func (m *marker) mark() int {
	type fs struct{ dev, point, kind string }
	var want []fs
	if len(m.g.opts.Paths) > 0 {
		for _, p := range m.g.opts.Paths {
			want = append(want, fs{dev: p, point: p, kind: "given"})
		}
	} else {
		data, err := os.ReadFile(mountinfoPath)
		if err != nil {
			m.g.log.Warn("cannot read mounts", "err", err)
			return len(m.marked)
		}
		for _, f := range execwatch.LocalFilesystems(data) {
			want = append(want, fs{dev: f.Dev, point: f.Point, kind: f.Type})
		}
	}
	present := make(map[string]bool, len(want))
	for _, f := range want {
		present[f.dev] = true
		if _, ok := m.marked[f.dev]; ok {
			continue
		}
		err := unix.FanotifyMark(m.fd, unix.FAN_MARK_ADD|unix.FAN_MARK_FILESYSTEM, unix.FAN_OPEN_EXEC_PERM, unix.AT_FDCWD, f.point)
		if err != nil {
			m.g.log.Warn("cannot check executions on filesystem", "mount", f.point, "type", f.kind, "err", err)
			continue
		}
		m.marked[f.dev] = f.point
	}
	for dev := range m.marked {
		if !present[dev] {
			delete(m.marked, dev)
		}
	}
	return len(m.marked)
}

// waker turns the cancellation of a context into a readable eventfd for
// the poll loop.
type waker struct {
	fd   int
	stop func() bool
	done chan struct{}
}

func newWaker(ctx context.Context) (*waker, error) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("create eventfd: %w", err)
	}
	w := &waker{fd: fd, done: make(chan struct{})}
	w.stop = context.AfterFunc(ctx, func() {
		defer close(w.done)
		var one [8]byte
		binary.NativeEndian.PutUint64(one[:], 1)
		unix.Write(fd, one[:])
	})
	return w, nil
}

func (w *waker) close() {
	if !w.stop() {
		<-w.done
	}
	unix.Close(w.fd)
}

// DefaultUserDirs lists the places people write to: the temporary
// folders, /run/user and every person's home folder.
func DefaultUserDirs() []string {
	dirs := []string{"/tmp", "/var/tmp", "/dev/shm", "/run/user", "/home", "/root"}
	if users, err := identify.ReadPasswd("/etc/passwd"); err == nil {
		for _, u := range users {
			if u.Home != "" && u.Home != "/" && !identify.PackageManaged(u.Home) {
				dirs = append(dirs, u.Home)
			}
		}
	}
	return dirs
}

// cleanDirs cleans absolute folder names and drops the others.
func cleanDirs(dirs []string) []string {
	var out []string
	for _, d := range dirs {
		if strings.HasPrefix(d, "/") {
			out = append(out, filepath.Clean(d))
		}
	}
	return out
}
