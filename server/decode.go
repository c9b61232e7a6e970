package server

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
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
	b, err := parseBatch(plain, wire.MaxBatchRecords)
	var tooMany errTooManyRecords
	var syntax *jsonError
	switch {
	case errors.As(err, &syntax) && syntax.content:
		return nil, errorf(http.StatusUnprocessableEntity, hintDropBatch, "invalid batch: %v", syntax)
	case errors.As(err, &tooMany):
		return nil, errorf(http.StatusRequestEntityTooLarge, hintSplit, "batch holds more than %d records", wire.MaxBatchRecords)
	case errors.As(err, &syntax):
		return nil, errorf(http.StatusBadRequest, "send one JSON object with the fields of the wire format, and no others", "body is not valid JSON for this endpoint: %v", syntax)
	case err != nil:
		return nil, errorf(http.StatusBadRequest, hintDropBatch, "read batch: %v", err)
	}
	if err := b.Validate(now); err != nil {
		return nil, errorf(http.StatusUnprocessableEntity, hintDropBatch, "invalid batch: %v", err)
	}
	return b, nil
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
