package localapi

import (
	"context"
	"net"
	"os/user"
	"strconv"
	"sync"
	"time"
)

// Connection limits. The system agent's socket is open to every local
// user; each connection costs the agent a descriptor, a goroutine and
// buffers (about 20 KiB), and an event stream lives as long as its client
// wants. These bounds keep a user who opens thousands of connections (and
// never sends or reads) from exhausting the agent, while root, the tray
// and the CLI of everyone else are still answered.
//
// One person can act as many uids: the subordinate uids of their user
// namespaces (/etc/subuid) are real uids to the kernel. Those uids have
// no account, so they share one small pool; and every account keeps a
// few connections of its own even when all the others are taken.
const (
	// MaxConnsPerUser is how many connections one non-root uid may hold
	// open at once: a tray, a few CLI calls, and room to spare.
	MaxConnsPerUser = 32
	// MaxConns is how many connections all non-root uids together may
	// hold open at once, beyond the reserve below.
	MaxConns = 512
	// MaxConnsNoAccount is how many connections all uids without an
	// account (in the user database) may hold together.
	MaxConnsNoAccount = 64
	// ReservedPerAccount is how many connections each account may open
	// even when MaxConns is reached: its tray and a CLI call always get in.
	ReservedPerAccount = 4
)

// limits counts open connections per uid and refuses those over the
// bounds. Root's connections are counted in no bound. At most
// MaxConns + ReservedPerAccount × (accounts) connections are open.
type limits struct {
	perUser, total, noAccount, reserve int
	// exempt says which callers are not limited (root).
	exempt func(Cred) bool
	// account says whether a uid has an account.
	account func(uint32) bool

	mu            sync.Mutex // protects the fields below
	byUID         map[uint32]int
	open          int
	openNoAccount int
	refused       uint64
}

func newLimits(perUser, total int) *limits {
	return &limits{
		perUser:   perUser,
		total:     total,
		noAccount: MaxConnsNoAccount,
		reserve:   ReservedPerAccount,
		exempt:    func(c Cred) bool { return c.UID == 0 },
		account:   newAccountCache(time.Minute).has,
		byUID:     make(map[uint32]int),
	}
}

// acquire counts a new connection of c, or reports false when it is over
// a bound. It returns whether c was counted as an account.
func (l *limits) acquire(c Cred) (ok, account bool) {
	if l.exempt(c) {
		return true, true
	}
	account = c.UID != unknownUID && l.account(c.UID)
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.byUID[c.UID]
	switch {
	case n >= l.perUser,
		!account && l.openNoAccount >= l.noAccount,
		l.open >= l.total && !(account && n < l.reserve):
		l.refused++
		return false, account
	}
	l.byUID[c.UID]++
	l.open++
	if !account {
		l.openNoAccount++
	}
	return true, account
}

func (l *limits) release(c Cred, account bool) {
	if l.exempt(c) {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.open--
	if !account {
		l.openNoAccount--
	}
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

// accountCache remembers for a while whether uids have an account, so
// that a flood of connections does not read the user database for each.
type accountCache struct {
	ttl    time.Duration
	lookup func(uint32) bool

	mu      sync.Mutex // protects entries
	entries map[uint32]accountEntry
}

type accountEntry struct {
	ok bool
	at time.Time
}

// maxAccountCache bounds the uids remembered; beyond it the cache starts
// afresh.
const maxAccountCache = 4096

func newAccountCache(ttl time.Duration) *accountCache {
	return &accountCache{ttl: ttl, lookup: lookupAccount, entries: make(map[uint32]accountEntry)}
}

func (ac *accountCache) has(uid uint32) bool {
	now := time.Now()
	ac.mu.Lock()
	e, ok := ac.entries[uid]
	ac.mu.Unlock()
	if ok && now.Sub(e.at) < ac.ttl {
		return e.ok
	}
	found := ac.lookup(uid)
	ac.mu.Lock()
	if len(ac.entries) >= maxAccountCache {
		clear(ac.entries)
	}
	ac.entries[uid] = accountEntry{ok: found, at: now}
	ac.mu.Unlock()
	return found
}

func lookupAccount(uid uint32) bool {
	_, err := user.LookupId(strconv.FormatUint(uint64(uid), 10))
	return err == nil
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
		admitted, account := ll.lim.acquire(key)
		if !admitted {
			c.Close()
			continue
		}
		return &limitedConn{Conn: c, lim: ll.lim, key: key, account: account, cred: cred, known: ok}, nil
	}
}

// limitedConn releases its place in the limits when closed, once.
type limitedConn struct {
	net.Conn
	lim     *limits
	key     Cred
	account bool
	cred    Cred
	known   bool
	once    sync.Once
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.lim.release(c.key, c.account) })
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
