// Package protect decides, before a program runs, whether it may run. A
// fanotify permission group (FAN_CLASS_CONTENT, FAN_OPEN_EXEC_PERM on
// every local filesystem) asks about each execution; the guard denies
// programs the Security Network knows to be malicious, holds unfamiliar
// programs from places people write to while it asks the cloud (up to
// the policy's first-sight timeout, then allows), and allows everything
// else at once. Files found good get an evictable ignore mark, so their
// later executions raise no permission event at all until they change.
//
// Nothing here may hang the machine. Every permission event is answered
// by a timer of its own, armed when the event is read and independent of
// identification and of the network; the agent's own executions are
// allowed as they are read; an internal error, a full backlog, an
// unreachable cloud or a stop answer "allow" at once; a cloud that does
// not answer in time opens a circuit, so later executions are not held
// while it recovers; and if the process dies, the kernel allows what it
// held.
package protect

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/wire"
)

// Identifier gives the facts of an executed file from a descriptor the
// caller keeps open. *identify.Identifier is one (IdentifyFD).
type Identifier interface {
	IdentifyFD(fd int, path string) (wire.Facts, error)
}

// Reputation answers what the Security Network says of a file.
// *reputation.Checker is one.
type Reputation interface {
	// Cached returns a fresh cached verdict and its source, if there is
	// one.
	Cached(sha256 string) (wire.Reputation, bool)
	// Ask looks hashes up now, within ctx, and caches the answers.
	Ask(ctx context.Context, hashes []string) ([]wire.Reputation, error)
	// Unavailable says why nothing can be asked until the configuration
	// changes (no server is configured, or not one that may be used), or
	// nil. It must be cheap: it is asked before every hold.
	Unavailable() error
}

// Defaults of Options.
const (
	DefaultFirstSight  = 1500 * time.Millisecond
	DefaultWorkers     = 2
	DefaultBacklog     = 1024
	DefaultMaxHeld     = 1024
	DefaultCircuitMin  = 10 * time.Second
	DefaultCircuitMax  = 5 * time.Minute
	maxLookupsInFlight = 4
)

// Options configure a Guard. Identify and Reputation are required.
type Options struct {
	Identify   Identifier
	Reputation Reputation
	// Exceptions are the programs an administrator allowed whatever the
	// Security Network says; nil means none.
	Exceptions *Exceptions
	// Report receives every block, with the user ID of the process whose
	// execution was denied, from a worker goroutine without locks held.
	// It must not block for long. Nil discards.
	Report func(al api.Alert, uid int)
	// FirstSight bounds how long any execution is held (default 1.5 s,
	// the policy's first_sight_timeout_ms).
	FirstSight time.Duration
	// Paths, when set, limits the guard to the filesystems holding these
	// paths (tests use a private tmpfs); by default every local
	// filesystem is marked, and filesystems mounted later too.
	Paths []string
	// UserDirs are places people write to, where a program not yet known
	// to the Security Network is held while the cloud is asked. Default:
	// /tmp, /var/tmp, /dev/shm, /run/user and the people's home folders.
	// Files owned by someone other than root, or writable by group or
	// others, count as such places wherever they are.
	UserDirs []string
	// Workers identify and decide (default 2); Backlog bounds the events
	// waiting for them (default 1,024) and MaxHeld the executions held
	// for the cloud (default 1,024): beyond either, executions are
	// allowed at once.
	Workers, Backlog, MaxHeld int
	// CircuitMin and CircuitMax bound how long first-sight holds are
	// skipped after the cloud failed to answer in time (default 10 s,
	// doubling up to 5 min).
	CircuitMin, CircuitMax time.Duration
	Logger                 *slog.Logger
}

// Stats count what the guard did since it was made.
type Stats struct {
	// Events counts permission events read; each was answered.
	Events uint64 `json:"events"`
	// Denied counts executions denied; Held those held while the cloud
	// was asked; TimedOut those allowed by their deadline timer.
	Denied   uint64 `json:"denied"`
	Held     uint64 `json:"held"`
	TimedOut uint64 `json:"timed_out"`
	// Marked counts ignore marks set on files found good.
	Marked uint64 `json:"marked"`
	// Self counts the agent's own executions, allowed as read.
	Self uint64 `json:"self"`
	// Busy counts executions allowed at once because the backlog or the
	// held set was full; Failed those allowed because of an error
	// (identification, lookup).
	Busy   uint64 `json:"busy"`
	Failed uint64 `json:"failed"`
	// Skipped counts unfamiliar programs allowed without asking because
	// the circuit was open (the cloud recently failed to answer in time)
	// or the cloud cannot be asked at all (no server is configured).
	Skipped uint64 `json:"skipped"`
	// CircuitOpen is set while first-sight holds are skipped.
	CircuitOpen bool `json:"circuit_open"`
	// Active is true while the permission group exists and is marked.
	Active bool `json:"active"`
	// LastBlock is the most recent block.
	LastBlock *api.Alert `json:"last_block,omitempty"`
}

// counters are the live numbers behind Stats.
type counters struct {
	events, denied, held, timedOut, marked, self, busy, failed, skipped atomic.Uint64
}

// Guard is the permission group. Serve runs it; Stats and Invalidate are
// safe to call from any goroutine.
type Guard struct {
	opts    Options
	log     *slog.Logger
	self    int
	selfExe fileID
	users   []string
	c       counters
	circ    circuit
	active  atomic.Bool
	serving atomic.Bool
	// firstSight is how long an execution may be held, in nanoseconds.
	firstSight atomic.Int64

	// respMu protects fd against use after close: answers and marks hold
	// it for reading and check closed; the end of Serve takes it for
	// writing, answers what is left and closes the group.
	respMu sync.RWMutex
	fd     int
	closed bool

	// markMu orders ignore marks against Invalidate: a mark is set only
	// if no invalidation happened since its decision began (gen).
	markMu sync.RWMutex
	gen    atomic.Uint64

	liveMu sync.Mutex // protects live
	live   map[*event]struct{}

	lastMu    sync.Mutex // protects lastBlock
	lastBlock *api.Alert

	// toldMu protects told: why the cloud could not be asked, as last
	// logged, so that it is logged once per change of configuration.
	toldMu sync.Mutex
	told   string

	ask asker
}

// New returns a Guard; Serve starts it.
func New(opts Options) (*Guard, error) {
	if opts.Identify == nil || opts.Reputation == nil {
		return nil, errors.New("create guard: Identify and Reputation are required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.FirstSight <= 0 {
		opts.FirstSight = DefaultFirstSight
	}
	if opts.Workers <= 0 {
		opts.Workers = DefaultWorkers
	}
	if opts.Backlog <= 0 {
		opts.Backlog = DefaultBacklog
	}
	if opts.MaxHeld <= 0 {
		opts.MaxHeld = DefaultMaxHeld
	}
	if opts.CircuitMin <= 0 {
		opts.CircuitMin = DefaultCircuitMin
	}
	if opts.CircuitMax < opts.CircuitMin {
		opts.CircuitMax = max(DefaultCircuitMax, opts.CircuitMin)
	}
	if opts.UserDirs == nil {
		opts.UserDirs = DefaultUserDirs()
	}
	g := &Guard{
		opts:  opts,
		log:   opts.Logger.With("component", "protect"),
		self:  os.Getpid(),
		users: cleanDirs(opts.UserDirs),
		fd:    -1,
		live:  make(map[*event]struct{}),
		circ:  circuit{min: opts.CircuitMin, max: opts.CircuitMax, probeFor: 2 * opts.FirstSight},
	}
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/exe", &st); err == nil {
		g.selfExe = fileID{dev: st.Dev, ino: st.Ino}
	}
	g.firstSight.Store(int64(opts.FirstSight))
	g.ask.init(g)
	return g, nil
}

// SetFirstSight changes how long executions may be held (the policy's
// first_sight_timeout_ms); it applies to executions read from now on.
func (g *Guard) SetFirstSight(d time.Duration) {
	if d <= 0 {
		d = DefaultFirstSight
	}
	g.firstSight.Store(int64(d))
	g.circ.mu.Lock()
	g.circ.probeFor = 2 * d
	g.circ.mu.Unlock()
}

func (g *Guard) deadline() time.Duration { return time.Duration(g.firstSight.Load()) }

// Stats returns the counters.
func (g *Guard) Stats() Stats {
	s := Stats{
		Events:      g.c.events.Load(),
		Denied:      g.c.denied.Load(),
		Held:        g.c.held.Load(),
		TimedOut:    g.c.timedOut.Load(),
		Marked:      g.c.marked.Load(),
		Self:        g.c.self.Load(),
		Busy:        g.c.busy.Load(),
		Failed:      g.c.failed.Load(),
		Skipped:     g.c.skipped.Load(),
		CircuitOpen: g.circ.isOpen(),
		Active:      g.active.Load(),
	}
	g.lastMu.Lock()
	if g.lastBlock != nil {
		lb := *g.lastBlock
		s.LastBlock = &lb
	}
	g.lastMu.Unlock()
	return s
}

// Invalidate removes every ignore mark, so each file is decided again at
// its next execution. Call it when a verdict turned malicious or an
// exception was removed; marks being set by decisions already under way
// are dropped too.
func (g *Guard) Invalidate() {
	g.markMu.Lock()
	defer g.markMu.Unlock()
	g.gen.Add(1)
	g.respMu.RLock()
	defer g.respMu.RUnlock()
	if g.closed || g.fd < 0 {
		return
	}
	// Without FAN_MARK_FILESYSTEM or FAN_MARK_MOUNT, a flush removes the
	// group's inode marks: the ignore marks, and nothing else.
	if err := unix.FanotifyMark(g.fd, unix.FAN_MARK_FLUSH, 0, unix.AT_FDCWD, ""); err != nil {
		g.log.Warn("cannot remove ignore marks", "err", err)
	}
}

// fileID names an inode.
type fileID struct {
	dev uint64
	ino uint64
}

// Serve creates the permission group, marks the filesystems and answers
// every execution until ctx is cancelled; then it allows whatever it
// still holds, removes the group and returns ctx.Err(). It fails when the
// kernel or the privileges do not allow a permission group.
func (g *Guard) Serve(ctx context.Context) error {
	if !g.serving.CompareAndSwap(false, true) {
		return errors.New("serve guard: already serving")
	}
	defer g.serving.Store(false)
	fd, err := unix.FanotifyInit(unix.FAN_CLASS_CONTENT|unix.FAN_CLOEXEC|unix.FAN_NONBLOCK,
		unix.O_RDONLY|unix.O_LARGEFILE|unix.O_CLOEXEC)
	if err != nil {
		return fmt.Errorf("create permission group: %w", err)
	}
	g.respMu.Lock()
	g.fd, g.closed = fd, false
	g.respMu.Unlock()
	// From here on, whatever happens, the group ends answered and closed.
	defer g.shutdown()

	m, err := newMarker(g, fd)
	if err != nil {
		return err
	}
	defer m.close()
	if n := m.mark(); n == 0 {
		return fmt.Errorf("mark filesystems: %w", errNothingMarked)
	}
	w, err := newWaker(ctx)
	if err != nil {
		return err
	}
	defer w.close()

	work := make(chan *event, g.opts.Backlog)
	var wg sync.WaitGroup
	for range g.opts.Workers {
		wg.Go(func() {
			for e := range work {
				g.decide(ctx, e)
			}
		})
	}
	askCtx, stopAsk := context.WithCancel(ctx)
	wg.Go(func() { g.ask.serve(askCtx) })
	defer func() {
		close(work)
		stopAsk()
		wg.Wait()
	}()

	g.active.Store(true)
	defer g.active.Store(false)
	defer func() {
		st := g.Stats()
		g.log.Info("blocking at exec ends", "events", st.Events, "denied", st.Denied, "held", st.Held,
			"timed_out", st.TimedOut, "marked", st.Marked, "self", st.Self, "busy", st.Busy, "failed", st.Failed, "skipped", st.Skipped)
	}()
	g.log.Info("blocking at exec active", "filesystems", m.count(), "first_sight", g.deadline())
	return g.read(ctx, w, m, work)
}

// shutdown answers every execution still held, stops their timers and
// closes the group; later answers find it closed and do nothing. It runs
// once the reader and the workers are done, so no event is added
// meanwhile. (Each answer takes the event's lock and then respMu, as a
// timer's does; respMu is taken for writing only when none is held.)
func (g *Guard) shutdown() {
	g.liveMu.Lock()
	live := make([]*event, 0, len(g.live))
	for e := range g.live {
		live = append(live, e)
	}
	g.liveMu.Unlock()
	for _, e := range live {
		g.answer(e, true)
	}
	g.respMu.Lock()
	defer g.respMu.Unlock()
	if g.fd >= 0 {
		unix.Close(g.fd)
	}
	g.fd, g.closed = -1, true
}

// errNothingMarked means no filesystem could be marked.
var errNothingMarked = errors.New("nothing could be marked")
