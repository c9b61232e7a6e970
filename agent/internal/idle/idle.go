// Package idle tells whether a long-running loop is asleep with nothing
// pending for it, so that a test driving a fake clock moves the time on
// only once the loop has done everything the last change asked of it,
// however long that takes on a busy machine.
package idle

import "sync"

// Loop tracks one loop that sleeps in a select on one-slot wake-up
// channels and a timer. The loop calls Sleep right before it blocks and
// Woke right after; wake-ups are sent with Notify. The zero value is
// ready to use; a nil *Loop only sends (a loop nobody watches).
type Loop struct {
	mu      sync.Mutex // protects the fields below
	asleep  bool
	ready   bool // the timer it sleeps on had fired before it slept
	pending int  // wake-ups sent by Notify and not taken yet
	rounds  uint64
}

// Notify sends a wake-up on ch, a one-slot channel the loop selects on,
// without blocking: when one is pending already, nothing more is sent.
func (l *Loop) Notify(ch chan struct{}) {
	if l == nil {
		select {
		case ch <- struct{}{}:
		default:
		}
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	select {
	case ch <- struct{}{}:
		l.pending++
	default:
	}
}

// Sleep is called right before the loop blocks; ready says that the
// timer it is about to wait on has fired already.
func (l *Loop) Sleep(ready bool) {
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.asleep, l.ready = true, ready
	l.rounds++
}

// Woke is called right after the loop's select returned; took says it
// took a wake-up sent by Notify.
func (l *Loop) Woke(took bool) {
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.asleep, l.ready = false, false
	if took && l.pending > 0 {
		l.pending--
	}
}

// Settled reports whether the loop is asleep with no wake-up pending,
// and how many times it has gone to sleep: a test that fires the timer
// of a settled loop waits until the count has grown and the loop is
// settled again.
func (l *Loop) Settled() (settled bool, rounds uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.asleep && !l.ready && l.pending == 0, l.rounds
}
