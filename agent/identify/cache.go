package identify

import (
	"sync"

	"golang.org/x/sys/unix"
)

// Key identifies one version of one file: a change of contents changes
// the size, the mtime or at least the ctime (which user space cannot set).
type Key struct {
	dev, ino     uint64
	size         int64
	mtime, ctime int64 // nanoseconds since the epoch
}

func keyOf(st *unix.Stat_t) Key {
	return Key{
		dev:   uint64(st.Dev),
		ino:   st.Ino,
		size:  st.Size,
		mtime: st.Mtim.Nano(),
		ctime: st.Ctim.Nano(),
	}
}

// cacheEntry holds the facts of one file version, with the anonymised path
// it was first seen under, and that path as the kernel gave it (kept only
// when short: it tells, across restarts, which filesystem the entry came
// from; see persist.go).
type cacheEntry struct {
	key   Key
	facts Facts
	raw   string
	cost  int
	ref   bool // CLOCK reference bit
}

// entryOverhead is what an entry costs beyond its strings: the entry, its
// slot in the index, the ELF facts.
const entryOverhead = 320

// maxRawPath bounds the raw path an entry keeps.
const maxRawPath = 512

func entryCost(f *Facts, raw string) int {
	n := entryOverhead + len(f.SHA256) + len(f.Path) + len(f.Kind) + len(f.Interpreter) + len(raw)
	if f.ELF != nil {
		n += len(f.ELF.Machine) + len(f.ELF.Type) + len(f.ELF.Interpreter) + len(f.ELF.BuildID) + len(f.ELF.Malformed)
	}
	return n
}

// cache is a bounded map of file versions to facts with CLOCK (second
// chance) eviction: a hit sets a bit, the hand clears bits until it finds
// an entry not used since its last pass. It is bounded by entries and by
// the bytes its facts and paths take.
type cache struct {
	mu       sync.Mutex // protects the fields below
	idx      map[Key]int
	ents     []cacheEntry
	hand     int
	bytes    int
	dirty    bool // changed since the last save
	max      int
	maxBytes int
}

func newCache(max, maxBytes int) *cache {
	return &cache{idx: make(map[Key]int, min(max, 1024)), max: max, maxBytes: maxBytes}
}

// get returns the facts of key, with the path it was first seen under.
func (c *cache) get(key Key) (Facts, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	i, ok := c.idx[key]
	if !ok {
		return Facts{}, false
	}
	c.ents[i].ref = true
	return c.ents[i].facts, true
}

// put stores the facts of key, seen under the raw path.
func (c *cache) put(key Key, f Facts, raw string) {
	if len(raw) > maxRawPath {
		raw = ""
	}
	e := cacheEntry{key: key, facts: f, raw: raw}
	e.cost = entryCost(&f, raw)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dirty = true
	if i, ok := c.idx[key]; ok {
		c.bytes += e.cost - c.ents[i].cost
		c.ents[i] = e
		return
	}
	for len(c.ents) > 0 && (len(c.ents) >= c.max || c.bytes+e.cost > c.maxBytes) {
		c.evictOne()
	}
	c.idx[key] = len(c.ents)
	c.ents = append(c.ents, e)
	c.bytes += e.cost
}

// evictOne removes the entry under the CLOCK hand that was not used since
// the hand last passed; the last slot fills the hole.
func (c *cache) evictOne() {
	if c.hand >= len(c.ents) {
		c.hand = 0
	}
	for c.ents[c.hand].ref {
		c.ents[c.hand].ref = false
		c.hand = (c.hand + 1) % len(c.ents)
	}
	victim := c.hand
	delete(c.idx, c.ents[victim].key)
	c.bytes -= c.ents[victim].cost
	last := len(c.ents) - 1
	if victim != last {
		c.ents[victim] = c.ents[last]
		c.idx[c.ents[victim].key] = victim
	}
	c.ents[last] = cacheEntry{}
	c.ents = c.ents[:last]
}

// len returns the number of entries.
func (c *cache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.ents)
}
