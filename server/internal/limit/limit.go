// Package limit bounds how often one source address may do something
// (register an installation, sign in to the console): a token bucket per
// address, and the reading of a request's source address behind trusted
// reverse proxies.
package limit

import (
	"math"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Limiter is a token bucket per source address: each address may do
// burst things at once and then one every interval. IPv6 addresses count
// per /64, the block one subscriber usually holds. It remembers at most
// maxAddrs addresses; beyond that it forgets those whose bucket has
// refilled, and if none has, an arbitrary one.
type Limiter struct {
	burst    float64
	interval time.Duration
	maxAddrs int

	mu      sync.Mutex // protects buckets
	buckets map[netip.Prefix]*bucket
}

type bucket struct {
	tokens float64
	at     time.Time // when tokens was last brought up to date
}

// New returns a Limiter that allows burst at once and then one every
// interval, remembering at most maxAddrs addresses.
func New(burst int, interval time.Duration, maxAddrs int) *Limiter {
	return &Limiter{burst: float64(burst), interval: interval, maxAddrs: maxAddrs, buckets: map[netip.Prefix]*bucket{}}
}

// Allow takes a token for addr as of now. When there is none it returns
// false and how long until there is one. A nil Limiter allows all.
func (l *Limiter) Allow(addr netip.Addr, now time.Time) (bool, time.Duration) {
	if l == nil || l.burst <= 0 {
		return true, 0
	}
	key := addrKey(addr)
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets[key]
	if b == nil {
		if len(l.buckets) >= l.maxAddrs {
			l.evictLocked(now)
		}
		b = &bucket{tokens: l.burst, at: now}
		l.buckets[key] = b
	}
	l.refill(b, now)
	if b.tokens >= 1 {
		b.tokens--
		return true, 0
	}
	wait := time.Duration((1 - b.tokens) * float64(l.interval))
	return false, wait
}

func (l *Limiter) refill(b *bucket, now time.Time) {
	if d := now.Sub(b.at); d > 0 {
		b.tokens = math.Min(l.burst, b.tokens+float64(d)/float64(l.interval))
		b.at = now
	}
}

func (l *Limiter) evictLocked(now time.Time) {
	for k, b := range l.buckets {
		l.refill(b, now)
		if b.tokens >= l.burst {
			delete(l.buckets, k)
		}
	}
	for k := range l.buckets {
		if len(l.buckets) < l.maxAddrs {
			break
		}
		delete(l.buckets, k)
	}
}

// addrKey is the block an address is counted in.
func addrKey(a netip.Addr) netip.Prefix {
	a = a.Unmap()
	bits := 32
	if a.Is6() {
		bits = 64
	}
	p, _ := a.Prefix(bits) // bits fits the address family
	return p
}

// RetryAfter formats a wait as whole seconds, at least 1, for a
// Retry-After header.
func RetryAfter(d time.Duration) string {
	s := int64(math.Ceil(d.Seconds()))
	if s < 1 {
		s = 1
	}
	return strconv.FormatInt(s, 10)
}

// ClientAddr returns the address a request came from: the peer, or, when
// the peer is one of the trusted proxies, the last address in
// X-Forwarded-For that is not a trusted proxy.
func ClientAddr(r *http.Request, proxies []netip.Prefix) netip.Addr {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	peer, err := netip.ParseAddr(host)
	if err != nil {
		return netip.IPv4Unspecified()
	}
	peer = peer.Unmap()
	if !inPrefixes(peer, proxies) {
		return peer
	}
	hops := strings.Split(strings.Join(r.Header.Values("X-Forwarded-For"), ","), ",")
	for i := len(hops) - 1; i >= 0; i-- {
		a, err := netip.ParseAddr(strings.TrimSpace(hops[i]))
		if err != nil {
			return peer // a malformed hop: count the request against the proxy
		}
		a = a.Unmap()
		if !inPrefixes(a, proxies) {
			return a
		}
	}
	return peer
}

func inPrefixes(a netip.Addr, ps []netip.Prefix) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// Forgive forgets what addr used, giving it a full burst again.
func (l *Limiter) Forgive(addr netip.Addr) {
	if l == nil {
		return
	}
	l.mu.Lock()
	delete(l.buckets, addrKey(addr))
	l.mu.Unlock()
}
