package execwatch

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

const (
	unprivInitFlags = unix.FAN_CLASS_NOTIF | unix.FAN_CLOEXEC | unix.FAN_NONBLOCK | unix.FAN_REPORT_DFID_NAME

	// atHandleFID asks name_to_handle_at(2) for a handle that identifies
	// the inode the way fanotify reports it (Linux 6.5+); x/sys lacks it.
	atHandleFID = 0x200

	fidInfoHeaderLen = 4 + 8 + 8 // info header, fsid, handle_bytes + handle_type
)

// FanotifyUnprivileged watches execs of the programs in a fixed set of
// directories ($PATH, ~/.local/bin, /opt/*/bin) with fanotify directory
// marks, which need no privilege on Linux 5.13 and later. The kernel
// reports the directory and the name, not a descriptor, and hides the PID
// of other processes (it is 0), so events carry Path only. Programs run
// from other directories, the dynamic loader and script interpreters
// outside those directories are not seen, and the kernel queue is bounded
// (16,384 events); an overflow is counted as lost.
type FanotifyUnprivileged struct {
	log        *slog.Logger
	window     time.Duration
	maxPending int
	home       string
	dirs       []string

	serving atomic.Bool
	c       counters
	ready   chan struct{}
	once    sync.Once // closes ready
}

// NewFanotifyUnprivileged returns the unprivileged fanotify source.
func NewFanotifyUnprivileged(opts Options) *FanotifyUnprivileged {
	home := opts.Home
	if home == "" {
		home = os.Getenv("HOME")
	}
	return &FanotifyUnprivileged{
		log:        orDiscard(opts.Logger).With("source", "fanotify-unprivileged"),
		window:     opts.batchWindow(),
		maxPending: opts.maxPending(),
		home:       home,
		dirs:       opts.Dirs,
		ready:      make(chan struct{}),
	}
}

// Ready implements Source: closed once the directories are marked.
func (s *FanotifyUnprivileged) Ready() <-chan struct{} { return s.ready }

// Name implements Source.
func (s *FanotifyUnprivileged) Name() string { return "fanotify-unprivileged" }

// Limited implements Source.
func (s *FanotifyUnprivileged) Limited() (bool, string) {
	return true, "without root, only programs started from the PATH directories, ~/.local/bin and /opt/*/bin are seen"
}

// Stats implements Source.
func (s *FanotifyUnprivileged) Stats() Stats { return s.c.stats() }

// programDirs lists the directories to watch: $PATH, ~/.local/bin and
// /opt/*/bin, resolved and without duplicates or missing ones.
func programDirs(path, home string) []string {
	cands := filepath.SplitList(path)
	if home != "" {
		cands = append(cands, filepath.Join(home, ".local", "bin"))
	}
	opt, _ := filepath.Glob("/opt/*/bin")
	cands = append(cands, opt...)
	seen := make(map[string]bool)
	var out []string
	for _, c := range cands {
		if !filepath.IsAbs(c) {
			continue // a relative PATH entry depends on each process's cwd
		}
		real, err := filepath.EvalSymlinks(c)
		if err != nil || seen[real] {
			continue
		}
		if fi, err := os.Stat(real); err != nil || !fi.IsDir() {
			continue
		}
		seen[real] = true
		out = append(out, real)
	}
	return out
}

// Serve implements Source.
func (s *FanotifyUnprivileged) Serve(ctx context.Context, out chan<- []Event) error {
	if !s.serving.CompareAndSwap(false, true) {
		return errBusy
	}
	defer s.serving.Store(false)

	fd, err := unix.FanotifyInit(unprivInitFlags, fanFileFlags)
	if err != nil {
		return fmt.Errorf("init fanotify: %w", err)
	}
	defer unix.Close(fd)
	w, err := newWaker(ctx)
	if err != nil {
		return err
	}
	defer w.close()

	dirs := s.dirs
	if len(dirs) == 0 {
		dirs = programDirs(os.Getenv("PATH"), s.home)
	}
	byHandle := make(map[string]string)
	for _, dir := range dirs {
		key, err := dirKey(dir)
		if err != nil {
			s.log.Warn("cannot identify directory", "dir", dir, "err", err)
			continue
		}
		if err := unix.FanotifyMark(fd, unix.FAN_MARK_ADD|unix.FAN_MARK_ONLYDIR, unix.FAN_OPEN_EXEC|unix.FAN_EVENT_ON_CHILD, unix.AT_FDCWD, dir); err != nil {
			s.log.Warn("cannot watch directory", "dir", dir, "err", err)
			continue
		}
		if _, ok := byHandle[key]; !ok {
			byHandle[key] = dir
		}
	}
	if len(byHandle) == 0 {
		return fmt.Errorf("mark directories: %w", errNoMarks)
	}
	s.log.Info("watching executions", "directories", len(byHandle))
	s.once.Do(func() { close(s.ready) })

	self := int32(os.Getpid())
	d := &deliverer{out: out, max: s.maxPending, c: &s.c, log: s.log}
	fds := []unix.PollFd{
		{Fd: int32(w.fd), Events: unix.POLLIN},
		{Fd: int32(fd), Events: unix.POLLIN},
	}
	buf := make([]byte, readBufSize)
	win := adaptive{max: s.window}
	read := func() {
		now := time.Now()
		for {
			n, err := unix.Read(fd, buf)
			if err == unix.EINTR {
				continue
			}
			if err != nil || n <= 0 {
				if err != nil && err != unix.EAGAIN {
					s.c.lost.Add(1)
					s.log.Warn("cannot read exec event", "err", err)
				}
				return
			}
			win.last = now
			parseFanotifyDFID(buf[:n], self, byHandle, now, d, s.log)
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
			cancelled = sleepCtx(ctx, win.window(time.Now()))
		}
		read()
		if cancelled {
			d.deliver()
			read()
			d.deliver()
			return ctx.Err()
		}
	}
}

// dirKey is how fanotify identifies a directory in its events: the
// filesystem ID, the handle type and the handle bytes.
func dirKey(dir string) (string, error) {
	h, _, err := unix.NameToHandleAt(unix.AT_FDCWD, dir, atHandleFID)
	if err == unix.EINVAL {
		h, _, err = unix.NameToHandleAt(unix.AT_FDCWD, dir, 0) // before Linux 6.5
	}
	if err != nil {
		return "", fmt.Errorf("get handle: %w", err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return "", fmt.Errorf("statfs: %w", err)
	}
	return fidKey(st.Fsid.Val, h.Type(), h.Bytes()), nil
}

func fidKey(fsid [2]int32, typ int32, handle []byte) string {
	b := make([]byte, 12, 12+len(handle))
	binary.NativeEndian.PutUint32(b[0:], uint32(fsid[0]))
	binary.NativeEndian.PutUint32(b[4:], uint32(fsid[1]))
	binary.NativeEndian.PutUint32(b[8:], uint32(typ))
	return string(append(b, handle...))
}

// parseFanotifyDFID turns fanotify events that carry a directory handle
// and a name into Events with a Path.
func parseFanotifyDFID(b []byte, self int32, dirs map[string]string, now time.Time, d *deliverer, log *slog.Logger) {
	for len(b) >= fanMetaLen {
		evLen := binary.NativeEndian.Uint32(b[0:])
		vers := b[4]
		metaLen := binary.NativeEndian.Uint16(b[6:])
		mask := binary.NativeEndian.Uint64(b[8:])
		fd := int(int32(binary.NativeEndian.Uint32(b[16:])))
		pid := int32(binary.NativeEndian.Uint32(b[20:]))
		if evLen < fanMetaLen || int(evLen) > len(b) || metaLen < fanMetaLen || uint32(metaLen) > evLen {
			log.Warn("malformed exec event", "len", evLen)
			return
		}
		info := b[metaLen:evLen]
		b = b[evLen:]
		if fd >= 0 {
			unix.Close(fd) // not expected with FAN_REPORT_DFID_NAME
		}
		switch {
		case vers != unix.FANOTIFY_METADATA_VERSION:
			d.c.lost.Add(1)
			log.Warn("unknown exec event version", "version", vers)
			continue
		case mask&unix.FAN_Q_OVERFLOW != 0:
			d.c.lost.Add(1)
			log.Warn("kernel exec queue overflowed")
			continue
		case pid == self:
			continue
		}
		path, ok := dfidPath(info, dirs)
		if !ok {
			d.c.lost.Add(1)
			log.Warn("exec event names an unknown directory")
			continue
		}
		d.add(Event{FD: -1, Path: path, PID: pid, UID: UIDUnknown, Time: now, Kind: KindExec})
	}
}

// dfidPath finds the directory-and-name record among an event's info
// records and returns the path it names.
func dfidPath(info []byte, dirs map[string]string) (string, bool) {
	for len(info) >= 4 {
		typ := info[0]
		n := int(binary.NativeEndian.Uint16(info[2:]))
		if n < 4 || n > len(info) {
			return "", false
		}
		rec := info[:n]
		info = info[n:]
		if typ != unix.FAN_EVENT_INFO_TYPE_DFID_NAME || len(rec) < fidInfoHeaderLen {
			continue
		}
		fsid := [2]int32{int32(binary.NativeEndian.Uint32(rec[4:])), int32(binary.NativeEndian.Uint32(rec[8:]))}
		hlen := int(binary.NativeEndian.Uint32(rec[12:]))
		htype := int32(binary.NativeEndian.Uint32(rec[16:]))
		rest := rec[fidInfoHeaderLen:]
		if hlen > len(rest) {
			return "", false
		}
		dir, ok := dirs[fidKey(fsid, htype, rest[:hlen])]
		if !ok {
			return "", false
		}
		name := rest[hlen:]
		if i := bytes.IndexByte(name, 0); i >= 0 {
			name = name[:i]
		}
		if len(name) == 0 || bytes.IndexByte(name, '/') >= 0 {
			return "", false
		}
		return filepath.Join(dir, string(name)), true
	}
	return "", false
}
