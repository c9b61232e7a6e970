package localapi

import (
	"sync"

	"github.com/cloudprotect/cloudprotect/agent/api"
)

// hubBuffer is how many events a subscriber may fall behind before it is
// dropped; a dropped client reconnects and starts from the current status.
const hubBuffer = 32

// Hub fans events out to the streams of GET /v1/events. Publish never
// blocks: a subscriber that does not keep up is closed, so a slow or stuck
// reader costs a bounded buffer and nothing else.
type Hub struct {
	mu   sync.Mutex // protects subs
	subs map[chan api.Event]struct{}
}

// NewHub returns an empty hub.
func NewHub() *Hub { return &Hub{subs: make(map[chan api.Event]struct{})} }

// Subscribe returns a channel of events and a function that ends the
// subscription. The channel is closed when the subscriber fell behind.
func (h *Hub) Subscribe() (<-chan api.Event, func()) {
	ch := make(chan api.Event, hubBuffer)
	h.mu.Lock()
	h.subs[ch] = struct{}{}
	h.mu.Unlock()
	return ch, func() {
		h.mu.Lock()
		if _, ok := h.subs[ch]; ok {
			delete(h.subs, ch)
			close(ch)
		}
		h.mu.Unlock()
	}
}

// Publish sends ev to every subscriber.
func (h *Hub) Publish(ev api.Event) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for ch := range h.subs {
		select {
		case ch <- ev:
		default:
			delete(h.subs, ch)
			close(ch)
		}
	}
}

// Len returns the number of subscribers.
func (h *Hub) Len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.subs)
}
