// Package queue is the agent's durable, bounded, aggregated statistics
// queue: one record per SHA-256 with its execution count, loaded flag and
// first/last seen times, kept in a bbolt file until the uploader has sent
// it. Events are aggregated in memory and group-committed, so a storm of
// executions costs a map update each and one fsync per commit.
package queue

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
	"golang.org/x/sys/unix"

	"github.com/cloudprotect/cloudprotect/agent/identify"
	"github.com/cloudprotect/cloudprotect/wire"
)

// Defaults of Options.
const (
	DefaultMaxRecords     = 50_000
	DefaultMaxBytes       = 16 << 20
	DefaultCommitInterval = time.Second
	DefaultCommitEvents   = 10_000
	DefaultCommitBytes    = 1 << 20
)

// Errors of the queue.
var (
	ErrClosed       = errors.New("queue: closed")
	ErrUnknownBatch = errors.New("queue: no such batch in flight")
)

// Options configure a Queue. The zero value gives the defaults.
type Options struct {
	// MaxRecords caps the number of records (default 50,000).
	MaxRecords int
	// MaxBytes caps the stored size of the records, keys and values
	// (default 16 MiB, about 40,000 programs with paths of ordinary
	// length). The file is larger by bbolt's page overhead and free pages;
	// Stats().Bytes reports the records' size.
	MaxBytes int64
	// CommitInterval is how often Serve commits buffered events
	// (default 1 s).
	CommitInterval time.Duration
	// CommitEvents is how many distinct hashes may be buffered before
	// Serve commits early (default 10,000). At four times this, Add
	// commits itself, so the buffer stays bounded even without Serve.
	CommitEvents int
	// CommitBytes bounds the memory of the buffer the same way (default
	// 1 MiB), whatever the length of the paths: Serve commits early at
	// it, Add commits itself at four times it.
	CommitBytes int
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
	// PendingExecs counts the executions not sent yet (committed).
	PendingExecs uint64 `json:"pending_execs"`
	// Batch and BatchExecs are the records and executions of the batch
	// cut for the cloud and waiting for its answer (0 when none).
	Batch      int    `json:"batch"`
	BatchExecs uint64 `json:"batch_execs"`
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
// pages, each commit fsynced) with five buckets:
//
//   - "meta": "version" → schema version ("2"); "salt" → 16 random bytes
//     mixed into batch IDs; "evicted", "dropped" → 8-byte counters.
//   - "records": raw 32-byte SHA-256 → value (format byte, first/last
//     seen, exec and sent counts, flags, then the facts as JSON; see
//     encodeRecord). Invariant: key = SHA-256 of the value's facts;
//     SentCount ≤ ExecCount.
//   - "order": one empty value per record, keyed by class ('p' pending,
//     's' sent), LastSeen (8 bytes, big endian) and the SHA-256, so that
//     batches (oldest pending first) and evictions (sent ones first,
//     oldest first) walk the file in order instead of sorting in memory.
//     Invariant: exactly one key per record, matching its value.
//   - "inflight": "batch" → the batch cut by TakeBatch and not yet
//     acknowledged: its ID and record count, as JSON.
//   - "inflight-records": position (4 bytes, big endian) → one record of
//     that batch, as JSON, with the exact deltas it carries.
//
// What the queue keeps in memory does not grow with the file: counters,
// the events buffered for the next commit (bounded by CommitEvents and
// CommitBytes) and, for the batch in flight, each record's hash and
// deltas (bounded by the batch size). bbolt reads the file through a
// shared read-only mapping, whose pages count as the agent's resident
// memory once read: after each pass over many records (the checks at
// open, a commit, a batch, a preview, an eviction) the queue lets the
// kernel drop them from the mapping (release); they stay in the page
// cache.
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
// cannot open or check, a missing "meta" bucket or an unknown schema
// version is renamed to "<path>.corrupt-<UTC time>" with a warning, and an
// empty queue is created (the statistics are lost, never the agent).
// Lesser damage is repaired in place: a missing "records" or "inflight"
// bucket is recreated, a record that does not decode is deleted, an
// inflight batch that does not decode is discarded (its records stay
// pending), and an "order" bucket that does not match the records is
// rebuilt from them. A version 1 file (no "order" bucket, the batch in
// flight as one JSON value) is converted.
type Queue struct {
	path string
	opts Options
	log  *slog.Logger

	mu       sync.Mutex // protects buf, bufBytes and closed
	buf      map[[32]byte]delta
	bufBytes int
	closed   bool

	// flushMu serialises everything that touches the file: commits,
	// batches, purge and close. It protects db, inflight and salt.
	flushMu  sync.Mutex
	db       *bolt.DB
	inflight *inflightBatch
	salt     []byte

	// commitErr is the error of the last commit, nil once one succeeds.
	commitErr atomic.Pointer[error]

	kick  chan struct{} // one slot: asks Serve to commit early
	dirty chan struct{} // one slot: tells Serve something was buffered

	// Counters read by Stats without a lock.
	nPending, nRecords atomic.Int64
	nBytes             atomic.Int64
	evicted, dropped   atomic.Uint64
	// Of the batch in flight, read by Stats: records and executions.
	nBatch      atomic.Int64
	nBatchExecs atomic.Uint64
	// nPendingExecs counts the executions not yet sent, over all records.
	nPendingExecs atomic.Int64
}

// inflightBatch is what the queue keeps in memory of the batch in flight.
type inflightBatch struct {
	id     string
	n      int
	deltas map[[32]byte]inflightDelta
}

// inflightDelta is what the batch in flight carries for one record.
type inflightDelta struct {
	exec   uint64
	loaded bool
}

// delta is what the buffer holds for one hash until the next commit.
type delta struct {
	facts       identify.Facts
	exec        uint64
	loaded      bool
	first, last int64 // Unix nanoseconds
}

// deltaCost is about what one buffered delta costs in memory.
func deltaCost(f *identify.Facts) int {
	n := 200 + len(f.SHA256) + len(f.Path) + len(f.Kind) + len(f.Interpreter)
	if f.ELF != nil {
		n += 100 + len(f.ELF.Machine) + len(f.ELF.Type) + len(f.ELF.Interpreter) + len(f.ELF.BuildID) + len(f.ELF.Malformed)
	}
	return n
}

var (
	bucketMeta            = []byte("meta")
	bucketRecords         = []byte("records")
	bucketOrder           = []byte("order")
	bucketInflight        = []byte("inflight")
	bucketInflightRecords = []byte("inflight-records")
	keyVersion            = []byte("version")
	keySalt               = []byte("salt")
	keyEvicted            = []byte("evicted")
	keyDropped            = []byte("dropped")
	keyBatch              = []byte("batch")
)

// Schema versions: 2 is written; 1 is converted when opened.
const (
	schemaVersion   = "2"
	schemaVersionV1 = "1"
)

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
	if o.CommitBytes <= 0 {
		o.CommitBytes = DefaultCommitBytes
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
// Options.CommitEvents distinct hashes, or four times CommitBytes, are
// buffered, Add commits itself.
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
		q.bufBytes += deltaCost(&ev.Facts)
	}
	d.facts = ev.Facts
	d.exec += ev.Execs
	d.loaded = d.loaded || ev.Loaded
	d.first = min(d.first, first)
	d.last = max(d.last, last)
	q.buf[k] = d
	n, bytes := len(q.buf), q.bufBytes
	q.mu.Unlock()

	if n == 1 && !ok {
		// The buffer was empty: Serve arms its commit timer.
		select {
		case q.dirty <- struct{}{}:
		default:
		}
	}
	if n >= q.opts.CommitEvents || bytes >= q.opts.CommitBytes {
		select {
		case q.kick <- struct{}{}:
		default:
		}
	}
	if n >= 4*q.opts.CommitEvents || bytes >= 4*q.opts.CommitBytes {
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
	q.buf = make(map[[32]byte]delta, min(len(buf), 1024))
	q.bufBytes = 0
	q.mu.Unlock()

	// Keys in order: bbolt then walks its tree forward instead of
	// seeking at random.
	keys := make([][32]byte, 0, len(buf))
	for k := range buf {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b [32]byte) int { return bytes.Compare(a[:], b[:]) })
	var ch counterChange
	err := q.db.Update(func(tx *bolt.Tx) error {
		recs, order := tx.Bucket(bucketRecords), tx.Bucket(bucketOrder)
		for _, k := range keys {
			d := buf[k]
			if err := q.merge(recs, order, k, &d, &ch); err != nil {
				return err
			}
		}
		return q.evictLocked(tx, &ch)
	})
	if err != nil {
		// Nothing was committed: put the events back for the next try.
		q.mu.Lock()
		for k, d := range buf {
			if cur, ok := q.buf[k]; ok {
				d.exec += cur.exec
				d.loaded = d.loaded || cur.loaded
				d.first, d.last = min(d.first, cur.first), max(d.last, cur.last)
				d.facts = cur.facts
			} else {
				q.bufBytes += deltaCost(&d.facts)
			}
			q.buf[k] = d
		}
		q.mu.Unlock()
		err = fmt.Errorf("commit queue: %w", err)
		q.commitErr.Store(&err)
		return err
	}
	ch.apply(q)
	q.commitErr.Store(nil)
	q.release()
	return nil
}

// release drops the pages of the file from this process's mapping (they
// stay in the page cache, and a later read maps them again), so that
// reading the queue does not keep it resident. The mapping is bbolt's
// shared, read-only view of the file: nothing is lost. The range is the
// pages in use as a transaction sees them, which bbolt always keeps
// mapped (the file itself may be longer than the mapping: bbolt grows it
// ahead). The caller holds flushMu, which every use of the mapping takes.
func (q *Queue) release() {
	if q.db == nil {
		return
	}
	var size int64
	if err := q.db.View(func(tx *bolt.Tx) error { size = tx.Size(); return nil }); err != nil {
		return
	}
	page := int64(os.Getpagesize())
	if n := size / page * page; n > 0 {
		unix.Syscall(unix.SYS_MADVISE, q.db.Info().Data, uintptr(n), unix.MADV_DONTNEED)
	}
}

// counterChange collects what a transaction changes in the counters, to
// apply once it committed.
type counterChange struct {
	records, pending, bytes, pendingExecs int64
	evicted                               uint64
}

func (c *counterChange) apply(q *Queue) {
	q.nRecords.Add(c.records)
	q.nPending.Add(c.pending)
	q.nBytes.Add(c.bytes)
	q.nPendingExecs.Add(c.pendingExecs)
	if c.evicted > 0 {
		q.evicted.Add(c.evicted)
	}
}

// account adds to c what replacing a stored value old (nil: none) by
// new (nil: deleted) changes.
func (c *counterChange) account(k []byte, old, new []byte) {
	if old != nil {
		h, _ := decodeHeader(old)
		c.records--
		c.bytes -= int64(len(k) + len(old))
		if h.pending() {
			c.pending--
		}
		c.pendingExecs -= int64(h.exec - min(h.sent, h.exec))
	}
	if new != nil {
		h, _ := decodeHeader(new)
		c.records++
		c.bytes += int64(len(k) + len(new))
		if h.pending() {
			c.pending++
		}
		c.pendingExecs += int64(h.exec - min(h.sent, h.exec))
	}
}

// orderKey is a record's key in the "order" bucket.
func orderKey(k []byte, pending bool, last int64) []byte {
	o := make([]byte, 1+8+len(k))
	o[0] = 's'
	if pending {
		o[0] = 'p'
	}
	binary.BigEndian.PutUint64(o[1:], uint64(last))
	copy(o[9:], k)
	return o
}

// orderKeyOf is the order key of a stored value; ok is false when the
// value does not decode.
func orderKeyOf(k, v []byte) ([]byte, bool) {
	h, err := decodeHeader(v)
	if err != nil {
		return nil, false
	}
	return orderKey(k, h.pending(), h.last), true
}

// put stores the value of record k and keeps "order" and the counters in
// step.
func put(recs, order *bolt.Bucket, k, v []byte, ch *counterChange) error {
	old := recs.Get(k)
	if old != nil {
		if ok, good := orderKeyOf(k, old); good {
			if err := order.Delete(ok); err != nil {
				return fmt.Errorf("update record order: %w", err)
			}
		}
	}
	ch.account(k, old, v)
	if err := recs.Put(k, v); err != nil {
		return fmt.Errorf("store record: %w", err)
	}
	ok, _ := orderKeyOf(k, v)
	if err := order.Put(ok, nil); err != nil {
		return fmt.Errorf("update record order: %w", err)
	}
	return nil
}

// remove deletes record k and its order key.
func remove(recs, order *bolt.Bucket, k []byte, ch *counterChange) error {
	old := recs.Get(k)
	if old == nil {
		return nil
	}
	if ok, good := orderKeyOf(k, old); good {
		if err := order.Delete(ok); err != nil {
			return fmt.Errorf("delete record order: %w", err)
		}
	}
	ch.account(k, old, nil)
	if err := recs.Delete(k); err != nil {
		return fmt.Errorf("delete record: %w", err)
	}
	return nil
}

// merge adds d to the stored record k. The facts are replaced by the
// latest ones, so only the fixed header of the stored value is read.
func (q *Queue) merge(recs, order *bolt.Bucket, k [32]byte, d *delta, ch *counterChange) error {
	r := &Record{}
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
	return put(recs, order, k[:], v, ch)
}

// evictLocked keeps the queue within MaxRecords and MaxBytes. When a bound
// is exceeded it evicts down to 99% of it, so that a queue at its bound
// does not evict at every commit. Order, walked in the "order" bucket:
// records already sent, oldest LastSeen first; then pending records,
// oldest first; records of the batch in flight last.
func (q *Queue) evictLocked(tx *bolt.Tx, ch *counterChange) error {
	maxR, maxB := int64(q.opts.MaxRecords), q.opts.MaxBytes
	records, size := q.nRecords.Load()+ch.records, q.nBytes.Load()+ch.bytes
	if records <= maxR && size <= maxB {
		return nil
	}
	targetR, targetB := maxR-maxR/100, maxB-maxB/100
	over := func() bool { return records > targetR || size > targetB }
	recs, order := tx.Bucket(bucketRecords), tx.Bucket(bucketOrder)
	var n uint64
	// Three classes: sent, pending not in flight, in flight. Victims are
	// chosen in rounds of at most evictRound, then deleted (deleting under
	// a cursor would skip keys).
	for class := 0; class < 3 && over(); {
		prefix := byte('s')
		if class > 0 {
			prefix = 'p'
		}
		var victims [][]byte
		c := order.Cursor()
		for ok, _ := c.Seek([]byte{prefix}); ok != nil && ok[0] == prefix && over() && len(victims) < evictRound; ok, _ = c.Next() {
			k := ok[9:]
			if _, inBatch := q.inflightDelta(k); prefix == 'p' && inBatch != (class == 2) {
				continue
			}
			if v := recs.Get(k); v != nil {
				records--
				size -= int64(len(k) + len(v))
			}
			victims = append(victims, append([]byte(nil), k...))
		}
		for _, k := range victims {
			if err := remove(recs, order, k, ch); err != nil {
				return fmt.Errorf("evict record: %w", err)
			}
		}
		n += uint64(len(victims))
		if len(victims) < evictRound {
			class++
		}
	}
	if n == 0 {
		return nil
	}
	ch.evicted += n
	q.log.Info("queue full: evicted oldest records", "evicted", n, "records", records)
	return putCounter(tx, keyEvicted, q.evicted.Load()+ch.evicted)
}

// evictRound bounds the keys one round of eviction holds in memory.
const evictRound = 4096

// inflightDelta returns what the batch in flight carries for record k.
// The caller holds flushMu.
func (q *Queue) inflightDelta(k []byte) (inflightDelta, bool) {
	if q.inflight == nil || len(k) != 32 {
		return inflightDelta{}, false
	}
	d, ok := q.inflight.deltas[[32]byte(k)]
	return d, ok
}

// Stats returns the counters; it takes no lock and does no I/O. Pending
// counts committed records only.
func (q *Queue) Stats() Stats {
	return Stats{
		Pending:      int(q.nPending.Load()),
		Records:      int(q.nRecords.Load()),
		Evicted:      q.evicted.Load(),
		Dropped:      q.dropped.Load(),
		Bytes:        q.nBytes.Load(),
		PendingExecs: uint64(max(q.nPendingExecs.Load(), 0)),
		Batch:        int(q.nBatch.Load()),
		BatchExecs:   q.nBatchExecs.Load(),
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
// Options.CommitEvents distinct hashes (or CommitBytes) are waiting. When
// ctx is cancelled it commits once more and returns ctx.Err(). A failed
// commit is logged and retried at the next tick.
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
// A batch cut too large to send, and never sent, may be given back with
// ReleaseBatch and cut again smaller.
func (q *Queue) TakeBatch(maxRecords int) (Batch, error) {
	q.flushMu.Lock()
	defer q.flushMu.Unlock()
	if err := q.flushLocked(); err != nil {
		return Batch{}, err
	}
	if q.inflight != nil {
		return q.readInflightLocked()
	}
	if maxRecords <= 0 {
		return Batch{Records: []wire.Record{}}, nil
	}
	b := Batch{Records: []wire.Record{}}
	err := q.db.View(func(tx *bolt.Tx) error {
		recs := tx.Bucket(bucketRecords)
		c := tx.Bucket(bucketOrder).Cursor()
		for ok, _ := c.Seek([]byte{'p'}); ok != nil && ok[0] == 'p' && len(b.Records) < maxRecords; ok, _ = c.Next() {
			k := ok[9:]
			r, err := decodeRecord(k, recs.Get(k))
			if err != nil {
				return fmt.Errorf("read record %x: %w", k, err)
			}
			b.Records = append(b.Records, r.delta())
		}
		return nil
	})
	q.release()
	if err != nil || len(b.Records) == 0 {
		return b, err
	}
	b.ID = q.batchID(b.Records)
	in := &inflightBatch{id: b.ID, n: len(b.Records), deltas: make(map[[32]byte]inflightDelta, len(b.Records))}
	err = q.db.Update(func(tx *bolt.Tx) error {
		ib, irecs := tx.Bucket(bucketInflight), tx.Bucket(bucketInflightRecords)
		meta, err := json.Marshal(inflightMeta{ID: b.ID, Records: len(b.Records)})
		if err != nil {
			return fmt.Errorf("encode batch: %w", err)
		}
		if err := ib.Put(keyBatch, meta); err != nil {
			return err
		}
		for i, r := range b.Records {
			data, err := json.Marshal(r)
			if err != nil {
				return fmt.Errorf("encode batch: %w", err)
			}
			if err := irecs.Put(binary.BigEndian.AppendUint32(nil, uint32(i)), data); err != nil {
				return err
			}
			k, _ := parseHash(r.SHA256)
			in.deltas[k] = inflightDelta{exec: r.ExecCount, loaded: r.Loaded}
		}
		return nil
	})
	if err != nil {
		return Batch{}, fmt.Errorf("store batch in flight: %w", err)
	}
	q.setInflight(in)
	return b, nil
}

// inflightMeta is the value of "inflight"/"batch".
type inflightMeta struct {
	ID      string `json:"id"`
	Records int    `json:"records"`
}

// readInflightLocked reads the batch in flight from the file.
func (q *Queue) readInflightLocked() (Batch, error) {
	b := Batch{ID: q.inflight.id, Records: make([]wire.Record, 0, q.inflight.n)}
	err := q.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketInflightRecords).ForEach(func(_, v []byte) error {
			var r wire.Record
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("read batch in flight: %w", err)
			}
			b.Records = append(b.Records, r)
			return nil
		})
	})
	return b, err
}

// Preview calls fn for every record with something to send, as the
// cloud would receive it: first each record of the batch in flight
// (inBatch), with the exact deltas the batch carries, then every pending
// record with what is pending beyond that batch, oldest first. It commits
// the buffer first. The file is read in pages of previewPage records,
// and no lock or transaction is held while fn runs, so fn may take its
// time (a slow client) and memory stays bounded; a record that changes
// meanwhile may show as it was or as it is. It returns the ID of the
// batch in flight ("" when none).
func (q *Queue) Preview(fn func(rec wire.Record, inBatch bool) error) (string, error) {
	q.flushMu.Lock()
	if err := q.flushLocked(); err != nil {
		q.flushMu.Unlock()
		return "", err
	}
	batchID := ""
	if q.inflight != nil {
		batchID = q.inflight.id
	}
	q.flushMu.Unlock()

	page := make([]wire.Record, 0, previewPage)
	// The batch in flight, by position.
	var after []byte
	for {
		page = page[:0]
		err := q.view(func(tx *bolt.Tx) error {
			c := tx.Bucket(bucketInflightRecords).Cursor()
			k, v := c.First()
			if after != nil {
				k, v = c.Seek(after)
				if k != nil && bytes.Equal(k, after) {
					k, v = c.Next()
				}
			}
			for ; k != nil && len(page) < previewPage; k, v = c.Next() {
				var r wire.Record
				if err := json.Unmarshal(v, &r); err != nil {
					return fmt.Errorf("read batch in flight: %w", err)
				}
				page = append(page, r)
				after = append(after[:0], k...)
			}
			return nil
		})
		if err != nil {
			return batchID, err
		}
		for _, r := range page {
			if err := fn(r, true); err != nil {
				return batchID, err
			}
		}
		if len(page) < previewPage {
			break
		}
	}
	// The rest, oldest first, less what the batch carries.
	after = []byte{'p'}
	first := true
	for {
		page = page[:0]
		err := q.view(func(tx *bolt.Tx) error {
			recs := tx.Bucket(bucketRecords)
			c := tx.Bucket(bucketOrder).Cursor()
			ok, _ := c.Seek(after)
			if !first && ok != nil && bytes.Equal(ok, after) {
				ok, _ = c.Next()
			}
			for ; ok != nil && ok[0] == 'p' && len(page) < previewPage; ok, _ = c.Next() {
				after = append(after[:0], ok...)
				k := ok[9:]
				r, err := decodeRecord(k, recs.Get(k))
				if err != nil {
					return fmt.Errorf("read record %x: %w", k, err)
				}
				d := r.delta()
				if in, ok := q.inflightDeltaShared(k); ok {
					d.ExecCount -= min(in.exec, d.ExecCount)
					d.Loaded = d.Loaded && !in.loaded
				}
				if d.ExecCount == 0 && !d.Loaded {
					continue
				}
				page = append(page, d)
			}
			if ok == nil || ok[0] != 'p' {
				after = nil // done
			}
			return nil
		})
		if err != nil {
			return batchID, err
		}
		first = false
		for _, r := range page {
			if err := fn(r, false); err != nil {
				return batchID, err
			}
		}
		if after == nil {
			return batchID, nil
		}
	}
}

// previewPage is how many records Preview reads at once.
const previewPage = 64

// view runs fn in a read transaction, holding flushMu only while it runs.
func (q *Queue) view(fn func(tx *bolt.Tx) error) error {
	q.flushMu.Lock()
	defer q.flushMu.Unlock()
	if q.db == nil {
		return ErrClosed
	}
	defer q.release()
	return q.db.View(fn)
}

// inflightDeltaShared is inflightDelta for a caller inside view.
func (q *Queue) inflightDeltaShared(k []byte) (inflightDelta, bool) { return q.inflightDelta(k) }

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

// batchID is derived from the content and the queue's salt: the same
// pending content gives the same ID, and two installations never share
// one.
func (q *Queue) batchID(recs []wire.Record) string {
	h := sha256.New()
	h.Write(q.salt)
	json.NewEncoder(h).Encode(recs)
	return hex.EncodeToString(h.Sum(nil)[:16])
}

// setInflight makes b the batch in flight, or none when nil.
func (q *Queue) setInflight(b *inflightBatch) {
	q.inflight = b
	if b == nil {
		q.nBatch.Store(0)
		q.nBatchExecs.Store(0)
		return
	}
	var execs uint64
	for _, d := range b.deltas {
		execs += d.exec
	}
	q.nBatch.Store(int64(b.n))
	q.nBatchExecs.Store(execs)
}

// clearInflightTx deletes the batch in flight from the file.
func clearInflightTx(tx *bolt.Tx) error {
	if err := tx.Bucket(bucketInflight).Delete(keyBatch); err != nil {
		return err
	}
	if err := tx.DeleteBucket(bucketInflightRecords); err != nil && !errors.Is(err, berrors.ErrBucketNotFound) {
		return err
	}
	_, err := tx.CreateBucket(bucketInflightRecords)
	return err
}

// MarkSent records that the server accepted the batch: each record's
// SentCount advances by exactly the executions the batch carried, so
// executions seen after TakeBatch stay pending.
func (q *Queue) MarkSent(batchID string) error {
	return q.settle(batchID, "mark batch sent", false)
}

// DropBatch records that the server refused the batch for good (400, 413,
// 422): its counts are treated as sent and lost, and its records are
// counted in Stats().Dropped.
func (q *Queue) DropBatch(batchID string) error {
	return q.settle(batchID, "drop batch", true)
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
	if q.inflight == nil || q.inflight.id != batchID {
		return fmt.Errorf("release batch %q: %w", batchID, ErrUnknownBatch)
	}
	if err := q.db.Update(clearInflightTx); err != nil {
		return fmt.Errorf("release batch: %w", err)
	}
	q.setInflight(nil)
	return nil
}

func (q *Queue) settle(batchID, what string, drop bool) error {
	q.flushMu.Lock()
	defer q.flushMu.Unlock()
	if q.db == nil {
		return ErrClosed
	}
	if q.inflight == nil || q.inflight.id != batchID {
		return fmt.Errorf("%s %q: %w", what, batchID, ErrUnknownBatch)
	}
	b := q.inflight
	var ch counterChange
	err := q.db.Update(func(tx *bolt.Tx) error {
		recs, order := tx.Bucket(bucketRecords), tx.Bucket(bucketOrder)
		for k, d := range b.deltas {
			v := recs.Get(k[:])
			if v == nil {
				continue // evicted since
			}
			r, err := decodeRecord(k[:], v)
			if err != nil {
				return fmt.Errorf("read record %x: %w", k, err)
			}
			r.SentCount = min(r.SentCount+d.exec, r.ExecCount)
			if d.loaded {
				r.LoadedSent = true
			}
			nv, err := encodeRecord(r)
			if err != nil {
				return err
			}
			if err := put(recs, order, k[:], nv, &ch); err != nil {
				return err
			}
		}
		if drop {
			if err := putCounter(tx, keyDropped, q.dropped.Load()+uint64(b.n)); err != nil {
				return err
			}
		}
		return clearInflightTx(tx)
	})
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	ch.apply(q)
	if drop {
		q.dropped.Add(uint64(b.n))
	}
	q.setInflight(nil)
	q.release()
	return nil
}

// Records returns every stored record, committed ones only, for
// diagnostics and tests: unlike everything else it holds them all in
// memory.
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
