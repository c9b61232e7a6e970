package execwatch

import (
	"github.com/cloudprotect/cloudprotect/agent/internal/dirs"

	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"
	"golang.org/x/sys/unix"
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
	// folder and ~/.local/bin, see UserLoadDirs). In system mode the agent
	// lists the folders of every person here.
	Dirs []string
	// Quiet is DefaultQuiet when zero.
	Quiet time.Duration
	// MaxPending is DefaultMaxLoadedPending when zero.
	MaxPending int
}

// Loaded watches folders where programs arrive without being installed
// (downloads, ~/.local/bin) and reports each new or changed executable
// file (any execute bit; ELF or "#!") as an Event with Loaded set, once it
// has stopped changing or as soon as an execute bit is added. The Event's
// File is the descriptor that was examined. A folder that does not exist
// yet is waited for. It implements Source with the name "loaded".
type Loaded struct {
	log        *slog.Logger
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
	dirs := opts.Dirs
	if len(dirs) == 0 {
		home, config := opts.Home, opts.ConfigHome
		if home == "" {
			home = os.Getenv("HOME")
			if config == "" {
				config = os.Getenv("XDG_CONFIG_HOME")
			}
		}
		dirs = UserLoadDirs(home, config)
	}
	clean := make([]string, 0, len(dirs))
	for _, d := range dirs {
		if filepath.IsAbs(d) {
			clean = append(clean, filepath.Clean(d))
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
		log:        orDiscard(opts.Logger).With("source", "loaded"),
		dirs:       clean,
		quiet:      quiet,
		maxPending: maxPending,
		ready:      make(chan struct{}),
	}
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
	targets  map[string]bool
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
		targets:  make(map[string]bool),
		watched:  make(map[string]bool),
		pending:  make(map[string]time.Time),
		reported: make(map[string]fileID),
		d:        &deliverer{out: out, max: l.maxPending, c: &l.c, log: l.log},
		timer:    time.NewTimer(time.Hour),
	}
	s.timer.Stop()
	defer s.timer.Stop()
	defer s.d.discard()
	for _, d := range l.dirs {
		s.targets[d] = true
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
	if s.targets[dir] {
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
	} else if s.watched[dir] && !s.targets[dir] && ev.Has(fsnotify.Create) {
		s.reconcile(true)
	}
}

// reconcile watches each target folder, or its nearest existing parent
// while it does not exist. When scan is set, files already in a folder
// that just appeared are examined.
func (s *loadedState) reconcile(scan bool) {
	want := make(map[string]bool)
	for t := range s.targets {
		want[dirs.Nearest(t)] = true
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
		if err := s.w.Add(p); err != nil {
			s.l.log.Warn("cannot watch folder", "dir", p, "err", err)
			continue
		}
		s.watched[p] = true
		if !s.targets[p] {
			s.l.log.Debug("waiting for folder", "parent", p)
			continue
		}
		if scan {
			ents, _ := os.ReadDir(p)
			for _, e := range ents {
				if e.Type().IsRegular() {
					s.schedule(filepath.Join(p, e.Name()))
				}
			}
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
// not reported in this state before. It reports whether it did.
func (s *loadedState) examine(path string) bool {
	fi, err := os.Lstat(path)
	if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
		return false
	}
	// O_NONBLOCK and O_NOFOLLOW: the name may have been replaced by a
	// FIFO or a link since the lstat.
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || st.Mode&0o111 == 0 {
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
	s.d.add(Event{FD: fd, Path: path, UID: st.Uid, Time: time.Now(), Kind: KindLoaded})
	return true
}

// isProgram reports whether a file starting with b is an ELF object or a
// script with an interpreter line.
func isProgram(b []byte) bool {
	return bytes.HasPrefix(b, []byte("\x7fELF")) || bytes.HasPrefix(b, []byte("#!"))
}
