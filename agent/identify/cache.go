package identify

import (
	"sync"

	"golang.org/x/sys/unix"
)

// fileKey identifies one version of one file: a change of contents changes
// the size, the mtime or at least the ctime (which user space cannot set).
type fileKey struct {
	dev, ino     uint64
	size         int64
	mtime, ctime int64 // nanoseconds since the epoch
}

func keyOf(st *unix.Stat_t) fileKey {
	return fileKey{
		dev:   uint64(st.Dev),
		ino:   st.Ino,
		size:  st.Size,
		mtime: st.Mtim.Nano(),
		ctime: st.Ctim.Nano(),
	}
}

// cacheEntry holds the facts of one file version without its path, plus
// the last path it was seen under, already anonymised, so a repeated exec
// of the same path costs no string work.
type cacheEntry struct {
	key   fileKey
	facts Facts // Path and PackageManaged unset
	raw   string
	anon  string
	pkg   bool
	ref   bool // CLOCK reference bit
}

// cache is a fixed-size map of file versions to facts with CLOCK (second
// chance) eviction: a hit sets a bit, the hand clears bits until it finds
// an entry not used since its last pass.
type cache struct {
	mu   sync.Mutex // protects idx, ents and hand
	idx  map[fileKey]int
	ents []cacheEntry
	hand int
	max  int
}

func newCache(max int) *cache {
	return &cache{idx: make(map[fileKey]int, min(max, 1024)), max: max}
}

// get returns the facts of key with Path and PackageManaged for path.
func (c *cache) get(key fileKey, path string, anon *Anonymizer) (Facts, bool) {
	c.mu.Lock()
	i, ok := c.idx[key]
	if !ok {
		c.mu.Unlock()
		return Facts{}, false
	}
	e := &c.ents[i]
	e.ref = true
	f := e.facts
	if e.raw == path {
		f.Path, f.PackageManaged = e.anon, e.pkg
		c.mu.Unlock()
		return f, true
	}
	c.mu.Unlock()

	f.Path, f.PackageManaged = pathOrUnknown(anon.Anonymize(path)), PackageManaged(path)
	c.mu.Lock()
	if i < len(c.ents) && c.ents[i].key == key {
		c.ents[i].raw, c.ents[i].anon, c.ents[i].pkg = path, f.Path, f.PackageManaged
	}
	c.mu.Unlock()
	return f, true
}

// put stores the facts of key, seen under path.
func (c *cache) put(key fileKey, f Facts, path string) {
	e := cacheEntry{key: key, facts: f, raw: path, anon: f.Path, pkg: f.PackageManaged}
	e.facts.Path, e.facts.PackageManaged = "", false
	c.mu.Lock()
	defer c.mu.Unlock()
	if i, ok := c.idx[key]; ok {
		c.ents[i] = e
		return
	}
	if len(c.ents) < c.max {
		c.idx[key] = len(c.ents)
		c.ents = append(c.ents, e)
		return
	}
	for c.ents[c.hand].ref {
		c.ents[c.hand].ref = false
		c.hand = (c.hand + 1) % len(c.ents)
	}
	delete(c.idx, c.ents[c.hand].key)
	c.ents[c.hand] = e
	c.idx[key] = c.hand
	c.hand = (c.hand + 1) % len(c.ents)
}

// len returns the number of entries.
func (c *cache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.ents)
}
