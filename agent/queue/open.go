package queue

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime/debug"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/cloudprotect/cloudprotect/agent/internal/atomicfile"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/cloudprotect/cloudprotect/wire"
)

// errDamaged marks a file Open moves aside.
var errDamaged = errors.New("queue file damaged")

// Open opens (or creates) the queue at path. A damaged file is moved aside
// and replaced by an empty queue, with a warning; see Queue for what is
// checked and repaired. Open fails only when the file cannot be used at
// all: its directory is missing or unwritable, or another process holds
// it.
func Open(path string, opts Options) (*Queue, error) {
	opts.setDefaults()
	q := &Queue{
		path:  path,
		opts:  opts,
		log:   opts.Logger.With("queue", path),
		buf:   make(map[[32]byte]delta),
		kick:  make(chan struct{}, 1),
		dirty: make(chan struct{}, 1),
	}
	err := q.open()
	if errors.Is(err, errDamaged) {
		aside := path + ".corrupt-" + opts.Clock().UTC().Format("20060102T150405.000000000Z")
		if rerr := os.Rename(path, aside); rerr != nil {
			return nil, fmt.Errorf("open queue: move damaged file aside: %w", rerr)
		}
		q.log.Warn("queue file was damaged: moved aside, starting with an empty queue; the statistics it held are not sent",
			"reason", err, "moved_to", aside)
		err = q.open()
	}
	if err != nil {
		return nil, fmt.Errorf("open queue: %w", err)
	}
	return q, nil
}

// open opens the file, checks it, repairs what can be repaired in place
// and loads the index. It returns an error wrapping errDamaged when the
// file must be moved aside.
func (q *Queue) open() (err error) {
	if _, serr := os.Stat(filepath.Dir(q.path)); serr != nil {
		return serr
	}
	var db *bolt.DB
	// A damaged file can make bbolt panic, or fault on a page past the end
	// of a truncated file; both become errors here.
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			if db != nil {
				db.Close()
			}
			err = fmt.Errorf("%w: %v", errDamaged, r)
		}
	}()
	// The initial mapping covers a full queue (address space, not memory),
	// so commits do not remap the file as it grows.
	db, err = bolt.Open(q.path, 0o600, &bolt.Options{Timeout: time.Second, InitialMmapSize: 2 * DefaultMaxBytes})
	if err != nil {
		if errors.Is(err, berrors.ErrTimeout) {
			return fmt.Errorf("%s is in use by another process: %w", q.path, err)
		}
		if errors.Is(err, fs.ErrPermission) || errors.Is(err, fs.ErrNotExist) {
			return err
		}
		return fmt.Errorf("%w: %w", errDamaged, err)
	}
	if err := q.check(db); err != nil {
		db.Close()
		return err
	}
	q.db = db
	q.release() // the checks read every page
	return nil
}

// check validates and repairs an open file and loads the index.
func (q *Queue) check(db *bolt.DB) error {
	err := db.View(func(tx *bolt.Tx) error {
		// bbolt grows the file before a commit refers to new pages, so a
		// file shorter than its pages was truncated. Checked first: the
		// consistency check would fault on pages past the end.
		if st, err := os.Stat(q.path); err == nil && st.Size() < tx.Size() {
			return fmt.Errorf("%w: file is %d bytes, its pages need %d (truncated)", errDamaged, st.Size(), tx.Size())
		}
		var checkErr error
		for cerr := range tx.Check() { // drain: the check runs on its own goroutine
			if checkErr == nil {
				checkErr = cerr
			}
		}
		if checkErr != nil {
			return fmt.Errorf("%w: %w", errDamaged, checkErr)
		}
		if tx.Bucket(bucketMeta) == nil && (tx.Bucket(bucketRecords) != nil || tx.Bucket(bucketInflight) != nil) {
			return fmt.Errorf("%w: meta bucket missing", errDamaged)
		}
		if m := tx.Bucket(bucketMeta); m != nil {
			if v := string(m.Get(keyVersion)); v != schemaVersion && v != schemaVersionV1 {
				return fmt.Errorf("%w: schema version %q, this agent reads %q", errDamaged, v, schemaVersion)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return db.Update(func(tx *bolt.Tx) error {
		m := tx.Bucket(bucketMeta)
		fresh := m == nil
		if fresh {
			var err error
			if m, err = tx.CreateBucket(bucketMeta); err != nil {
				return fmt.Errorf("create meta bucket: %w", err)
			}
		}
		convert := string(m.Get(keyVersion)) == schemaVersionV1
		if convert {
			q.log.Info("converting the queue file to schema version " + schemaVersion)
		}
		if err := m.Put(keyVersion, []byte(schemaVersion)); err != nil {
			return fmt.Errorf("store schema version: %w", err)
		}
		q.salt = append([]byte(nil), m.Get(keySalt)...)
		if len(q.salt) != 16 {
			q.salt = newSalt()
			if err := m.Put(keySalt, q.salt); err != nil {
				return fmt.Errorf("store salt: %w", err)
			}
		}
		q.evicted.Store(getCounter(m, keyEvicted))
		q.dropped.Store(getCounter(m, keyDropped))
		for _, name := range [][]byte{bucketRecords, bucketOrder, bucketInflight, bucketInflightRecords} {
			if tx.Bucket(name) == nil {
				if _, err := tx.CreateBucket(name); err != nil {
					return fmt.Errorf("create %s bucket: %w", name, err)
				}
				// The order bucket and the batch's records are new in
				// version 2; anything else missing is damage.
				if !fresh && !convert {
					q.log.Warn("queue bucket was missing and is recreated empty", "bucket", string(name))
				}
			}
		}
		// Delete records that do not decode.
		recs := tx.Bucket(bucketRecords)
		var bad [][]byte
		recs.ForEach(func(k, v []byte) error {
			if len(k) != 32 || v == nil {
				bad = append(bad, append([]byte(nil), k...))
				return nil
			}
			if _, err := decodeRecord(k, v); err != nil {
				bad = append(bad, append([]byte(nil), k...))
			}
			return nil
		})
		for _, k := range bad {
			if recs.Bucket(k) != nil {
				if err := recs.DeleteBucket(k); err != nil {
					return fmt.Errorf("delete damaged record: %w", err)
				}
			} else if err := recs.Delete(k); err != nil {
				return fmt.Errorf("delete damaged record: %w", err)
			}
		}
		if len(bad) > 0 {
			q.log.Warn("queue records were damaged and are deleted", "count", len(bad))
		}
		n, err := q.count(tx)
		if err != nil {
			return err
		}
		if o := tx.Bucket(bucketOrder).Stats().KeyN; o != n || len(bad) > 0 {
			if !convert && !fresh {
				q.log.Warn("queue order was damaged and is rebuilt", "records", n, "order_keys", o)
			}
			if err := rebuildOrder(tx); err != nil {
				return err
			}
		}
		return q.loadInflight(tx)
	})
}

// count sets the counters from the records.
func (q *Queue) count(tx *bolt.Tx) (int, error) {
	var ch counterChange
	n := 0
	err := tx.Bucket(bucketRecords).ForEach(func(k, v []byte) error {
		ch.account(k, nil, v)
		n++
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("count queue records: %w", err)
	}
	q.nRecords.Store(ch.records)
	q.nPending.Store(ch.pending)
	q.nBytes.Store(ch.bytes)
	q.nPendingExecs.Store(ch.pendingExecs)
	return n, nil
}

// rebuildOrder writes the "order" bucket again from the records.
func rebuildOrder(tx *bolt.Tx) error {
	if err := tx.DeleteBucket(bucketOrder); err != nil {
		return fmt.Errorf("rebuild queue order: %w", err)
	}
	order, err := tx.CreateBucket(bucketOrder)
	if err != nil {
		return fmt.Errorf("rebuild queue order: %w", err)
	}
	return tx.Bucket(bucketRecords).ForEach(func(k, v []byte) error {
		ok, good := orderKeyOf(k, v)
		if !good {
			return nil
		}
		return order.Put(ok, nil)
	})
}

// loadInflight reads the batch in flight, converting a version 1 batch
// (one JSON value with its records); a batch that does not decode is
// discarded and its records stay pending.
func (q *Queue) loadInflight(tx *bolt.Tx) error {
	q.setInflight(nil)
	ib, irecs := tx.Bucket(bucketInflight), tx.Bucket(bucketInflightRecords)
	v := ib.Get(keyBatch)
	if v == nil {
		if irecs.Stats().KeyN > 0 {
			return clearInflightTx(tx)
		}
		return nil
	}
	discard := func(err error) error {
		q.log.Warn("queue batch in flight was damaged and is discarded; its records stay pending", "err", err)
		return clearInflightTx(tx)
	}
	var raw struct {
		ID      string          `json:"id"`
		Records json.RawMessage `json:"records"`
	}
	if err := json.Unmarshal(v, &raw); err != nil || raw.ID == "" {
		return discard(err)
	}
	if len(raw.Records) > 0 && raw.Records[0] == '[' {
		// Version 1: the records inside.
		var recs []wire.Record
		if err := json.Unmarshal(raw.Records, &recs); err != nil {
			return discard(err)
		}
		for i, r := range recs {
			data, err := json.Marshal(r)
			if err != nil {
				return discard(err)
			}
			if err := irecs.Put(binary.BigEndian.AppendUint32(nil, uint32(i)), data); err != nil {
				return err
			}
		}
		meta, _ := json.Marshal(inflightMeta{ID: raw.ID, Records: len(recs)})
		if err := ib.Put(keyBatch, meta); err != nil {
			return err
		}
	}
	in := &inflightBatch{id: raw.ID, deltas: make(map[[32]byte]inflightDelta)}
	err := irecs.ForEach(func(_, v []byte) error {
		var r wire.Record
		if err := json.Unmarshal(v, &r); err != nil {
			return err
		}
		k, err := parseHash(r.SHA256)
		if err != nil {
			return err
		}
		in.deltas[k] = inflightDelta{exec: r.ExecCount, loaded: r.Loaded}
		in.n++
		return nil
	})
	if err != nil || in.n == 0 {
		return discard(err)
	}
	q.setInflight(in)
	return nil
}

func getCounter(m *bolt.Bucket, key []byte) uint64 {
	if v := m.Get(key); len(v) == 8 {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

func putCounter(tx *bolt.Tx, key []byte, n uint64) error {
	if err := tx.Bucket(bucketMeta).Put(key, binary.BigEndian.AppendUint64(nil, n)); err != nil {
		return fmt.Errorf("store %s counter: %w", key, err)
	}
	return nil
}

// Purge deletes every record, the batch in flight and the buffer, and
// makes sure their bytes are gone from the file system as far as a
// program can: bbolt keeps freed pages, so deleting records would leave
// their bytes in the file. Instead the file is overwritten with zeros,
// fsynced and removed, and a fresh empty queue is created in its place.
// Files moved aside by Open are wiped the same way. Counters restart from
// zero.
func (q *Queue) Purge() error {
	q.flushMu.Lock()
	defer q.flushMu.Unlock()
	q.mu.Lock()
	closed := q.closed
	clear(q.buf)
	q.bufBytes = 0
	q.mu.Unlock()
	if closed {
		return ErrClosed
	}
	// q.db is nil when an earlier purge could not create the fresh queue
	// (a full disk): this purge tries again.
	if q.db != nil {
		if err := q.db.Close(); err != nil {
			q.log.Warn("close queue before purge", "err", err)
		}
	}
	q.db = nil
	q.setInflight(nil)
	var errs []error
	aside, _ := filepath.Glob(q.path + ".corrupt-*")
	for _, p := range append([]string{q.path}, aside...) {
		if err := atomicfile.Wipe(p); err != nil {
			errs = append(errs, err)
		}
	}
	if err := syncDir(filepath.Dir(q.path)); err != nil {
		errs = append(errs, err)
	}
	q.evicted.Store(0)
	q.dropped.Store(0)
	if err := q.open(); err != nil {
		errs = append(errs, fmt.Errorf("reopen queue: %w", err))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("purge queue: %w", err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
