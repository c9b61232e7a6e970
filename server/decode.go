package server

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"sync"
	"time"

	"github.com/cloudprotect/cloudprotect/wire"
)

// MaxLookupBody bounds the body of POST /v1/reputation/sha256: room for
// wire.MaxLookupHashes hashes with generous whitespace.
const MaxLookupBody = 128 << 10

// maxSmallBody bounds small JSON bodies such as a registration.
const maxSmallBody = 4 << 10

// apiError is an answer other than success: a status code and the
// wire.Error body. Its hint says what the client can do about it.
type apiError struct {
	status int
	msg    string
	hint   string
}

func (e *apiError) Error() string { return e.msg }

func errorf(status int, hint, format string, args ...any) *apiError {
	return &apiError{status: status, msg: truncate(fmt.Sprintf(format, args...), 300), hint: hint}
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

const (
	hintDropBatch = "the batch cannot be accepted as it is: drop it, and fix the agent if this repeats"
	hintSplit     = "send at most 5000 records and 1 MiB of gzip (8 MiB decoded) per batch"
)

// DecodeBatch reads a gzip-compressed statistics batch and validates it
// field by field as of now. It enforces every size limit while reading:
// wire.MaxBatchCompressed bytes of gzip, wire.MaxBatchDecoded bytes of
// JSON, wire.MaxBatchRecords records. Errors are *apiError with status
// 400 (not gzip, not JSON, unknown field), 413 (too large) or 422 (a field
// out of range, named by record index and field).
func DecodeBatch(compressed io.Reader, now time.Time) (*wire.Batch, error) {
	raw, err := readLimited(compressed, wire.MaxBatchCompressed, hintSplit)
	if err != nil {
		return nil, err
	}
	zr, err := gzip.NewReader(bytes.NewReader(raw))
	if err != nil {
		return nil, errorf(http.StatusBadRequest, "compress the JSON batch with gzip", "body is not gzip: %v", err)
	}
	plain, err := io.ReadAll(io.LimitReader(zr, wire.MaxBatchDecoded+1))
	if err != nil {
		return nil, errorf(http.StatusBadRequest, hintDropBatch, "body is corrupt gzip: %v", err)
	}
	if len(plain) > wire.MaxBatchDecoded {
		return nil, errorf(http.StatusRequestEntityTooLarge, hintSplit, "batch decompresses to more than %d bytes", wire.MaxBatchDecoded)
	}
	// The envelope first, keeping the records as raw JSON: they are
	// counted before anything is decoded, then decoded in parallel.
	var env struct {
		BatchID          string          `json:"batch_id"`
		StatementVersion int             `json:"statement_version"`
		Records          json.RawMessage `json:"records"`
	}
	if err := decodeStrict(plain, &env); err != nil {
		return nil, err
	}
	b := wire.Batch{BatchID: env.BatchID, StatementVersion: env.StatementVersion}
	elems, isArray := splitArray(env.Records)
	if !isArray {
		// null, or not an array: the decoder says what is wrong.
		if err := decodeStrict(env.Records, &b.Records); err != nil {
			return nil, err
		}
	}
	if len(elems) > wire.MaxBatchRecords {
		return nil, errorf(http.StatusRequestEntityTooLarge, hintSplit, "batch holds %d records, more than %d", len(elems), wire.MaxBatchRecords)
	}
	if isArray {
		var err error
		if b.Records, err = decodeRecords(env.Records, elems); err != nil {
			return nil, err
		}
	}
	if err := b.Validate(now); err != nil {
		return nil, errorf(http.StatusUnprocessableEntity, hintDropBatch, "invalid batch: %v", err)
	}
	return &b, nil
}

// DecodeLookup reads the body of a bulk lookup and returns its hashes,
// each once, in the order first given. Errors are *apiError: 400 for bad
// JSON, an empty list or a malformed hash, 413 for more than
// wire.MaxLookupHashes hashes or MaxLookupBody bytes.
func DecodeLookup(body io.Reader) ([]string, error) {
	raw, err := readLimited(body, MaxLookupBody, fmt.Sprintf("send at most %d hashes per lookup", wire.MaxLookupHashes))
	if err != nil {
		return nil, err
	}
	var req wire.LookupRequest
	if err := decodeStrict(raw, &req); err != nil {
		return nil, err
	}
	if len(req.SHA256) == 0 {
		return nil, errorf(http.StatusBadRequest, `send {"sha256": ["<64 lowercase hex digits>", ...]}`, "sha256: empty: nothing to look up")
	}
	if len(req.SHA256) > wire.MaxLookupHashes {
		return nil, errorf(http.StatusRequestEntityTooLarge, fmt.Sprintf("split the lookup into requests of at most %d hashes", wire.MaxLookupHashes),
			"lookup holds %d hashes, more than %d", len(req.SHA256), wire.MaxLookupHashes)
	}
	seen := make(map[string]bool, len(req.SHA256))
	out := make([]string, 0, len(req.SHA256))
	for i, h := range req.SHA256 {
		if !wire.ValidSHA256(h) {
			return nil, errorf(http.StatusBadRequest, "a SHA-256 is 64 lowercase hex digits", "sha256[%d]: not a SHA-256", i)
		}
		if !seen[h] {
			seen[h] = true
			out = append(out, h)
		}
	}
	return out, nil
}

// readLimited reads all of r, failing with 413 beyond limit bytes.
func readLimited(r io.Reader, limit int64, hint string) ([]byte, error) {
	raw, err := io.ReadAll(io.LimitReader(r, limit+1))
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) || int64(len(raw)) > limit {
		return nil, errorf(http.StatusRequestEntityTooLarge, hint, "body is larger than %d bytes", limit)
	}
	if err != nil {
		return nil, errorf(http.StatusBadRequest, "send the whole body", "read body: %v", err)
	}
	return raw, nil
}

// decodeStrict decodes exactly one JSON value into v, rejecting unknown
// fields and trailing data.
func decodeStrict(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return errorf(http.StatusBadRequest, "send one JSON object with the fields of the wire format, and no others", "body is not valid JSON for this endpoint: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return errorf(http.StatusBadRequest, "send one JSON object and nothing after it", "body holds data after the JSON object")
	}
	return nil
}

// span is where one element of a JSON array lies in its text.
type span struct{ start, end int }

// splitArray returns the spans of the elements of raw, a valid JSON
// value, or false if it is not an array.
func splitArray(raw []byte) ([]span, bool) {
	i := skipSpace(raw, 0)
	if i >= len(raw) || raw[i] != '[' {
		return nil, false
	}
	var out []span
	i = skipSpace(raw, i+1)
	if i < len(raw) && raw[i] == ']' {
		return out, true
	}
	for i < len(raw) {
		start, depth, inString := i, 0, false
		for ; i < len(raw); i++ {
			c := raw[i]
			if inString {
				switch c {
				case '\\':
					i++
				case '"':
					inString = false
				}
				continue
			}
			switch c {
			case '"':
				inString = true
				continue
			case '{', '[':
				depth++
				continue
			case '}', ']':
				if depth > 0 {
					depth--
					continue
				}
			case ',':
				if depth > 0 {
					continue
				}
			default:
				continue
			}
			break // a ',' or the closing ']' at depth 0
		}
		end := i
		for end > start && isSpace(raw[end-1]) {
			end--
		}
		out = append(out, span{start, end})
		if i >= len(raw) || raw[i] == ']' {
			break
		}
		i = skipSpace(raw, i+1)
	}
	return out, true
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

func skipSpace(b []byte, i int) int {
	for i < len(b) && isSpace(b[i]) {
		i++
	}
	return i
}

// parallelFrom is the number of records from which a batch is decoded by
// several goroutines.
const parallelFrom = 256

// decodeRecords decodes the elements of the records array, in parallel
// chunks on every processor for a large batch: decoding is most of the
// server's own work on a batch.
func decodeRecords(raw []byte, elems []span) ([]wire.Record, error) {
	out := make([]wire.Record, len(elems))
	workers := min(runtime.GOMAXPROCS(0), 4, max(1, len(elems)/parallelFrom))
	per := (len(elems) + workers - 1) / workers
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for w := range workers {
		lo, hi := w*per, min((w+1)*per, len(elems))
		if lo >= hi {
			continue
		}
		decode := func() {
			for i := lo; i < hi; i++ {
				if err := decodeStrict(raw[elems[i].start:elems[i].end], &out[i]); err != nil {
					var ae *apiError
					if errors.As(err, &ae) {
						ae.msg = truncate(fmt.Sprintf("records[%d]: %s", i, ae.msg), 300)
					}
					errs[w] = err
					return
				}
			}
		}
		if w == workers-1 {
			decode()
		} else {
			wg.Go(decode)
		}
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}
