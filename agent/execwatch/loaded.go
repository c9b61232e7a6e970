package execwatch

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"
	"golang.org/x/sys/unix"

	"github.com/cloudprotect/cloudprotect/agent/internal/dirs"
)

// Defaults of the loaded-programs watcher.
const (
	// DefaultQuiet is how long a file must go unwritten before it is
	// examined: a download is written many times.
	DefaultQuiet = 500 * time.Millisecond
	// DefaultMaxLoadedPending bounds the files waiting to go quiet.
	DefaultMaxLoadedPending = 1024
)

// LoadedOptions configures the loaded-programs watcher.
type LoadedOptions struct {
	// Logger receives warnings; nil discards.
	Logger *slog.Logger
	// Home is the person's home directory; empty means $HOME.
	Home string
	// ConfigHome is where user-dirs.dirs is read; empty means
	// $XDG_CONFIG_HOME when Home is empty too, and Home/.config otherwise.
	ConfigHome string
	// Dirs replaces the watched folders (by default the XDG download
	// folder and ~/.local/bin, see UserLoadDirs). Without Home, each is
	// its own home (see Person).
	Dirs []string
	// People replaces Home, ConfigHome and Dirs: the folders of every
	// person, each read with that person's rights (the system agent).
	People []Person
	// Quiet is DefaultQuiet when zero.
	Quiet time.Duration
	// MaxPending is DefaultMaxLoadedPending when zero.
	MaxPending int
}

// Person is someone whose folders are watched. The system agent runs as
// root, so it reads in a person's folders only what the person could read
// there themselves:
//
//   - a watched folder lies inside the person's home and is reached from
//     it without following a symbolic link that leaves it (openat2 with
//     RESOLVE_BENEATH); a folder elsewhere, or a link to one (a
//     ~/Downloads pointing at /root/private-bin, an XDG_DOWNLOAD_DIR of
//     /root/private-bin), is not watched;
//   - the home and the folder belong to the person;
//   - a file is opened through that folder without following links, and
//     reported only when the person may read it: its owner, group and
//     other bits and its POSIX ACL, checked against the person's uid and
//     groups (a file they cannot read, hard-linked into their folder, is
//     left alone).
//
// Root, as a person, may read everything.
type Person struct {
	UID, GID uint32
	// Groups are the person's supplementary groups.
	Groups []uint32
	Home   string
	Dirs   []string
}

// PeopleFromPasswd lists the people of an /etc/passwd-format file (root
// and the accounts with a uid of at least 1000, other than nobody) with
// their groups and their folders where programs arrive (UserLoadDirs).
func PeopleFromPasswd(path string) ([]Person, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read accounts: %w", err)
	}
	var out []Person
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		f := strings.Split(sc.Text(), ":")
		if len(f) < 7 || strings.HasPrefix(f[0], "#") {
			continue
		}
		uid, err1 := strconv.ParseUint(f[2], 10, 32)
		gid, err2 := strconv.ParseUint(f[3], 10, 32)
		if err1 != nil || err2 != nil || (uid != 0 && (uid < 1000 || uid == 65534)) {
			continue
		}
		home := filepath.Clean(f[5])
		if !filepath.IsAbs(home) || home == "/" {
			continue
		}
		p := Person{UID: uint32(uid), GID: uint32(gid), Home: home, Dirs: UserLoadDirs(home, filepath.Join(home, ".config"))}
		if u, err := user.LookupId(f[2]); err == nil {
			if ids, err := u.GroupIds(); err == nil {
				for _, id := range ids {
					if g, err := strconv.ParseUint(id, 10, 32); err == nil {
						p.Groups = append(p.Groups, uint32(g))
					}
				}
			}
		}
		out = append(out, p)
	}
	return out, sc.Err()
}

// Loaded watches folders where programs arrive without being installed
// (downloads, ~/.local/bin) and reports each new or changed executable
// file (any execute bit; ELF or "#!") as an Event with Loaded set, once it
// has stopped changing or as soon as an execute bit is added. The Event's
// FD is the descriptor that was examined, its UID the person whose folder
// it is. A folder that does not exist yet is waited for. What it reads is
// bounded by each person's rights (see Person). It implements Source with
// the name "loaded".
type Loaded struct {
	log        *slog.Logger
	people     []Person
	dirs       []string
	quiet      time.Duration
	maxPending int

	serving atomic.Bool
	c       counters
	ready   chan struct{}
	once    sync.Once // closes ready
}

// NewLoaded returns the loaded-programs watcher.
func NewLoaded(opts LoadedOptions) *Loaded {
	log := orDiscard(opts.Logger).With("source", "loaded")
	people := opts.People
	if len(people) == 0 {
		people = processPeople(opts)
	}
	var clean []string
	var kept []Person
	for _, p := range people {
		p.Home = filepath.Clean(p.Home)
		var dirs []string
		for _, d := range p.Dirs {
			if !filepath.IsAbs(d) {
				continue
			}
			d = filepath.Clean(d)
			if rel, err := filepath.Rel(p.Home, d); err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
				log.Warn("a folder outside the person's home is not watched", "dir", d, "home", p.Home, "uid", p.UID)
				continue
			}
			dirs = append(dirs, d)
			clean = append(clean, d)
		}
		if len(dirs) > 0 {
			p.Dirs = dirs
			kept = append(kept, p)
		}
	}
	quiet := opts.Quiet
	if quiet <= 0 {
		quiet = DefaultQuiet
	}
	maxPending := opts.MaxPending
	if maxPending <= 0 {
		maxPending = DefaultMaxLoadedPending
	}
	return &Loaded{
		log:        log,
		people:     kept,
		dirs:       clean,
		quiet:      quiet,
		maxPending: maxPending,
		ready:      make(chan struct{}),
	}
}

// processPeople is the watcher's person when LoadedOptions names none: the
// user the process runs as, with the folders of the options.
func processPeople(opts LoadedOptions) []Person {
	me := Person{UID: uint32(os.Getuid()), GID: uint32(os.Getgid())}
	if gs, err := os.Getgroups(); err == nil {
		for _, g := range gs {
			me.Groups = append(me.Groups, uint32(g))
		}
	}
	home, config := opts.Home, opts.ConfigHome
	if len(opts.Dirs) > 0 && home == "" {
		// Folders named on their own: each is its own home.
		var out []Person
		for _, d := range opts.Dirs {
			p := me
			p.Home, p.Dirs = d, []string{d}
			out = append(out, p)
		}
		return out
	}
	if home == "" {
		home = os.Getenv("HOME")
		if config == "" {
			config = os.Getenv("XDG_CONFIG_HOME")
		}
	}
	if home == "" {
		return nil
	}
	me.Home = home
	me.Dirs = opts.Dirs
	if len(me.Dirs) == 0 {
		me.Dirs = UserLoadDirs(home, config)
	}
	return []Person{me}
}

// Ready implements Source: closed once the folders are watched.
func (l *Loaded) Ready() <-chan struct{} { return l.ready }

// Name implements Source.
func (l *Loaded) Name() string { return "loaded" }

// Limited implements Source.
func (l *Loaded) Limited() (bool, string) { return false, "" }

// Stats implements Source.
func (l *Loaded) Stats() Stats { return l.c.stats() }

// Dirs lists the watched folders.
func (l *Loaded) Dirs() []string { return append([]string(nil), l.dirs...) }

// UserLoadDirs lists a person's folders where programs arrive: the XDG
// download folder (from configHome/user-dirs.dirs, ~/Downloads by default)
// and ~/.local/bin. configHome empty means home/.config.
func UserLoadDirs(home, configHome string) []string {
	if home == "" {
		return nil
	}
	if configHome == "" {
		configHome = filepath.Join(home, ".config")
	}
	var dirs []string
	if dl := downloadDir(home, configHome); dl != "" {
		dirs = append(dirs, dl)
	}
	return append(dirs, filepath.Join(home, ".local", "bin"))
}

// downloadDir reads XDG_DOWNLOAD_DIR from user-dirs.dirs. A value equal
// to the home directory means the person has no download folder.
func downloadDir(home, configHome string) string {
	def := filepath.Join(home, "Downloads")
	data, err := os.ReadFile(filepath.Join(configHome, "user-dirs.dirs"))
	if err != nil {
		return def
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		key, val, ok := strings.Cut(line, "=")
		if !ok || strings.HasPrefix(line, "#") || strings.TrimSpace(key) != "XDG_DOWNLOAD_DIR" {
			continue
		}
		val = strings.TrimSpace(val)
		if len(val) < 2 || val[0] != '"' || val[len(val)-1] != '"' {
			return def
		}
		val = unquoteShell(val[1 : len(val)-1])
		var dir string
		switch {
		case val == "$HOME" || val == "$HOME/" || val == "${HOME}" || val == "${HOME}/":
			return ""
		case strings.HasPrefix(val, "$HOME/"):
			dir = filepath.Join(home, val[len("$HOME/"):])
		case strings.HasPrefix(val, "${HOME}/"):
			dir = filepath.Join(home, val[len("${HOME}/"):])
		case filepath.IsAbs(val):
			dir = filepath.Clean(val)
		default:
			return def
		}
		if dir == filepath.Clean(home) {
			return ""
		}
		return dir
	}
	return def
}

// unquoteShell undoes the backslash escapes allowed inside the double
// quotes of user-dirs.dirs.
func unquoteShell(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			i++
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// fileID tells whether a file changed since it was reported.
type fileID struct {
	dev, ino uint64
	size     int64
	mtime    int64
	mode     uint32
}

// loadedState is the watcher's state during one Serve; only the Serve
// goroutine touches it.
type loadedState struct {
	l        *Loaded
	w        *fsnotify.Watcher
	targets  map[string]*Person // watched folder → whose it is
	watched  map[string]bool
	pending  map[string]time.Time // path → when it goes quiet
	reported map[string]fileID
	d        *deliverer
	timer    *time.Timer
	armed    bool
}

// Serve implements Source. It returns an error only when the inotify
// instance cannot be created, or at cancellation.
func (l *Loaded) Serve(ctx context.Context, out chan<- []Event) error {
	if !l.serving.CompareAndSwap(false, true) {
		return errBusy
	}
	defer l.serving.Store(false)
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("create watcher: %w", err)
	}
	defer w.Close()
	s := &loadedState{
		l:        l,
		w:        w,
		targets:  make(map[string]*Person),
		watched:  make(map[string]bool),
		pending:  make(map[string]time.Time),
		reported: make(map[string]fileID),
		d:        &deliverer{out: out, max: l.maxPending, c: &l.c, log: l.log},
		timer:    time.NewTimer(time.Hour),
	}
	s.timer.Stop()
	defer s.timer.Stop()
	defer s.d.discard()
	for i := range l.people {
		p := &l.people[i]
		for _, d := range p.Dirs {
			if s.targets[d] == nil {
				s.targets[d] = p
			}
		}
	}
	s.reconcile(false)
	l.log.Info("watching for loaded programs", "dirs", l.dirs)
	l.once.Do(func() { close(l.ready) })

	var retry <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			s.d.deliver()
			return ctx.Err()
		case ev, ok := <-w.Events:
			if !ok {
				return errors.New("watch loaded programs: watcher closed")
			}
			s.handle(ev)
		case err, ok := <-w.Errors:
			if !ok {
				return errors.New("watch loaded programs: watcher closed")
			}
			if errors.Is(err, fsnotify.ErrEventOverflow) {
				l.c.lost.Add(1)
			}
			l.log.Warn("watch error", "err", err)
		case now := <-s.timer.C:
			s.armed = false
			s.due(now)
		case <-retry:
			retry = nil
		}
		s.d.flush()
		if s.d.hasPending() && retry == nil {
			retry = time.After(100 * time.Millisecond)
		}
	}
}

// handle reacts to one inotify event.
func (s *loadedState) handle(ev fsnotify.Event) {
	dir := filepath.Dir(ev.Name)
	if s.targets[dir] != nil {
		switch {
		case ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename):
			delete(s.pending, ev.Name)
			delete(s.reported, ev.Name)
		case ev.Has(fsnotify.Create) || ev.Has(fsnotify.Write):
			s.schedule(ev.Name)
		case ev.Has(fsnotify.Chmod):
			// Perhaps an execute bit just added: look now, without
			// waiting for the quiet period.
			if s.examine(ev.Name) {
				delete(s.pending, ev.Name)
			}
		}
	}
	// A watched folder went away, or a missing one (or one of its
	// parents) appeared.
	if s.watched[ev.Name] && (ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename)) {
		delete(s.watched, ev.Name)
		s.reconcile(true)
	} else if s.watched[dir] && s.targets[dir] == nil && ev.Has(fsnotify.Create) {
		s.reconcile(true)
	}
}

// reconcile watches each target folder, or its nearest existing parent
// while it does not exist (or cannot be used, see Person). When scan is
// set, files already in a folder that just appeared are examined.
//
// A folder created between the look for the nearest parent and the watch
// on that parent raises no event there: `mkdir -p ~/.local/bin` does just
// that. So after watching a parent, it looks again, until nothing changes.
func (s *loadedState) reconcile(scan bool) {
	for i := range 16 {
		// A folder found on a second look appeared after the first.
		if !s.reconcileOnce(scan || i > 0) {
			return
		}
	}
}

// beforeWatchingParent, when set by a test, runs just before a parent of
// a missing folder is watched.
var beforeWatchingParent func(parent string)

// reconcileOnce is one look; it reports whether it began to watch a
// parent of a missing folder.
func (s *loadedState) reconcileOnce(scan bool) (waiting bool) {
	want := make(map[string]bool)
	for t, per := range s.targets {
		w := dirs.Nearest(t)
		if w == t {
			fd, err := openFolder(per, t, false)
			if err != nil {
				s.l.log.Warn("folder not watched", "dir", t, "err", err)
				w = dirs.Nearest(filepath.Dir(t))
			} else {
				unix.Close(fd)
			}
		}
		want[w] = true
	}
	for p := range s.watched {
		if !want[p] {
			s.w.Remove(p)
			delete(s.watched, p)
		}
	}
	for p := range want {
		if s.watched[p] {
			continue
		}
		if s.targets[p] == nil && beforeWatchingParent != nil {
			beforeWatchingParent(p)
		}
		if err := s.w.Add(p); err != nil {
			s.l.log.Warn("cannot watch folder", "dir", p, "err", err)
			continue
		}
		s.watched[p] = true
		per := s.targets[p]
		if per == nil {
			s.l.log.Debug("waiting for folder", "parent", p)
			waiting = true
			continue
		}
		if scan {
			s.scan(per, p)
		}
	}
	return waiting
}

// scan schedules the files already in a person's folder, listed through
// the folder as it was checked.
func (s *loadedState) scan(per *Person, dir string) {
	fd, err := openFolder(per, dir, true)
	if err != nil {
		return
	}
	f := os.NewFile(uintptr(fd), dir)
	ents, _ := f.ReadDir(-1)
	f.Close()
	for _, e := range ents {
		if e.Type().IsRegular() {
			s.schedule(filepath.Join(dir, e.Name()))
		}
	}
}

// schedule (re)starts the quiet period of a file.
func (s *loadedState) schedule(path string) {
	if _, ok := s.pending[path]; !ok && len(s.pending) >= s.l.maxPending {
		s.l.c.lost.Add(1)
		s.l.log.Warn("too many files changing at once; one is not examined", "path", path)
		return
	}
	due := time.Now().Add(s.l.quiet)
	s.pending[path] = due
	if !s.armed {
		s.timer.Reset(s.l.quiet)
		s.armed = true
	}
}

// due examines the files that went quiet and re-arms the timer for the
// next one.
func (s *loadedState) due(now time.Time) {
	var next time.Time
	for path, at := range s.pending {
		if !at.After(now) {
			delete(s.pending, path)
			s.examine(path)
			continue
		}
		if next.IsZero() || at.Before(next) {
			next = at
		}
	}
	if !next.IsZero() {
		s.timer.Reset(next.Sub(now))
		s.armed = true
	}
}

// examine reports path if it is an executable regular file (ELF or "#!")
// not reported in this state before, in a watched folder whose person may
// read it. It reports whether it did.
func (s *loadedState) examine(path string) bool {
	per := s.targets[filepath.Dir(path)]
	if per == nil {
		return false
	}
	dirfd, err := openFolder(per, filepath.Dir(path), false)
	if err != nil {
		return false
	}
	// O_NONBLOCK and O_NOFOLLOW: the name may name a FIFO or a link.
	fd, err := unix.Openat(dirfd, filepath.Base(path), unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	unix.Close(dirfd)
	if err != nil {
		return false
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || st.Mode&0o111 == 0 || !mayRead(per, fd, &st) {
		unix.Close(fd)
		return false
	}
	var magic [4]byte
	n, _ := unix.Pread(fd, magic[:], 0)
	if !isProgram(magic[:max(n, 0)]) {
		unix.Close(fd)
		return false
	}
	id := fileID{dev: st.Dev, ino: st.Ino, size: st.Size, mtime: st.Mtim.Nano(), mode: st.Mode}
	if prev, ok := s.reported[path]; ok && prev == id {
		unix.Close(fd)
		return false
	}
	if len(s.reported) >= 4*s.l.maxPending {
		clear(s.reported) // bounded memory; at worst a file is reported twice
	}
	s.reported[path] = id
	s.d.add(Event{FD: fd, Path: path, UID: per.UID, Time: time.Now(), Kind: KindLoaded})
	return true
}

// isProgram reports whether a file starting with b is an ELF object or a
// script with an interpreter line.
func isProgram(b []byte) bool {
	return bytes.HasPrefix(b, []byte("\x7fELF")) || bytes.HasPrefix(b, []byte("#!"))
}

// openFolder opens dir, a watched folder of per, the way Person says:
// from per's home (which must be theirs) without a link that leaves it,
// and only when it is theirs and they may enter it. With list it is
// opened for reading its entries, otherwise as a path to open files in.
func openFolder(per *Person, dir string, list bool) (int, error) {
	rel, err := filepath.Rel(per.Home, dir)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return -1, fmt.Errorf("%s is outside %s", dir, per.Home)
	}
	home, err := unix.Open(per.Home, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open home %s: %w", per.Home, err)
	}
	defer unix.Close(home)
	if err := ownedBy(home, per, per.Home); err != nil {
		return -1, err
	}
	flags := uint64(unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC)
	if list {
		flags = unix.O_RDONLY | unix.O_DIRECTORY | unix.O_CLOEXEC
	}
	fd, err := unix.Openat2(home, rel, &unix.OpenHow{Flags: flags, Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS})
	if errors.Is(err, unix.ENOSYS) {
		fd, err = openNoLinks(home, rel, int(flags))
	}
	if err != nil {
		return -1, fmt.Errorf("open %s from %s without leaving it: %w", rel, per.Home, err)
	}
	if err := ownedBy(fd, per, dir); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// openNoLinks opens rel below dirfd one component at a time, following no
// symbolic link at all: for kernels before 5.6, which lack openat2.
func openNoLinks(dirfd int, rel string, flags int) (int, error) {
	cur, err := unix.Dup(dirfd)
	if err != nil {
		return -1, err
	}
	parts := strings.Split(rel, "/")
	for i, c := range parts {
		if c == "." || c == "" {
			continue
		}
		if c == ".." {
			unix.Close(cur)
			return -1, unix.EXDEV
		}
		fl := unix.O_PATH | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC
		if i == len(parts)-1 {
			fl = flags | unix.O_NOFOLLOW
		}
		next, err := unix.Openat(cur, c, fl, 0)
		unix.Close(cur)
		if err != nil {
			return -1, err
		}
		cur = next
	}
	return cur, nil
}

// ownedBy checks that the folder fd (named name) belongs to per, who may
// enter it.
func ownedBy(fd int, per *Person, name string) error {
	if per.UID == 0 {
		return nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("stat %s: %w", name, err)
	}
	if st.Uid != per.UID {
		return fmt.Errorf("%s belongs to uid %d, not to uid %d", name, st.Uid, per.UID)
	}
	if st.Mode&0o100 == 0 {
		return fmt.Errorf("%s cannot be entered by its owner", name)
	}
	return nil
}

// POSIX ACL tags and the layout of system.posix_acl_access.
const (
	aclUserObj  = 0x01
	aclUser     = 0x02
	aclGroupObj = 0x04
	aclGroup    = 0x08
	aclMask     = 0x10
	aclOther    = 0x20
	aclRead     = 0x4
	aclVersion  = 2
)

// mayRead reports whether per may read the open file fd (st its status)
// by its mode and POSIX access ACL, as the kernel would decide. Anything
// it cannot read or make sense of (an ACL of another format) is a no.
func mayRead(per *Person, fd int, st *unix.Stat_t) bool {
	if per.UID == 0 {
		return true
	}
	inGroup := func(g uint32) bool { return g == per.GID || slices.Contains(per.Groups, g) }
	buf := make([]byte, 1024)
	n, err := unix.Fgetxattr(fd, "system.posix_acl_access", buf)
	if errors.Is(err, unix.ERANGE) {
		return false // an ACL longer than any a person makes
	}
	if err != nil || n <= 4 {
		// No ACL: the mode alone decides.
		switch {
		case st.Uid == per.UID:
			return st.Mode&0o400 != 0
		case inGroup(st.Gid):
			return st.Mode&0o040 != 0
		default:
			return st.Mode&0o004 != 0
		}
	}
	acl := buf[:n]
	if binary.LittleEndian.Uint32(acl) != aclVersion || (len(acl)-4)%8 != 0 {
		return false
	}
	type entry struct {
		tag, perm uint16
		id        uint32
	}
	var ents []entry
	mask := uint16(0xffff)
	for b := acl[4:]; len(b) >= 8; b = b[8:] {
		e := entry{binary.LittleEndian.Uint16(b), binary.LittleEndian.Uint16(b[2:]), binary.LittleEndian.Uint32(b[4:])}
		if e.tag == aclMask {
			mask = e.perm
		}
		ents = append(ents, e)
	}
	if st.Uid == per.UID {
		for _, e := range ents {
			if e.tag == aclUserObj {
				return e.perm&aclRead != 0
			}
		}
		return false
	}
	for _, e := range ents {
		if e.tag == aclUser && e.id == per.UID {
			return e.perm&mask&aclRead != 0
		}
	}
	matched := false
	for _, e := range ents {
		if (e.tag == aclGroupObj && inGroup(st.Gid)) || (e.tag == aclGroup && inGroup(e.id)) {
			matched = true
			if e.perm&mask&aclRead != 0 {
				return true
			}
		}
	}
	if matched {
		return false
	}
	for _, e := range ents {
		if e.tag == aclOther {
			return e.perm&aclRead != 0
		}
	}
	return false
}
