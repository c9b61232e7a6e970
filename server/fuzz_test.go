package server

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/wire"
)

var fuzzNow = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func gzipBytes(t testing.TB, b []byte) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(b)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func seeds(t testing.TB, dir string) map[string][]byte {
	files, err := filepath.Glob(filepath.Join("testdata", dir, "*.json"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no seeds in testdata/%s: %v", dir, err)
	}
	out := map[string][]byte{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out[filepath.Base(f)] = b
	}
	return out
}

// checkAPIError checks that err is an answer a client can act on.
func checkAPIError(t *testing.T, err error, allowed ...int) {
	t.Helper()
	var ae *apiError
	if !errors.As(err, &ae) {
		t.Fatalf("error %v (%T) is not an API error", err, err)
	}
	for _, s := range allowed {
		if ae.status == s {
			if ae.msg == "" || ae.hint == "" || len(ae.msg) > 310 {
				t.Fatalf("error %q (hint %q): want a short message and a hint", ae.msg, ae.hint)
			}
			return
		}
	}
	t.Fatalf("status %d for %q; want one of %v", ae.status, ae.msg, allowed)
}

func TestDecodeBatchSeeds(t *testing.T) {
	t.Parallel()
	want := map[string]int{
		"valid-two-records.json":        0,
		"malformed-elf.json":            0,
		"home-path-not-anonymised.json": 422,
		"unknown-field-verdict.json":    400,
		"null-records.json":             422,
		"trailing-object.json":          400,
		"out-of-range-numbers.json":     400,
		"bad-unicode-and-times.json":    422,
	}
	for name, data := range seeds(t, "batches") {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			status, ok := want[name]
			if !ok {
				t.Fatalf("seed %s has no expected outcome here", name)
			}
			_, err := DecodeBatch(bytes.NewReader(gzipBytes(t, data)), fuzzNow)
			if status == 0 {
				if err != nil {
					t.Fatalf("DecodeBatch: %v", err)
				}
				return
			}
			checkAPIError(t, err, status)
		})
	}
}

// FuzzDecodeBatch feeds the batch decoder hostile bodies: JSON that it
// gzips first (compressed false) so that mutations reach the JSON and the
// validator, and raw bytes (compressed true) for the gzip reader. It must
// never panic, must answer 400, 413 or 422, and whatever it accepts must
// be valid and survive a round trip.
func FuzzDecodeBatch(f *testing.F) {
	for _, data := range seeds(f, "batches") {
		f.Add(data, false)
		f.Add(gzipBytes(f, data), true)
	}
	f.Fuzz(func(t *testing.T, data []byte, compressed bool) {
		body := data
		if !compressed {
			body = gzipBytes(t, data)
		}
		b, err := DecodeBatch(bytes.NewReader(body), fuzzNow)
		if err != nil {
			checkAPIError(t, err, 400, 413, 422)
			return
		}
		if verr := b.Validate(fuzzNow); verr != nil {
			t.Fatalf("accepted an invalid batch: %v", verr)
		}
		if len(b.Records) == 0 || len(b.Records) > wire.MaxBatchRecords {
			t.Fatalf("accepted %d records", len(b.Records))
		}
		again, err := json.Marshal(b)
		if err != nil {
			t.Fatalf("re-encode accepted batch: %v", err)
		}
		b2, err := DecodeBatch(bytes.NewReader(gzipBytes(t, again)), fuzzNow)
		if err != nil {
			t.Fatalf("accepted batch fails after a round trip: %v", err)
		}
		if again2, _ := json.Marshal(b2); !bytes.Equal(again, again2) {
			t.Fatalf("round trip changed the batch:\n%s\n%s", again, again2)
		}
		if stats := Aggregate(b.Records); len(stats) > len(b.Records) {
			t.Fatalf("aggregated %d records into %d", len(b.Records), len(stats))
		}
	})
}

// FuzzDecodeLookup feeds the bulk lookup decoder hostile bodies.
func FuzzDecodeLookup(f *testing.F) {
	for _, data := range seeds(f, "lookups") {
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		hashes, err := DecodeLookup(bytes.NewReader(data))
		if err != nil {
			checkAPIError(t, err, 400, 413)
			return
		}
		if len(hashes) == 0 || len(hashes) > wire.MaxLookupHashes {
			t.Fatalf("accepted %d hashes", len(hashes))
		}
		seen := map[string]bool{}
		for _, h := range hashes {
			if !wire.ValidSHA256(h) || seen[h] {
				t.Fatalf("accepted %q (repeated: %v)", h, seen[h])
			}
			seen[h] = true
		}
	})
}
