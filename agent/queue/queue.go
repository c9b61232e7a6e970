// Package queue is the agent's durable, bounded, aggregated statistics
// queue: one record per SHA-256 with its execution count, loaded flag and
// first/last seen times, kept in a bbolt file until the uploader has sent
// it. Events are aggregated in memory and group-committed, so a storm of
// executions costs a map update each and one fsync per commit.
package queue

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/cloudprotect/cloudprotect/agent/identify"
	"github.com/cloudprotect/cloudprotect/wire"
)

// Defaults of Options.
const (
	DefaultMaxRecords     = 100_000
	DefaultMaxBytes       = 50 << 20
	DefaultCommitInterval = time.Second
	DefaultCommitEvents   = 10_000
)

// Errors of the queue.
var (
	ErrClosed       = errors.New("queue: closed")
	ErrUnknownBatch = errors.New("queue: no such batch in flight")
)

// Options configure a Queue. The zero value gives the defaults.
type Options struct {
	// MaxRecords caps the number of records (default 100,000).
	MaxRecords int
	// MaxBytes caps the stored size of the records, keys and values
	// (default 50 MiB). The file is larger by bbolt's page overhead and
	// free pages; Stats().Bytes reports the records' size.
	MaxBytes int64
	// CommitInterval is how often Serve commits buffered events
	// (default 1 s).
	CommitInterval time.Duration
	// CommitEvents is how many distinct hashes may be buffered before
	// Serve commits early (default 10,000). At four times this, Add
	// commits itself, so the buffer stays bounded even without Serve.
	CommitEvents int
	// Clock gives the time of events without one and names moved-aside
	// files; nil means time.Now.
	Clock func() time.Time
	// Logger receives warnings (damaged file, failed commit); nil discards.
	Logger *slog.Logger
}

// Event is what was seen of one file over a moment: executions, an
// appearance in a download folder, or both.
type Event struct {
	Facts  identify.Facts
	Execs  uint64 // executions: ExecCount grows by this
	Loaded bool   // appeared in a download folder
	// Time is when it was first seen; Last when last (zero: Time).
	Time, Last time.Time
}

// Stats are cheap counters of the queue's state.
type Stats struct {
	Pending int    `json:"pending"` // records with something to send (committed)
	Records int    `json:"records"` // records stored
	Evicted uint64 `json:"evicted"` // records evicted to stay within bounds
	Dropped uint64 `json:"dropped"` // records of batches the server refused
	Bytes   int64  `json:"bytes"`   // stored size of the records
}

// Batch is a set of pending records cut for upload. ID is stable: the
// batch is stored until MarkSent, DropBatch or ReleaseBatch, and every
// TakeBatch until then returns it unchanged, across restarts too, so a
// retried upload carries the same ID and the server counts it once.
type Batch struct {
	ID      string        `json:"id"`
	Records []wire.Record `json:"records"`
}

// Queue is the statistics queue. It is safe for concurrent use.
//
// # On disk
//
// One bbolt file (bbolt: copy-on-write B+tree pages, two checksummed meta
// pages, each commit fsynced) with three buckets:
//
//   - "meta": "version" → schema version ("1"); "salt" → 16 random bytes
//     mixed into batch IDs; "evicted", "dropped" → 8-byte counters.
//   - "records": raw 32-byte SHA-256 → value (format byte, first/last
//     seen, exec and sent counts, flags, then the facts as JSON; see
//     encodeRecord). Invariant: key = SHA-256 of the value's facts;
//     SentCount ≤ ExecCount.
//   - "inflight": "batch" → the Batch cut by TakeBatch and not yet
//     acknowledged, as JSON, with the exact deltas it carries.
//
// # What a torn write can break, and how Open repairs it
//
// A commit that stops short (crash, SIGKILL, power loss) is invisible:
// bbolt writes new pages, fsyncs, then switches the meta page, so the file
// opens at the last completed commit. Every event acknowledged by a
// completed Flush survives; buffered events of an unfinished commit are
// lost. A crash between TakeBatch and MarkSent leaves the batch in
// "inflight": the uploader sends it again with the same ID.
//
// Damage beyond that (a disk that ignores fsync, a truncated or
// overwritten file) is checked by Open: bbolt's own consistency check,
// the schema version and a decode of every record. A file that bbolt
// cannot open or check, a missing "meta" bucket or another schema version
// is renamed to "<path>.corrupt-<UTC time>" with a warning, and an empty
// queue is created (the statistics are lost, never the agent). Lesser
// damage is repaired in place: a missing "records" or "inflight" bucket is
// recreated, a record that does not decode is deleted, an inflight batch
// that does not decode is discarded (its records stay pending).
type Queue struct {
	path string
	opts Options
	log  *slog.Logger

	mu     sync.Mutex // protects buf and closed
	buf    map[[32]byte]delta
	closed bool

	// flushMu serialises everything that touches the file: commits,
	// batches, purge and close. It protects db, index, inflight and salt.
	flushMu  sync.Mutex
	db       *bolt.DB
	index    map[[32]byte]indexEntry
	inflight *Batch
	salt     []byte

	// commitErr is the error of the last commit, nil once one succeeds.
	commitErr atomic.Pointer[error]

	kick  chan struct{} // one slot: asks Serve to commit early
	dirty chan struct{} // one slot: tells Serve something was buffered

	// Counters read by Stats without a lock.
	nPending, nRecords atomic.Int64
	nBytes             atomic.Int64
	evicted, dropped   atomic.Uint64
}

// delta is what the buffer holds for one hash until the next commit.
type delta struct {
	facts       identify.Facts
	exec        uint64
	loaded      bool
	first, last int64 // Unix nanoseconds
}

// indexEntry is what the queue keeps in memory about each stored record,
// to choose evictions and batches without reading the file.
type indexEntry struct {
	last     int64 // LastSeen, Unix nanoseconds
	bytes    int32 // key + value
	pending  bool
	inflight bool
}

var (
	bucketMeta     = []byte("meta")
	bucketRecords  = []byte("records")
	bucketInflight = []byte("inflight")
	keyVersion     = []byte("version")
	keySalt        = []byte("salt")
	keyEvicted     = []byte("evicted")
	keyDropped     = []byte("dropped")
	keyBatch       = []byte("batch")
)

const schemaVersion = "1"

func (o *Options) setDefaults() {
	if o.MaxRecords <= 0 {
		o.MaxRecords = DefaultMaxRecords
	}
	if o.MaxBytes <= 0 {
		o.MaxBytes = DefaultMaxBytes
	}
	if o.CommitInterval <= 0 {
		o.CommitInterval = DefaultCommitInterval
	}
	if o.CommitEvents <= 0 {
		o.CommitEvents = DefaultCommitEvents
	}
	if o.Clock == nil {
		o.Clock = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// Add records one event. It only updates an in-memory buffer (no I/O, no
// allocation for a hash already buffered); the event becomes durable at
// the next commit (Serve, Flush, TakeBatch, Close). When four times
// Options.CommitEvents distinct hashes are buffered, Add commits itself.
func (q *Queue) Add(ev Event) error {
	k, err := parseHash(ev.Facts.SHA256)
	if err != nil {
		return fmt.Errorf("add event: %w", err)
	}
	t := ev.Time
	if t.IsZero() {
		t = q.opts.Clock()
	}
	first, last := t.UnixNano(), t.UnixNano()
	if !ev.Last.IsZero() {
		last = max(last, ev.Last.UnixNano())
	}
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return ErrClosed
	}
	d, ok := q.buf[k]
	if !ok {
		d.first, d.last = first, last
	}
	d.facts = ev.Facts
	d.exec += ev.Execs
	d.loaded = d.loaded || ev.Loaded
	d.first = min(d.first, first)
	d.last = max(d.last, last)
	q.buf[k] = d
	n := len(q.buf)
	q.mu.Unlock()

	if n == 1 && !ok {
		// The buffer was empty: Serve arms its commit timer.
		select {
		case q.dirty <- struct{}{}:
		default:
		}
	}
	if n >= q.opts.CommitEvents {
		select {
		case q.kick <- struct{}{}:
		default:
		}
	}
	if n >= 4*q.opts.CommitEvents {
		return q.Flush()
	}
	return nil
}

// Flush commits the buffered events with one fsynced transaction. When it
// returns nil, every event added before the call is durable.
func (q *Queue) Flush() error {
	q.flushMu.Lock()
	defer q.flushMu.Unlock()
	return q.flushLocked()
}

func (q *Queue) flushLocked() error {
	if q.db == nil {
		if err := q.reopenLocked(); err != nil {
			return err
		}
	}
	q.mu.Lock()
	buf := q.buf
	if len(buf) == 0 {
		q.mu.Unlock()
		return nil
	}
	q.buf = make(map[[32]byte]delta, len(buf))
	q.mu.Unlock()

	// Keys in order: bbolt then walks its tree forward instead of
	// seeking at random.
	keys := make([][32]byte, 0, len(buf))
	for k := range buf {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b [32]byte) int { return bytes.Compare(a[:], b[:]) })
	err := q.db.Update(func(tx *bolt.Tx) error {
		recs := tx.Bucket(bucketRecords)
		for _, k := range keys {
			d := buf[k]
			if err := q.merge(recs, k, &d); err != nil {
				return err
			}
		}
		return q.evictLocked(tx)
	})
	if err != nil {
		// Nothing was committed: put the events back for the next try,
		// and rebuild the index, which the failed transaction touched.
		q.mu.Lock()
		for k, d := range buf {
			if cur, ok := q.buf[k]; ok {
				d.exec += cur.exec
				d.loaded = d.loaded || cur.loaded
				d.first, d.last = min(d.first, cur.first), max(d.last, cur.last)
				d.facts = cur.facts
			}
			q.buf[k] = d
		}
		q.mu.Unlock()
		if ierr := q.db.View(q.loadIndex); ierr != nil {
			q.log.Warn("rebuild queue index", "err", ierr)
		}
		err = fmt.Errorf("commit queue: %w", err)
		q.commitErr.Store(&err)
		return err
	}
	q.commitErr.Store(nil)
	return nil
}

// merge adds d to the stored record k and updates the index. The facts
// are replaced by the latest ones, so only the fixed header of the stored
// value is read.
func (q *Queue) merge(recs *bolt.Bucket, k [32]byte, d *delta) error {
	r := &Record{}
	old, had := q.index[k]
	if v := recs.Get(k[:]); v != nil {
		h, err := decodeHeader(v)
		if err != nil {
			// Damaged since Open: start the record again.
			q.log.Warn("replace undecodable queue record", "sha256", hex.EncodeToString(k[:]), "err", err)
		} else {
			r.ExecCount, r.SentCount = h.exec, h.sent
			r.Loaded, r.LoadedSent = h.flags&flagLoaded != 0, h.flags&flagLoadedSent != 0
			r.FirstSeen, r.LastSeen = time.Unix(0, h.first).UTC(), time.Unix(0, h.last).UTC()
		}
	}
	first, last := time.Unix(0, d.first).UTC(), time.Unix(0, d.last).UTC()
	if r.FirstSeen.IsZero() || first.Before(r.FirstSeen) {
		r.FirstSeen = first
	}
	if last.After(r.LastSeen) {
		r.LastSeen = last
	}
	r.Facts = d.facts
	r.ExecCount += d.exec
	r.Loaded = r.Loaded || d.loaded
	v, err := encodeRecord(r)
	if err != nil {
		return err
	}
	if err := recs.Put(k[:], v); err != nil {
		return fmt.Errorf("store record: %w", err)
	}
	e := indexEntry{last: r.LastSeen.UnixNano(), bytes: int32(len(k) + len(v)), pending: r.Pending(), inflight: old.inflight}
	q.setIndex(k, old, had, e)
	return nil
}

// setIndex replaces the index entry of k and keeps the counters in step.
func (q *Queue) setIndex(k [32]byte, old indexEntry, had bool, e indexEntry) {
	if had {
		q.nBytes.Add(-int64(old.bytes))
		if old.pending {
			q.nPending.Add(-1)
		}
	} else {
		q.nRecords.Add(1)
	}
	q.nBytes.Add(int64(e.bytes))
	if e.pending {
		q.nPending.Add(1)
	}
	q.index[k] = e
}

func (q *Queue) deleteIndex(k [32]byte) {
	old, ok := q.index[k]
	if !ok {
		return
	}
	delete(q.index, k)
	q.nRecords.Add(-1)
	q.nBytes.Add(-int64(old.bytes))
	if old.pending {
		q.nPending.Add(-1)
	}
}

// evictLocked keeps the queue within MaxRecords and MaxBytes. When a bound
// is exceeded it evicts down to 99% of it, so that a queue at its bound
// does not sort its index at every commit. Order: records already sent,
// oldest LastSeen first; then pending records, oldest first; records of
// the batch in flight last.
func (q *Queue) evictLocked(tx *bolt.Tx) error {
	maxR, maxB := q.opts.MaxRecords, q.opts.MaxBytes
	if len(q.index) <= maxR && q.nBytes.Load() <= maxB {
		return nil
	}
	targetR, targetB := maxR-maxR/100, maxB-maxB/100
	type cand struct {
		k     [32]byte
		class int
		last  int64
	}
	cands := make([]cand, 0, len(q.index))
	for k, e := range q.index {
		c := 0
		switch {
		case e.inflight:
			c = 2
		case e.pending:
			c = 1
		}
		cands = append(cands, cand{k, c, e.last})
	}
	slices.SortFunc(cands, func(a, b cand) int {
		if a.class != b.class {
			return a.class - b.class
		}
		return cmp.Compare(a.last, b.last)
	})
	recs := tx.Bucket(bucketRecords)
	var n uint64
	for _, c := range cands {
		if len(q.index) <= targetR && q.nBytes.Load() <= targetB {
			break
		}
		if err := recs.Delete(c.k[:]); err != nil {
			return fmt.Errorf("evict record: %w", err)
		}
		q.deleteIndex(c.k)
		n++
	}
	ev := q.evicted.Add(n)
	q.log.Info("queue full: evicted oldest records", "evicted", n, "records", len(q.index))
	return putCounter(tx, keyEvicted, ev)
}

// Stats returns the counters; it takes no lock and does no I/O. Pending
// counts committed records only.
func (q *Queue) Stats() Stats {
	return Stats{
		Pending: int(q.nPending.Load()),
		Records: int(q.nRecords.Load()),
		Evicted: q.evicted.Load(),
		Dropped: q.dropped.Load(),
		Bytes:   q.nBytes.Load(),
	}
}

// Empty reports whether the queue holds nothing at all: no record on
// disk and no event buffered for the next commit.
func (q *Queue) Empty() bool {
	q.mu.Lock()
	buffered := len(q.buf)
	q.mu.Unlock()
	return buffered == 0 && q.nRecords.Load() == 0 && q.nPending.Load() == 0
}

// Serve commits the buffer every Options.CommitInterval, and early when
// Options.CommitEvents distinct hashes are waiting. When ctx is cancelled
// it commits once more and returns ctx.Err(). A failed commit is logged
// and retried at the next tick.
func (q *Queue) Serve(ctx context.Context) error {
	// The commit timer runs only while something is buffered: an idle
	// queue never wakes up.
	var timer *time.Timer
	var due <-chan time.Time
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		select {
		case <-ctx.Done():
			if err := q.Flush(); err != nil && !errors.Is(err, ErrClosed) {
				q.log.Warn("final queue commit failed", "err", err)
			}
			return ctx.Err()
		case <-q.dirty:
			if due == nil {
				timer = time.NewTimer(q.opts.CommitInterval)
				due = timer.C
			}
			continue
		case <-due:
			due = nil
		case <-q.kick:
			if timer != nil {
				timer.Stop()
			}
			due = nil
		}
		if err := q.Flush(); err != nil && !errors.Is(err, ErrClosed) {
			q.log.Warn("queue commit failed", "err", err)
		}
	}
}

// Close commits the buffer and closes the file. Later calls do nothing.
func (q *Queue) Close() error {
	q.flushMu.Lock()
	defer q.flushMu.Unlock()
	if q.db == nil {
		q.mu.Lock()
		q.closed = true
		q.mu.Unlock()
		return nil
	}
	ferr := q.flushLocked()
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	cerr := q.db.Close()
	q.db = nil
	if ferr != nil {
		return ferr
	}
	if cerr != nil {
		return fmt.Errorf("close queue: %w", cerr)
	}
	return nil
}

// TakeBatch commits the buffer, then returns the batch in flight if there
// is one (whatever maxRecords is), or else cuts a new batch of at most
// maxRecords pending records (oldest LastSeen first) and stores it as in
// flight. An empty batch (no records, empty ID) means nothing is pending;
// it is not stored.
//
// To keep a batch under a compressed-size limit, the uploader sizes it
// before the first send: it calls Pending with a smaller maxRecords until
// the encoded batch fits, then TakeBatch with that number. A batch cut too
// large and never sent may be given back with ReleaseBatch.
func (q *Queue) TakeBatch(maxRecords int) (Batch, error) {
	q.flushMu.Lock()
	defer q.flushMu.Unlock()
	if err := q.flushLocked(); err != nil {
		return Batch{}, err
	}
	b, err := q.nextBatchLocked(maxRecords)
	if err != nil || q.inflight != nil || len(b.Records) == 0 {
		return b, err
	}
	data, err := json.Marshal(b)
	if err != nil {
		return Batch{}, fmt.Errorf("encode batch: %w", err)
	}
	err = q.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketInflight).Put(keyBatch, data)
	})
	if err != nil {
		return Batch{}, fmt.Errorf("store batch in flight: %w", err)
	}
	q.setInflight(&b)
	return b, nil
}

// Pending returns exactly the records the next TakeBatch(maxRecords)
// would return, without cutting a batch: the preview of GET /v1/queue. It
// commits the buffer first, as TakeBatch does.
func (q *Queue) Pending(maxRecords int) ([]wire.Record, error) {
	q.flushMu.Lock()
	defer q.flushMu.Unlock()
	if err := q.flushLocked(); err != nil {
		return nil, err
	}
	b, err := q.nextBatchLocked(maxRecords)
	return b.Records, err
}

// CommitError returns why the last commit failed (a full or read-only
// state folder, say), or nil when it succeeded. Events are kept in memory
// meanwhile and committed by the next commit that succeeds.
func (q *Queue) CommitError() error {
	if p := q.commitErr.Load(); p != nil {
		return *p
	}
	return nil
}

// reopenLocked creates the queue again after a purge could not (a full
// disk); it is ErrClosed after Close. The caller holds flushMu.
func (q *Queue) reopenLocked() error {
	q.mu.Lock()
	closed := q.closed
	q.mu.Unlock()
	if closed {
		return ErrClosed
	}
	if err := q.open(); err != nil {
		return fmt.Errorf("reopen queue: %w", err)
	}
	q.log.Info("queue reopened")
	return nil
}

// nextBatchLocked is the one place that builds what is sent: the batch in
// flight, or the oldest pending records as deltas.
func (q *Queue) nextBatchLocked(maxRecords int) (Batch, error) {
	if q.inflight != nil {
		return cloneBatch(q.inflight), nil
	}
	if maxRecords <= 0 {
		return Batch{Records: []wire.Record{}}, nil
	}
	type cand struct {
		k    [32]byte
		last int64
	}
	var cands []cand
	for k, e := range q.index {
		if e.pending {
			cands = append(cands, cand{k, e.last})
		}
	}
	slices.SortFunc(cands, func(a, b cand) int {
		if c := cmp.Compare(a.last, b.last); c != 0 {
			return c
		}
		return slices.Compare(a.k[:], b.k[:])
	})
	if len(cands) > maxRecords {
		cands = cands[:maxRecords]
	}
	b := Batch{Records: make([]wire.Record, 0, len(cands))}
	err := q.db.View(func(tx *bolt.Tx) error {
		recs := tx.Bucket(bucketRecords)
		for _, c := range cands {
			r, err := decodeRecord(c.k[:], recs.Get(c.k[:]))
			if err != nil {
				return fmt.Errorf("read record %x: %w", c.k, err)
			}
			b.Records = append(b.Records, r.delta())
		}
		return nil
	})
	if err != nil {
		return Batch{}, err
	}
	if len(b.Records) > 0 {
		b.ID = q.batchID(b.Records)
	}
	return b, nil
}

// batchID is derived from the content and the queue's salt: the same
// pending content gives the same ID, and two installations never share
// one.
func (q *Queue) batchID(recs []wire.Record) string {
	h := sha256.New()
	h.Write(q.salt)
	json.NewEncoder(h).Encode(recs)
	return hex.EncodeToString(h.Sum(nil)[:16])
}

func cloneBatch(b *Batch) Batch {
	return Batch{ID: b.ID, Records: slices.Clone(b.Records)}
}

func (q *Queue) setInflight(b *Batch) {
	q.inflight = b
	for _, r := range b.Records {
		if k, err := parseHash(r.SHA256); err == nil {
			if e, ok := q.index[k]; ok {
				e.inflight = true
				q.index[k] = e
			}
		}
	}
}

func (q *Queue) clearInflight() {
	if q.inflight == nil {
		return
	}
	for _, r := range q.inflight.Records {
		if k, err := parseHash(r.SHA256); err == nil {
			if e, ok := q.index[k]; ok {
				e.inflight = false
				q.index[k] = e
			}
		}
	}
	q.inflight = nil
}

// MarkSent records that the server accepted the batch: each record's
// SentCount advances by exactly the executions the batch carried, so
// executions seen after TakeBatch stay pending.
func (q *Queue) MarkSent(batchID string) error {
	return q.settle(batchID, "mark batch sent", nil)
}

// DropBatch records that the server refused the batch for good (400, 413,
// 422): its counts are treated as sent and lost, and its records are
// counted in Stats().Dropped.
func (q *Queue) DropBatch(batchID string) error {
	return q.settle(batchID, "drop batch", &q.dropped)
}

// ReleaseBatch forgets the batch in flight without counting anything as
// sent: its records are cut again by the next TakeBatch. Only for a batch
// that was never sent (for instance one found too large to send); a batch
// that may have reached the server must be retried as it is.
func (q *Queue) ReleaseBatch(batchID string) error {
	q.flushMu.Lock()
	defer q.flushMu.Unlock()
	if q.db == nil {
		return ErrClosed
	}
	if q.inflight == nil || q.inflight.ID != batchID {
		return fmt.Errorf("release batch %q: %w", batchID, ErrUnknownBatch)
	}
	err := q.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketInflight).Delete(keyBatch)
	})
	if err != nil {
		return fmt.Errorf("release batch: %w", err)
	}
	q.clearInflight()
	return nil
}

func (q *Queue) settle(batchID, what string, dropped *atomic.Uint64) error {
	q.flushMu.Lock()
	defer q.flushMu.Unlock()
	if q.db == nil {
		return ErrClosed
	}
	if q.inflight == nil || q.inflight.ID != batchID {
		return fmt.Errorf("%s %q: %w", what, batchID, ErrUnknownBatch)
	}
	b := q.inflight
	err := q.db.Update(func(tx *bolt.Tx) error {
		recs := tx.Bucket(bucketRecords)
		for _, w := range b.Records {
			k, err := parseHash(w.SHA256)
			if err != nil {
				continue
			}
			v := recs.Get(k[:])
			if v == nil {
				continue // evicted since
			}
			r, err := decodeRecord(k[:], v)
			if err != nil {
				return fmt.Errorf("read record %x: %w", k, err)
			}
			r.SentCount = min(r.SentCount+w.ExecCount, r.ExecCount)
			if w.Loaded {
				r.LoadedSent = true
			}
			nv, err := encodeRecord(r)
			if err != nil {
				return err
			}
			if err := recs.Put(k[:], nv); err != nil {
				return fmt.Errorf("store record: %w", err)
			}
			old := q.index[k]
			q.setIndex(k, old, true, indexEntry{last: old.last, bytes: int32(len(k) + len(nv)), pending: r.Pending()})
		}
		if dropped != nil {
			if err := putCounter(tx, keyDropped, q.dropped.Load()+uint64(len(b.Records))); err != nil {
				return err
			}
		}
		return tx.Bucket(bucketInflight).Delete(keyBatch)
	})
	if err != nil {
		if ierr := q.db.View(q.loadIndex); ierr != nil {
			q.log.Warn("rebuild queue index", "err", ierr)
		}
		return fmt.Errorf("%s: %w", what, err)
	}
	if dropped != nil {
		dropped.Add(uint64(len(b.Records)))
	}
	q.inflight = nil
	return nil
}

// Records returns every stored record, committed ones only, for
// diagnostics and tests.
func (q *Queue) Records() ([]Record, error) {
	q.flushMu.Lock()
	defer q.flushMu.Unlock()
	if q.db == nil {
		return nil, ErrClosed
	}
	var out []Record
	err := q.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketRecords).ForEach(func(k, v []byte) error {
			r, err := decodeRecord(k, v)
			if err != nil {
				return fmt.Errorf("read record %x: %w", k, err)
			}
			out = append(out, *r)
			return nil
		})
	})
	return out, err
}

func newSalt() []byte {
	s := make([]byte, 16)
	rand.Read(s)
	return s
}
