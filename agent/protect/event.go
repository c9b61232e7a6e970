package protect

import (
	"encoding/binary"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// event is one execution the kernel holds until it is answered.
//
// Its descriptor identifies it in the answer, so the descriptor is
// closed only after the answer is written: otherwise its number could be
// reused by a newer event, which the late answer would then decide. One
// owner at a time (the reader, a worker, then the asker while it is held)
// calls release when it is done; the deadline timer only answers.
type event struct {
	fd   int
	pid  int
	read time.Time

	mu       sync.Mutex // protects the fields below
	answered bool
	released bool
	held     bool // waiting in the asker for the cloud
	timer    *time.Timer
}

// newEvent registers a permission event and arms its deadline: whatever
// else happens, the execution is allowed when the timer fires.
func (g *Guard) newEvent(fd, pid int, now time.Time) *event {
	e := &event{fd: fd, pid: pid, read: now}
	e.mu.Lock()
	e.timer = time.AfterFunc(g.deadline(), func() { g.expire(e) })
	e.mu.Unlock()
	g.liveMu.Lock()
	g.live[e] = struct{}{}
	g.liveMu.Unlock()
	g.c.events.Add(1)
	return e
}

// expire runs when an event's deadline passes: the execution is allowed.
// A held event first opens the circuit (the cloud was too slow), so the
// executions that follow this one, once it runs, do not wait as well.
func (g *Guard) expire(e *event) {
	e.mu.Lock()
	held, answered := e.held, e.answered
	e.mu.Unlock()
	if answered {
		return
	}
	if held {
		g.circ.failure(time.Now())
	}
	if !g.answer(e, true) {
		return
	}
	g.c.timedOut.Add(1)
	if held {
		g.ask.drop(e)
	}
	g.log.Debug("execution allowed at its deadline", "pid", e.pid, "held", held)
}

// answer allows or denies e unless it was answered already, and reports
// whether this call answered it.
func (g *Guard) answer(e *event, allow bool) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.answered {
		return false
	}
	e.answered = true
	e.timer.Stop()
	resp := uint32(unix.FAN_DENY)
	if allow {
		resp = unix.FAN_ALLOW
	}
	g.respMu.RLock()
	if !g.closed {
		g.writeResponse(e.fd, resp)
	}
	g.respMu.RUnlock()
	return true
}

// release ends the owner's use of e: it is allowed if nobody answered it
// yet, and its descriptor is closed.
func (g *Guard) release(e *event) {
	g.answer(e, true)
	e.mu.Lock()
	if e.released {
		e.mu.Unlock()
		return
	}
	e.released = true
	e.mu.Unlock()
	unix.Close(e.fd)
	g.liveMu.Lock()
	delete(g.live, e)
	g.liveMu.Unlock()
}

// writeResponse writes a struct fanotify_response; the caller holds
// respMu (for reading or writing) and has checked the group is open.
func (g *Guard) writeResponse(fd int, resp uint32) {
	var b [8]byte
	binary.NativeEndian.PutUint32(b[0:], uint32(int32(fd)))
	binary.NativeEndian.PutUint32(b[4:], resp)
	for {
		_, err := unix.Write(g.fd, b[:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			// ENOENT: the kernel no longer holds it (the process died).
			g.log.Debug("answer execution", "err", err)
		}
		return
	}
}
