package localapi

import (
	"context"
	"net"
	"sync"
)

// Connection limits. The system agent's socket is open to every local
// user; each connection costs the agent a descriptor, a goroutine and
// buffers, and an event stream lives as long as its client wants. These
// bounds keep a user who opens thousands of connections (and never sends
// or reads) from exhausting the agent, while root, the tray and the CLI
// of everyone else are still answered.
const (
	// MaxConnsPerUser is how many connections one non-root user may hold
	// open at once: a tray, a few CLI calls, and room to spare.
	MaxConnsPerUser = 32
	// MaxConns is how many connections all non-root users together may
	// hold open at once.
	MaxConns = 512
)

// limits counts open connections per uid and refuses those over the
// bounds. Root's connections are counted in no bound.
type limits struct {
	perUser, total int
	// exempt says which callers are not limited (root).
	exempt func(Cred) bool

	mu      sync.Mutex // protects byUID, open and refused
	byUID   map[uint32]int
	open    int
	refused uint64
}

func newLimits(perUser, total int) *limits {
	return &limits{
		perUser: perUser,
		total:   total,
		exempt:  func(c Cred) bool { return c.UID == 0 },
		byUID:   make(map[uint32]int),
	}
}

// acquire counts a new connection of c, or reports false when it is over
// a bound.
func (l *limits) acquire(c Cred) bool {
	if l.exempt(c) {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.byUID[c.UID] >= l.perUser || l.open >= l.total {
		l.refused++
		return false
	}
	l.byUID[c.UID]++
	l.open++
	return true
}

func (l *limits) release(c Cred) {
	if l.exempt(c) {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.open--
	if l.byUID[c.UID]--; l.byUID[c.UID] <= 0 {
		delete(l.byUID, c.UID)
	}
}

// Refused returns how many connections were closed at once for being over
// a bound.
func (l *limits) Refused() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.refused
}

// limitListener reads each accepted connection's credentials and closes
// at once those over the limits. A connection whose caller is unknown
// counts as the user nobody knows: it is limited like any other.
type limitListener struct {
	net.Listener
	lim *limits
}

// unknownUID stands for callers without credentials in the limits.
const unknownUID = ^uint32(0)

func (ll *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := ll.Listener.Accept()
		if err != nil {
			return nil, err
		}
		cred, ok := peerCred(c)
		key := cred
		if !ok {
			key = Cred{UID: unknownUID}
		}
		if !ll.lim.acquire(key) {
			c.Close()
			continue
		}
		return &limitedConn{Conn: c, lim: ll.lim, key: key, cred: cred, known: ok}, nil
	}
}

// limitedConn releases its place in the limits when closed, once.
type limitedConn struct {
	net.Conn
	lim   *limits
	key   Cred
	cred  Cred
	known bool
	once  sync.Once
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.lim.release(c.key) })
	return err
}

// connCred puts the caller's credentials, read when the connection was
// accepted, in the connection's context.
func connCred(ctx context.Context, c net.Conn) context.Context {
	if lc, ok := c.(*limitedConn); ok {
		if !lc.known {
			return ctx
		}
		return context.WithValue(ctx, credKey{}, lc.cred)
	}
	if cred, ok := peerCred(c); ok {
		return context.WithValue(ctx, credKey{}, cred)
	}
	return ctx
}
