package protect

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/identify"
	"github.com/cloudprotect/cloudprotect/agent/reputation"
	"github.com/cloudprotect/cloudprotect/wire"
)

// subject is what a decision knows of an executed file.
type subject struct {
	e     *event
	facts wire.Facts
	path  string      // as the kernel names it
	st    unix.Stat_t // before it was identified
	gen   uint64      // Invalidate's generation when the decision began
}

// decide answers one execution. Known malicious → deny; an exception or
// any other known verdict → allow; unfamiliar in a place people write to
// → hold while the cloud is asked; everything else → allow. Every error
// allows.
func (g *Guard) decide(ctx context.Context, e *event) {
	if ctx.Err() != nil {
		g.release(e)
		return
	}
	if parentPID(e.pid) == g.self {
		// A program the agent itself starts: the agent never waits on
		// itself.
		g.c.self.Add(1)
		g.release(e)
		return
	}
	s := &subject{e: e, gen: g.gen.Load()}
	if err := unix.Fstat(e.fd, &s.st); err != nil || s.st.Mode&unix.S_IFMT != unix.S_IFREG {
		g.c.failed.Add(1)
		g.release(e)
		return
	}
	s.path = fdPath(e.fd)
	facts, err := g.opts.Identify.IdentifyFD(e.fd, s.path)
	if err != nil {
		// A large file is hashed in the background: allowed now, decided
		// at its next execution.
		if !errors.Is(err, identify.ErrDeferred) {
			g.c.failed.Add(1)
			g.log.Debug("cannot identify executed file; allowed", "path", s.path, "err", err)
		}
		g.release(e)
		return
	}
	s.facts = facts
	if g.opts.Exceptions.Has(facts.SHA256) {
		g.allow(s, true)
		return
	}
	if r, ok := g.opts.Reputation.Cached(facts.SHA256); ok {
		g.verdict(s, r)
		return
	}
	if !g.unfamiliarPlace(s) {
		g.allow(s, true)
		return
	}
	if err := g.unavailable(); err != nil {
		// Nothing can be asked: allowed without a mark, so that its
		// next execution is checked once a server can be used.
		g.c.skipped.Add(1)
		g.allow(s, false)
		return
	}
	if !g.circ.allowHold(time.Now()) {
		g.c.skipped.Add(1)
		g.allow(s, true)
		return
	}
	if !g.ask.hold(s) {
		g.c.busy.Add(1)
		g.release(e)
	}
}

// unavailable returns why the cloud cannot be asked at all, or nil, and
// logs it once per change.
func (g *Guard) unavailable() error {
	err := g.opts.Reputation.Unavailable()
	why := ""
	if err != nil {
		why = err.Error()
	}
	g.toldMu.Lock()
	changed := why != g.told
	g.told = why
	g.toldMu.Unlock()
	if changed && err != nil {
		g.log.Info("unfamiliar programs run without waiting for the Security Network, which cannot be asked", "problem", why)
	}
	return err
}

// verdict acts on the Security Network's verdict on s.
func (g *Guard) verdict(s *subject, r wire.Reputation) {
	if r.Verdict == wire.VerdictMalicious {
		g.block(s, r)
		return
	}
	g.allow(s, true)
}

// allow lets s run and releases it. With mark, its file first gets an
// ignore mark, so the executions that follow this one raise no event.
func (g *Guard) allow(s *subject, mark bool) {
	if mark {
		g.markGood(s)
	}
	g.answer(s.e, true)
	g.release(s.e)
}

// block denies s, unless its file is one the guard never denies (a
// root-owned system file, the agent itself), and reports it.
func (g *Guard) block(s *subject, r wire.Reputation) {
	if g.neverDeny(s) {
		g.log.Warn("system program has a malicious verdict; allowed (system files are never denied)",
			"path", s.path, "sha256", s.facts.SHA256)
		g.allow(s, false)
		return
	}
	// Who tried to run it, read while the process still waits in execve:
	// once denied it may exit at once.
	uid := procUID(s.e.pid)
	if !g.answer(s.e, false) {
		// Its deadline passed first: it ran.
		g.release(s.e)
		return
	}
	g.c.denied.Add(1)
	// The alert is built from the agent's own facts, as every alert is.
	al := reputation.AlertFor(s.facts.SHA256, s.facts.Path, r)
	al.Action, al.Time = api.AlertActionBlocked, time.Now().UTC()
	g.release(s.e)
	g.lastMu.Lock()
	g.lastBlock = &al
	g.lastMu.Unlock()
	g.log.Warn("execution blocked", "program", al.Program, "path", al.Path, "sha256", al.SHA256, "uid", uid)
	if g.opts.Report != nil {
		g.opts.Report(al, uid)
	}
}

// neverDeny reports whether s is a file the guard allows whatever its
// verdict: the agent's own program, and system files (package-managed
// paths, owned by root, writable by nobody else). A wrong verdict on
// /usr/bin/sh must not stop the machine; such verdicts are alerted on.
func (g *Guard) neverDeny(s *subject) bool {
	if g.selfExe.ino != 0 && s.st.Dev == g.selfExe.dev && s.st.Ino == g.selfExe.ino {
		return true
	}
	return identify.PackageManaged(s.path) && s.st.Uid == 0 && s.st.Mode&0o022 == 0
}

// unfamiliarPlace reports whether s lies where people put programs they
// fetched: a file not owned by root or writable by group or others, or
// one under the user folders, and not a system file.
func (g *Guard) unfamiliarPlace(s *subject) bool {
	if s.st.Uid != 0 || s.st.Mode&0o022 != 0 {
		return true
	}
	if identify.PackageManaged(s.path) {
		return false
	}
	for _, d := range g.users {
		if strings.HasPrefix(s.path, d) && (len(s.path) == len(d) || s.path[len(d)] == '/' || d == "/") {
			return true
		}
	}
	return false
}

// markGood sets an evictable ignore mark on s's file, so its executions
// raise no permission event until the file is modified (the kernel then
// clears the mark) or Invalidate runs. A file that changed since it was
// identified keeps no mark.
func (g *Guard) markGood(s *subject) {
	g.markMu.RLock()
	defer g.markMu.RUnlock()
	if g.gen.Load() != s.gen {
		return // invalidated while deciding
	}
	g.respMu.RLock()
	defer g.respMu.RUnlock()
	if g.closed {
		return
	}
	if err := unix.FanotifyMark(g.fd, markIgnoreFlags(unix.FAN_MARK_ADD), unix.FAN_OPEN_EXEC_PERM, s.e.fd, ""); err != nil {
		g.log.Debug("cannot set ignore mark", "path", s.path, "err", err)
		return
	}
	var now unix.Stat_t
	if err := unix.Fstat(s.e.fd, &now); err != nil || changed(&s.st, &now) {
		unix.FanotifyMark(g.fd, markIgnoreFlags(unix.FAN_MARK_REMOVE), unix.FAN_OPEN_EXEC_PERM, s.e.fd, "")
		return
	}
	g.c.marked.Add(1)
}

// markIgnoreFlags are the flags of an evictable inode ignore mark.
func markIgnoreFlags(op uint) uint {
	return op | unix.FAN_MARK_IGNORE | unix.FAN_MARK_EVICTABLE
}

func changed(a, b *unix.Stat_t) bool {
	return a.Size != b.Size || a.Mtim != b.Mtim || a.Ctim != b.Ctim || a.Ino != b.Ino || a.Dev != b.Dev
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

// procUID returns the real user ID of process pid, -1 if unknown. The
// process is held in execve, so it is still there to be read.
func procUID(pid int) int {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "Uid:"); ok {
			fs := strings.Fields(rest)
			if len(fs) > 0 {
				if uid, err := strconv.Atoi(fs[0]); err == nil {
					return uid
				}
			}
			break
		}
	}
	return -1
}

// parentPID returns the parent of process pid, -1 if unknown.
func parentPID(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return -1
	}
	// pid (comm) state ppid …; comm may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return -1
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 2 {
		return -1
	}
	ppid, err := strconv.Atoi(f[1])
	if err != nil {
		return -1
	}
	return ppid
}
