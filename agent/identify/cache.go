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
// it was first seen under.
type cacheEntry struct {
	key   Key
	facts Facts
	cost  int
	ref   bool // CLOCK reference bit
}

// entryOverhead is what an entry costs beyond its strings: the entry, its
// slot in the index, the ELF facts.
const entryOverhead = 320

// Bounds of the paths kept to find each device's filesystem at a save.
const (
	maxRawPath = 1024
	maxDevs    = 256
)

func entryCost(f *Facts) int {
	n := entryOverhead + len(f.SHA256) + len(f.Path) + len(f.Kind) + len(f.Interpreter)
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
	// devPath holds a path (as the kernel gave it) on each device seen,
	// to find its filesystem when the cache is saved.
	devPath map[uint64]string
}

func newCache(max, maxBytes int) *cache {
	return &cache{idx: make(map[Key]int, min(max, 1024)), max: max, maxBytes: maxBytes, devPath: make(map[uint64]string)}
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

// put stores the facts of key, seen under the raw path ("" if unknown).
func (c *cache) put(key Key, f Facts, raw string) {
	e := cacheEntry{key: key, facts: f}
	e.cost = entryCost(&f)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dirty = true
	if _, ok := c.devPath[key.dev]; !ok && raw != "" && len(raw) <= maxRawPath && len(c.devPath) < maxDevs {
		c.devPath[key.dev] = raw
	}
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

// snapshot copies the entries and the device paths, and whether anything
// changed since the last snapshot; it marks the cache clean.
func (c *cache) snapshot() ([]cacheEntry, map[uint64]string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	dirty := c.dirty
	c.dirty = false
	paths := make(map[uint64]string, len(c.devPath))
	for d, p := range c.devPath {
		paths[d] = p
	}
	return append([]cacheEntry(nil), c.ents...), paths, dirty
}

// markDirty says the cache must be saved again (a save failed).
func (c *cache) markDirty() {
	c.mu.Lock()
	c.dirty = true
	c.mu.Unlock()
}

// clean says the cache holds what is on disk (it was just loaded).
func (c *cache) clean() {
	c.mu.Lock()
	c.dirty = false
	c.mu.Unlock()
}

// reset empties the cache.
func (c *cache) reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	clear(c.idx)
	clear(c.devPath)
	c.ents, c.hand, c.bytes, c.dirty = nil, 0, 0, false
}

// len returns the number of entries.
func (c *cache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.ents)
}
