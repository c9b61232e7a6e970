package queue

import (
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/identify"
	"github.com/cloudprotect/cloudprotect/wire"
)

// Record is the aggregated statistics of one executable, as stored.
type Record struct {
	identify.Facts // latest facts seen for this hash

	ExecCount  uint64 // executions seen since the record was created
	SentCount  uint64 // executions already sent (or dropped by the server)
	Loaded     bool   // seen in a download folder
	LoadedSent bool   // the loaded flag was sent
	FirstSeen  time.Time
	LastSeen   time.Time
}

// Pending reports whether the record has something not yet sent.
func (r *Record) Pending() bool {
	return r.ExecCount > r.SentCount || (r.Loaded && !r.LoadedSent)
}

// delta is the wire form of what is pending in r: the executions since
// the last send, and the loaded flag if it was not sent yet.
func (r *Record) delta() wire.Record {
	return wire.Record{
		Facts:     r.Facts,
		ExecCount: r.ExecCount - min(r.SentCount, r.ExecCount),
		Loaded:    r.Loaded && !r.LoadedSent,
		FirstSeen: r.FirstSeen.UTC(),
		LastSeen:  r.LastSeen.UTC(),
	}
}

// Value layout, format 1:
//
//	[0]      format (1)
//	[1:9]    FirstSeen, Unix nanoseconds, big endian
//	[9:17]   LastSeen
//	[17:25]  ExecCount
//	[25:33]  SentCount
//	[33]     flags: 1 Loaded, 2 LoadedSent
//	[34:]    identify.Facts as JSON
//
// The fixed header lets Open build its index without decoding the JSON.
const (
	valueFormat    = 1
	valueHeaderLen = 34
	flagLoaded     = 1
	flagLoadedSent = 2
)

var errBadValue = errors.New("bad record value")

// header is the fixed part of a stored value.
type header struct {
	first, last int64
	exec, sent  uint64
	flags       byte
}

func (h header) pending() bool {
	return h.exec > h.sent || (h.flags&flagLoaded != 0 && h.flags&flagLoadedSent == 0)
}

func decodeHeader(v []byte) (header, error) {
	if len(v) < valueHeaderLen || v[0] != valueFormat {
		return header{}, errBadValue
	}
	be := binary.BigEndian
	return header{
		first: int64(be.Uint64(v[1:])),
		last:  int64(be.Uint64(v[9:])),
		exec:  be.Uint64(v[17:]),
		sent:  be.Uint64(v[25:]),
		flags: v[33],
	}, nil
}

func encodeRecord(r *Record) ([]byte, error) {
	facts, err := json.Marshal(r.Facts)
	if err != nil {
		return nil, fmt.Errorf("encode record: %w", err)
	}
	v := make([]byte, valueHeaderLen, valueHeaderLen+len(facts))
	be := binary.BigEndian
	v[0] = valueFormat
	be.PutUint64(v[1:], uint64(r.FirstSeen.UnixNano()))
	be.PutUint64(v[9:], uint64(r.LastSeen.UnixNano()))
	be.PutUint64(v[17:], r.ExecCount)
	be.PutUint64(v[25:], r.SentCount)
	if r.Loaded {
		v[33] |= flagLoaded
	}
	if r.LoadedSent {
		v[33] |= flagLoadedSent
	}
	return append(v, facts...), nil
}

func decodeRecord(k, v []byte) (*Record, error) {
	h, err := decodeHeader(v)
	if err != nil {
		return nil, err
	}
	r := &Record{
		ExecCount:  h.exec,
		SentCount:  h.sent,
		Loaded:     h.flags&flagLoaded != 0,
		LoadedSent: h.flags&flagLoadedSent != 0,
		FirstSeen:  time.Unix(0, h.first).UTC(),
		LastSeen:   time.Unix(0, h.last).UTC(),
	}
	if err := json.Unmarshal(v[valueHeaderLen:], &r.Facts); err != nil {
		return nil, fmt.Errorf("%w: %w", errBadValue, err)
	}
	if r.SHA256 != hex.EncodeToString(k) {
		return nil, fmt.Errorf("%w: hash does not match key", errBadValue)
	}
	return r, nil
}

// ErrBadHash is returned by Add for an event whose SHA256 is not 64 hex
// digits.
var ErrBadHash = errors.New("queue: SHA-256 is not 64 lowercase hex digits")

// parseHash decodes a lowercase hex SHA-256 (as identify writes it)
// without allocating.
func parseHash(s string) (k [32]byte, err error) {
	if len(s) != 64 {
		return k, ErrBadHash
	}
	for i := range 32 {
		hi, ok1 := unhex(s[2*i])
		lo, ok2 := unhex(s[2*i+1])
		if !ok1 || !ok2 {
			return k, ErrBadHash
		}
		k[i] = hi<<4 | lo
	}
	return k, nil
}

func unhex(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10, true
	}
	return 0, false
}
