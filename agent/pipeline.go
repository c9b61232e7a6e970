package agent

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cloudprotect/cloudprotect/agent/execwatch"
	"github.com/cloudprotect/cloudprotect/agent/identify"
	"github.com/cloudprotect/cloudprotect/agent/queue"
)

// hashChecker is what the pipeline asks about each hash it queues: the
// reputation checker.
type hashChecker interface {
	Check(sha256, anonPath string)
}

// filesystemWatcher is an exec source that can watch the filesystem of a
// file it missed, and stop reporting a file (fanotify).
type filesystemWatcher interface {
	WatchFilesystemOf(fd int) error
	IgnoreFile(fd int) error
}

// Bounds of the pipeline's bookkeeping.
const (
	// maxWaiting bounds the large files waiting for their hash; beyond it
	// their executions are counted as unidentified.
	maxWaiting = 64
	// maxNotices bounds the process events held until the next
	// checkpoint; beyond it they are checked at once.
	maxNotices = 4096
	// programsTTL is how long an exec by a process waits to be matched
	// with the connector's event about that process.
	programsTTL = 10 * time.Second
	// maxProbes is how many processes per program and batch are asked
	// for their user.
	maxProbes = 3
)

// pipeline is the only writer to the queue during an epoch. It reads the
// sources' batches, identifies each file (a cache hit costs an fstat),
// aggregates the batch per program, queues it, asks for the reputation of
// what it queued, and learns which users ran each program. Large files
// are hashed by one worker goroutine whose results come back to the
// pipeline on a channel, with the executions that waited for them. One
// goroutine runs it; only the counters are read elsewhere.
type pipeline struct {
	collectorDeps
	// source, when the exec source is a filesystemWatcher, is asked to
	// watch the filesystem of a program it missed and to ignore loaders.
	// The collector sets it once the source is chosen, while the pipeline
	// already runs.
	source atomic.Pointer[filesystemWatcher]

	jobs    chan *identify.Job
	results chan jobResult
	// waiting holds the executions of large files being hashed.
	waiting map[identify.Key]*tally
	// batch aggregates the batch being handled, by SHA-256.
	batch map[string]*tally
	// notices are connector events waiting for the next checkpoint.
	notices []int32
	// programs counts, per process, the executed programs (not loaders)
	// that fanotify reported and no connector event has claimed yet.
	programs  map[int32]progCount
	lastPrune time.Time
	// marked holds the devices whose filesystem the source was asked to
	// watch after a miss.
	marked map[uint64]bool
	// loaders are the dynamic loaders seen, by path; interps maps the
	// interpreter named by a program to a loader's path.
	loaders map[string]*loader
	interps map[string]string

	missed       atomic.Uint64 // executions seen by the connector alone, gone before identified
	unidentified atomic.Uint64 // executions whose file could not be identified
	supplemented atomic.Uint64 // executions fanotify missed, identified through /proc
}

// tally is what a batch (or a large file's hash) brings for one program.
type tally struct {
	facts       identify.Facts
	execs       uint64
	loaded      bool
	first, last time.Time
	// pids are the latest processes that ran it, to learn their users.
	pids  [maxProbes]int32
	npids int
	uids  []uint32
}

// loader is a dynamic loader (ld.so). Once the source ignores it, its
// executions are counted from the programs that name it as their
// interpreter (derived): every dynamically linked program run runs it.
type loader struct {
	facts   identify.Facts
	derived bool
}

// Bounds of the loader bookkeeping.
const (
	maxLoaders = 16
	maxInterps = 256
)

type progCount struct {
	n  int
	at time.Time
}

type jobResult struct {
	key   identify.Key
	facts identify.Facts
	err   error
}

// setWatcher gives the pipeline the exec source, if it is a
// filesystemWatcher.
func (p *pipeline) setWatcher(src any) {
	if w, ok := src.(filesystemWatcher); ok {
		p.source.Store(&w)
	}
}

// watcher returns the exec source as a filesystemWatcher, nil if none.
func (p *pipeline) watcher() filesystemWatcher {
	if w := p.source.Load(); w != nil {
		return *w
	}
	return nil
}

func newPipeline(d collectorDeps) *pipeline {
	return &pipeline{
		collectorDeps: d,
		jobs:          make(chan *identify.Job, maxWaiting),
		results:       make(chan jobResult, maxWaiting),
		waiting:       make(map[identify.Key]*tally),
		batch:         make(map[string]*tally),
		programs:      make(map[int32]progCount),
		marked:        make(map[uint64]bool),
		loaders:       make(map[string]*loader),
		interps:       make(map[string]string),
	}
}

// run handles batches from in until in is closed. When ectx's cause is
// errWithdrawn, what arrives is released unread; otherwise everything is
// identified and committed, large files waited for (up to
// drainJobsWithin), before run returns.
func (p *pipeline) run(ectx context.Context, in <-chan []execwatch.Event) error {
	jobCtx, cancelJobs := context.WithCancel(context.Background())
	defer cancelJobs()
	workerDone := make(chan struct{})
	go func() {
		defer close(workerDone)
		defer close(p.results)
		for j := range p.jobs {
			f, err := j.Run(jobCtx)
			p.results <- jobResult{key: j.Key(), facts: f, err: err}
		}
	}()
	discarding := func() bool { return errors.Is(context.Cause(ectx), errWithdrawn) }

	for in != nil {
		select {
		case b, ok := <-in:
			if !ok {
				in = nil
				break
			}
			if discarding() {
				closeAll(b)
				continue
			}
			p.handle(b)
		case r := <-p.results:
			if !discarding() {
				p.finish(r)
			}
		}
	}

	// Every source has returned. Check what the connector reported last,
	// then wait for the large files, unless consent was withdrawn.
	if !discarding() {
		p.judge()
		p.commit()
	} else {
		cancelJobs()
	}
	close(p.jobs)
	deadline := time.NewTimer(drainJobsWithin)
	defer deadline.Stop()
	for r := range p.results {
		if !discarding() {
			p.finish(r)
		}
		select {
		case <-deadline.C:
			p.log.Warn("large files still hashed at the stop are not counted", "waiting", len(p.waiting))
			cancelJobs()
		default:
		}
	}
	<-workerDone
	for _, t := range p.waiting {
		p.unidentified.Add(t.execs)
	}
	clear(p.waiting)
	if discarding() {
		return nil
	}
	if err := p.queue.Flush(); err != nil {
		p.log.Warn("commit statistics at the stop", "err", err)
	}
	return nil
}

// handle identifies one batch and queues it.
func (p *pipeline) handle(b []execwatch.Event) {
	for i := range b {
		ev := &b[i]
		switch ev.Kind {
		case execwatch.KindExec, execwatch.KindLoaded:
			p.file(ev, true)
		case execwatch.KindProcess:
			p.notices = append(p.notices, ev.PID)
			if len(p.notices) >= maxNotices {
				p.judge()
			}
		case execwatch.KindCheckpoint:
			p.judge()
		}
	}
	closeAll(b)
	p.commit()
}

// closeAll closes the events' descriptors. The kernel gives a batch's
// descriptors the lowest free numbers, mostly one after the other, so
// runs of consecutive numbers are closed with one close_range(2) each
// instead of a close(2) per event.
func closeAll(b []execwatch.Event) {
	fds := make([]int, 0, len(b))
	for i := range b {
		if b[i].FD >= 0 {
			fds = append(fds, b[i].FD)
			b[i].FD = -1
		}
	}
	slices.Sort(fds)
	for i := 0; i < len(fds); {
		j := i
		for j+1 < len(fds) && fds[j+1] == fds[j]+1 {
			j++
		}
		if j == i || unix.CloseRange(uint(fds[i]), uint(fds[j]), 0) != nil {
			for k := i; k <= j; k++ {
				unix.Close(fds[k])
			}
		}
		i = j + 1
	}
}

// file identifies the file of one event and adds it to the batch. reported
// says the source reported it (rather than the pipeline finding it
// through /proc), so that it may answer a connector event.
func (p *pipeline) file(ev *execwatch.Event, reported bool) {
	if ev.Time.IsZero() {
		ev.Time = time.Now()
	}
	var facts identify.Facts
	var job *identify.Job
	var err error
	if ev.FD >= 0 {
		facts, job, err = p.ident.IdentifyFile(ev.FD, func() string {
			if ev.Path != "" {
				return ev.Path
			}
			return execwatch.FDPath(ev.FD)
		})
	} else {
		facts, job, err = p.ident.IdentifyPath(ev.Path)
	}
	exec := ev.Kind == execwatch.KindExec
	isLoader := err == nil && job == nil && identify.IsLoader(facts)
	if reported && exec && ev.PID > 0 && !isLoader {
		p.sawProgram(ev.PID, ev.Time)
	}
	switch {
	case job != nil:
		p.wait(job, ev)
	case err != nil:
		if exec {
			p.unidentified.Add(1)
		}
		p.log.Debug("identify", "path", ev.Path, "err", err)
	case isLoader && exec && reported:
		p.loaderRan(ev, facts)
	default:
		p.add(facts, ev)
		if exec {
			p.ranWithLoader(facts, ev)
		}
	}
}

// add counts the event in the batch's tally of the file.
func (p *pipeline) add(facts identify.Facts, ev *execwatch.Event) {
	t := p.batch[facts.SHA256]
	if t == nil {
		t = &tally{facts: facts, first: ev.Time}
		p.batch[facts.SHA256] = t
	}
	t.note(ev)
}

// loaderRan counts an execution of a dynamic loader the source reported,
// unless its executions are derived from the programs by now, and asks
// the source to stop reporting it. The switch happens at one of its own
// events: every program handled before was reported with its loader
// event before this one, every program after is counted as running it,
// so each run counts once.
func (p *pipeline) loaderRan(ev *execwatch.Event, facts identify.Facts) {
	path := ev.Path
	if path == "" {
		path = execwatch.FDPath(ev.FD)
	}
	l := p.loaders[path]
	if l != nil && l.derived && l.facts.SHA256 == facts.SHA256 {
		return // counted from its program
	}
	p.add(facts, ev)
	w := p.watcher()
	if path == "" || w == nil || ev.FD < 0 {
		return
	}
	if l == nil || l.facts.SHA256 != facts.SHA256 {
		if len(p.loaders) >= maxLoaders {
			return
		}
		l = &loader{facts: facts}
		p.loaders[path] = l
	}
	if err := w.IgnoreFile(ev.FD); err != nil {
		p.log.Debug("cannot ignore the dynamic loader", "path", path, "err", err)
		return
	}
	l.derived = true
}

// ranWithLoader counts a run of the dynamic loader a program names, once
// that loader's executions are derived from its programs.
func (p *pipeline) ranWithLoader(facts identify.Facts, ev *execwatch.Event) {
	if facts.ELF == nil || facts.ELF.Interpreter == "" || len(p.loaders) == 0 {
		return
	}
	interp := facts.ELF.Interpreter
	path, ok := p.interps[interp]
	if !ok {
		path, _ = filepath.EvalSymlinks(interp)
		if len(p.interps) >= maxInterps {
			clear(p.interps)
		}
		p.interps[interp] = path
	}
	if l := p.loaders[path]; l != nil && l.derived {
		t := p.batch[l.facts.SHA256]
		if t == nil {
			t = &tally{facts: l.facts, first: ev.Time}
			p.batch[l.facts.SHA256] = t
		}
		t.execs++
		t.first, t.last = minTime(t.first, ev.Time), maxTime(t.last, ev.Time)
	}
}

func minTime(a, b time.Time) time.Time {
	if a.IsZero() || b.Before(a) {
		return b
	}
	return a
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// note adds one event to the tally.
func (t *tally) note(ev *execwatch.Event) {
	if ev.Kind == execwatch.KindLoaded {
		t.loaded = true
	} else {
		t.execs++
	}
	if ev.Time.Before(t.first) || t.first.IsZero() {
		t.first = ev.Time
	}
	if ev.Time.After(t.last) {
		t.last = ev.Time
	}
	if ev.UID != execwatch.UIDUnknown {
		t.addUID(ev.UID)
	}
	if ev.PID > 0 {
		if t.npids < len(t.pids) {
			t.npids++
		}
		copy(t.pids[1:t.npids], t.pids[:t.npids-1])
		t.pids[0] = ev.PID
	}
}

func (t *tally) addUID(uid uint32) {
	for _, u := range t.uids {
		if u == uid {
			return
		}
	}
	t.uids = append(t.uids, uid)
}

// merge adds o's events to t.
func (t *tally) merge(o *tally) {
	t.execs += o.execs
	t.loaded = t.loaded || o.loaded
	if t.first.IsZero() || (!o.first.IsZero() && o.first.Before(t.first)) {
		t.first = o.first
	}
	if o.last.After(t.last) {
		t.last = o.last
	}
	for _, u := range o.uids {
		t.addUID(u)
	}
}

// wait holds the event of a large file until its job reports back.
func (p *pipeline) wait(job *identify.Job, ev *execwatch.Event) {
	key := job.Key()
	t := p.waiting[key]
	switch {
	case t != nil:
		job.Close() // the same file version is being hashed already
	case len(p.waiting) >= maxWaiting:
		job.Close()
		if ev.Kind == execwatch.KindExec {
			p.unidentified.Add(1)
		}
		p.log.Warn("too many large files waiting to be hashed; one execution is not counted", "path", job.Path())
		return
	default:
		select {
		case p.jobs <- job:
		default:
			job.Close()
			if ev.Kind == execwatch.KindExec {
				p.unidentified.Add(1)
			}
			return
		}
		t = &tally{first: ev.Time}
		p.waiting[key] = t
	}
	t.note(ev)
	// The processes may be gone when the hash is known: ask now.
	p.probe(t)
	t.npids = 0
}

// finish queues the executions that waited for a large file's hash.
func (p *pipeline) finish(r jobResult) {
	t := p.waiting[r.key]
	delete(p.waiting, r.key)
	if t == nil {
		return
	}
	if r.err != nil {
		p.unidentified.Add(t.execs)
		p.log.Debug("large file not identified", "err", r.err)
		return
	}
	t.facts = r.facts
	if b := p.batch[r.facts.SHA256]; b != nil {
		b.merge(t)
	} else {
		p.batch[r.facts.SHA256] = t
	}
	for range t.execs {
		p.ranWithLoader(r.facts, &execwatch.Event{Time: t.last})
	}
	p.commit()
}

// commit queues the batch's tallies, asks for their reputation and
// remembers who ran them.
func (p *pipeline) commit() {
	if len(p.batch) == 0 {
		return
	}
	for sha, t := range p.batch {
		p.probe(t)
		if p.beforeAdd != nil {
			p.beforeAdd()
		}
		err := p.queue.Add(queue.Event{Facts: t.facts, Execs: t.execs, Loaded: t.loaded, Time: t.first, Last: t.last})
		if err != nil {
			p.log.Warn("queue event", "err", err)
			continue
		}
		p.rep.Check(sha, t.facts.Path)
		for _, u := range t.uids {
			p.runners.add(sha, u)
		}
	}
	clear(p.batch)
	p.afterBatch()
}

// probe learns the users of the tally's latest processes from the owner
// of /proc/PID, newest first, until a process is gone: if the newest
// exited, the older ones did too.
func (p *pipeline) probe(t *tally) {
	for i := 0; i < t.npids; i++ {
		uid, ok := procUID(t.pids[i])
		if !ok {
			break
		}
		t.addUID(uid)
	}
	t.npids = 0
}

// procUID is the owner of /proc/PID: the process's user.
func procUID(pid int32) (uint32, bool) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/"+strconv.Itoa(int(pid)), &st); err != nil {
		return 0, false
	}
	return st.Uid, true
}

// sawProgram notes that fanotify reported a program executed by pid.
func (p *pipeline) sawProgram(pid int32, at time.Time) {
	c := p.programs[pid]
	p.programs[pid] = progCount{n: c.n + 1, at: at}
}

// judge matches the connector's events with the programs fanotify
// reported: each event claims one program of its process. An event that
// finds none is an execution fanotify missed; the program is found
// through /proc/PID/exe, or counted as missed when the process is gone.
func (p *pipeline) judge() {
	for _, pid := range p.notices {
		if c := p.programs[pid]; c.n > 0 {
			if c.n--; c.n == 0 {
				delete(p.programs, pid)
			} else {
				p.programs[pid] = c
			}
			continue
		}
		p.inspect(pid)
	}
	p.notices = p.notices[:0]
	if now := time.Now(); now.Sub(p.lastPrune) > programsTTL {
		for pid, c := range p.programs {
			if now.Sub(c.at) > programsTTL {
				delete(p.programs, pid)
			}
		}
		p.lastPrune = now
	}
}

// inspect identifies the program process pid executes, which fanotify
// did not report, and asks the source to watch its filesystem.
func (p *pipeline) inspect(pid int32) {
	dir := "/proc/" + strconv.Itoa(int(pid))
	fd, err := unix.Open(dir+"/exe", unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		p.missed.Add(1)
		return
	}
	defer unix.Close(fd)
	ev := execwatch.Event{FD: fd, PID: pid, UID: execwatch.UIDUnknown, Time: time.Now(), Kind: execwatch.KindExec}
	var st unix.Stat_t
	if unix.Stat(dir, &st) == nil {
		ev.UID = st.Uid
	}
	ev.Path, _ = readlink(dir + "/exe")
	p.supplemented.Add(1)
	p.file(&ev, false)
	if w := p.watcher(); w != nil && unix.Fstat(fd, &st) == nil && !p.marked[st.Dev] {
		if len(p.marked) >= 1024 {
			clear(p.marked)
		}
		p.marked[st.Dev] = true
		if err := w.WatchFilesystemOf(fd); err != nil {
			p.log.Debug("cannot watch the filesystem of a missed program", "path", ev.Path, "err", err)
		} else {
			p.log.Info("watching the filesystem of a program executions were missed on", "path", ev.Path)
		}
	}
}

func readlink(path string) (string, error) {
	var buf [unix.PathMax]byte
	n, err := unix.Readlink(path, buf[:])
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}
