package agent

import (
	"encoding/hex"
	"slices"
	"sync"
)

// Bounds of runners.
const (
	maxRunnerPrograms = 16384
	maxRunnersEach    = 16
)

// runners remembers which users ran each program, so that an alert about
// a program is shown to the people who ran it and nobody else. The users
// come from the owner of /proc/PID while the process still runs (a
// program that exits before the agent looks leaves no user), and for
// files that arrived in a download folder, from the file's owner. It is
// bounded: the most recent maxRunnerPrograms programs, at most
// maxRunnersEach users each; older programs are forgotten first.
type runners struct {
	mu sync.Mutex // protects m, ring and next
	m  map[[32]byte][]uint32
	// ring holds the keys in insertion order, to forget the oldest.
	ring [][32]byte
	next int
}

func newRunners() *runners { return &runners{m: make(map[[32]byte][]uint32)} }

// add notes that uid ran the program with this SHA-256.
func (r *runners) add(sha string, uid uint32) {
	var k [32]byte
	if len(sha) != 64 {
		return
	}
	if _, err := hex.Decode(k[:], []byte(sha)); err != nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if uids, ok := r.m[k]; ok {
		if !slices.Contains(uids, uid) && len(uids) < maxRunnersEach {
			r.m[k] = append(uids, uid)
		}
		return
	}
	if len(r.ring) < maxRunnerPrograms {
		r.ring = append(r.ring, k)
	} else {
		delete(r.m, r.ring[r.next])
		r.ring[r.next] = k
		r.next = (r.next + 1) % maxRunnerPrograms
	}
	r.m[k] = []uint32{uid}
}

// of returns the users known to have run the program, nil if none.
func (r *runners) of(sha string) []uint32 {
	var k [32]byte
	if len(sha) != 64 {
		return nil
	}
	if _, err := hex.Decode(k[:], []byte(sha)); err != nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.m[k])
}

// clear forgets everything (the person stopped participating).
func (r *runners) clear() {
	r.mu.Lock()
	defer r.mu.Unlock()
	clear(r.m)
	r.ring, r.next = nil, 0
}
