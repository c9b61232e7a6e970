package execwatch

import (
	"context"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultPollInterval is the period of the /proc polling source.
const DefaultPollInterval = 2 * time.Second

// ProcPoll lists /proc at a fixed interval and reports the executable of
// every process it has not seen before (by PID and start time), and again
// when the process executes another program. It needs no privilege and
// no kernel feature, and misses every program that starts and exits
// between two scans. Processes of other users are invisible without
// root. The first scan reports the processes already running.
type ProcPoll struct {
	log        *slog.Logger
	interval   time.Duration
	maxPending int
	proc       string

	serving atomic.Bool
	c       counters
	ready   chan struct{}
	once    sync.Once // closes ready
}

// NewProcPoll returns the /proc polling source.
func NewProcPoll(opts Options) *ProcPoll {
	iv := opts.PollInterval
	if iv <= 0 {
		iv = DefaultPollInterval
	}
	return &ProcPoll{
		log:        orDiscard(opts.Logger).With("source", "proc-poll"),
		interval:   iv,
		maxPending: opts.maxPending(),
		proc:       "/proc",
		ready:      make(chan struct{}),
	}
}

// Ready implements Source: closed once the first scan is done.
func (s *ProcPoll) Ready() <-chan struct{} { return s.ready }

// Name implements Source.
func (s *ProcPoll) Name() string { return "proc-poll" }

// Limited implements Source.
func (s *ProcPoll) Limited() (bool, string) {
	return true, "programs are sampled every " + s.interval.String() + ", so short-lived programs are missed"
}

// Stats implements Source.
func (s *ProcPoll) Stats() Stats { return s.c.stats() }

// procKey identifies one process: a PID is reused, its start time (in
// clock ticks since boot) is not.
type procKey struct {
	pid   int
	start uint64
}

// exeID is the file a process executes; a process that executes another
// program keeps its key and changes its exeID.
type exeID struct{ dev, ino uint64 }

// Serve implements Source.
func (s *ProcPoll) Serve(ctx context.Context, out chan<- []Event) error {
	if !s.serving.CompareAndSwap(false, true) {
		return errBusy
	}
	defer s.serving.Store(false)
	s.log.Info("watching executions", "interval", s.interval)

	d := &deliverer{out: out, max: s.maxPending, c: &s.c, log: s.log}
	defer d.discard()
	seen := make(map[procKey]exeID)
	self := os.Getpid()
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for first := true; ; first = false {
		s.scan(seen, self, d)
		if first {
			s.once.Do(func() { close(s.ready) })
		}
		d.flush()
		select {
		case <-ctx.Done():
			d.deliver()
			return ctx.Err()
		case <-t.C:
		}
	}
}

// scan reports the processes not in seen, or executing another program
// than when last seen, and forgets those that ended.
func (s *ProcPoll) scan(seen map[procKey]exeID, self int, d *deliverer) {
	ents, err := os.ReadDir(s.proc)
	if err != nil {
		s.log.Warn("cannot list processes", "err", err)
		return
	}
	now := time.Now()
	alive := make(map[procKey]exeID, len(seen))
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		start, ok := s.startTime(pid)
		if !ok {
			continue
		}
		k := procKey{pid, start}
		var st unix.Stat_t
		var id exeID
		if unix.Stat(s.proc+"/"+strconv.Itoa(pid)+"/exe", &st) == nil {
			id = exeID{uint64(st.Dev), st.Ino}
		}
		alive[k] = id
		if prev, ok := seen[k]; ok && prev == id {
			continue
		}
		if ev, ok := procExe(int32(pid), now); ok {
			// Remembered as the file reported: the process may have
			// executed it since it was looked at above, and is not
			// reported again for that.
			var fst unix.Stat_t
			if ev.FD >= 0 && unix.Fstat(ev.FD, &fst) == nil {
				alive[k] = exeID{uint64(fst.Dev), fst.Ino}
			}
			d.add(ev)
		}
		// A kernel thread or a process we may not inspect has no
		// executable to report; it is remembered all the same.
	}
	clear(seen)
	for k, id := range alive {
		seen[k] = id
	}
}

// startTime reads field 22 of /proc/PID/stat. The command name (field 2)
// may hold spaces and parentheses, so fields are counted after its last ')'.
func (s *ProcPoll) startTime(pid int) (uint64, bool) {
	data, err := os.ReadFile(s.proc + "/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, false
	}
	return parseStartTime(string(data))
}

func parseStartTime(stat string) (uint64, bool) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(stat[i+1:])
	// f[0] is field 3 (state); start time is field 22.
	if len(f) < 20 {
		return 0, false
	}
	v, err := strconv.ParseUint(f[19], 10, 64)
	return v, err == nil
}
