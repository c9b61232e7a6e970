package server

import (
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/wire"
)

// agentBatch is a batch as an agent encodes it, with strings that need
// escapes.
func agentBatch(t testing.TB) []byte {
	t.Helper()
	base := time.Date(2026, 2, 28, 23, 59, 58, 123456789, time.UTC)
	var recs []wire.Record
	for i, p := range []string{"/usr/bin/ls", "~/Downloads/a \"quoted\" <name> & more", "/opt/ü/日本/😀", "/tmp/tab\there", "/srv/\\back\\slash"} {
		r := wire.Record{Facts: wire.Facts{SHA256: strings.Repeat(fmt.Sprint(i), 64), Size: int64(i * 1000), Path: p, Kind: "elf",
			ELF: &wire.ELF{Machine: "x86_64", Type: "dyn", PIE: i%2 == 0, Interpreter: "/lib64/ld-linux-x86-64.so.2", BuildID: "abcd"}},
			ExecCount: uint64(i), Loaded: i == 3, FirstSeen: base, LastSeen: base.Add(time.Duration(i) * time.Second)}
		if i == 4 {
			r.Kind, r.ELF, r.Interpreter = "script", nil, "/usr/bin/python3"
		}
		recs = append(recs, r)
	}
	b, err := json.Marshal(wire.Batch{BatchID: "01JQ7Z3K5VEXAMPLE", StatementVersion: 3, Records: recs})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// viaEncodingJSON decodes as the server did before parseBatch.
func viaEncodingJSON(data []byte) (*wire.Batch, error) {
	var b wire.Batch
	if err := decodeStrict(data, &b); err != nil {
		return nil, err
	}
	return &b, nil
}

func TestParseBatchMatchesEncodingJSON(t *testing.T) {
	t.Parallel()
	data := agentBatch(t)
	want, err := viaEncodingJSON(data)
	if err != nil {
		t.Fatal(err)
	}
	got, err := parseBatch(data, wire.MaxBatchRecords)
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("parseBatch = %+v, %v\nwant %+v", got, err, want)
	}
	for _, tc := range []struct {
		name, in, wantErr string
	}{
		{"duplicate member", `{"batch_id":"a","batch_id":"b"}`, `appears twice`},
		{"case-folded name", `{"Batch_ID":"a"}`, `unknown field "Batch_ID"`},
		{"fraction", `{"statement_version":1.0}`, `whole number`},
		{"exponent", `{"statement_version":1e2}`, `whole number`},
		{"leading zero", `{"statement_version":01}`, `whole number`},
		{"lone surrogate", `{"batch_id":"\ud800"}`, `lone surrogate`},
		{"escaped time", `{"records":[{"first_seen":"\u0032026-01-01T00:00:00Z"}]}`, `records[0].first_seen`},
		{"null record", `{"records":[null]}`, `records[0]: want a JSON object`},
		{"trailing comma", `{"records":[{},]}`, `want a JSON object`},
		{"too many", `{"records":[{},{},{}]}`, `too many records`},
		{"trailing data", `{} {}`, `data after`},
		{"truncated", `{"batch_id":"a`, `unterminated`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if _, err := parseBatch([]byte(tc.in), 2); err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("parseBatch(%s) error = %v; want it to mention %q", tc.in, err, tc.wantErr)
			}
		})
	}
}

// FuzzParseBatchAgrees holds parseBatch to encoding/json: whatever it
// accepts, encoding/json accepts too, with the same values. (It may
// refuse more: duplicate or case-folded names, invalid UTF-8.)
func FuzzParseBatchAgrees(f *testing.F) {
	f.Add(agentBatch(f))
	for _, data := range seeds(f, "batches") {
		f.Add(data)
	}
	f.Add([]byte(`{"records":[{"elf":null,"size":null,"first_seen":null}],"batch_id":"x\u00e9\n"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		got, err := parseBatch(data, 1<<20)
		if err != nil {
			return
		}
		want, werr := viaEncodingJSON(data)
		if werr != nil {
			t.Fatalf("parseBatch accepted what encoding/json refuses (%v): %q", werr, data)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("parseBatch = %+v\nencoding/json = %+v\ninput %q", got, want, data)
		}
	})
}
