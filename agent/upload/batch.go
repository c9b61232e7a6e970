package upload

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"

	"github.com/cloudprotect/cloudprotect/wire"
)

// NewBatch is the batch the uploader sends for records taken from the
// queue: the local API's preview uses it too, so that what is shown is
// what is sent.
func NewBatch(id string, recs []wire.Record, statementVersion int) wire.Batch {
	if recs == nil {
		recs = []wire.Record{}
	}
	return wire.Batch{BatchID: id, StatementVersion: statementVersion, Records: recs}
}

// EncodeBatch returns the body of POST /v1/statistics for b: its JSON,
// gzip-compressed.
func EncodeBatch(b *wire.Batch) ([]byte, error) {
	gz, _, err := encodeBatch(b)
	return gz, err
}

// encodeBatch is EncodeBatch; it also returns the size of the JSON, which
// the server bounds too (wire.MaxBatchDecoded).
func encodeBatch(b *wire.Batch) (gz []byte, decoded int, err error) {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	cw := &countWriter{w: zw}
	if err := json.NewEncoder(cw).Encode(b); err != nil {
		return nil, 0, fmt.Errorf("encode batch: %w", err)
	}
	if err := zw.Close(); err != nil {
		return nil, 0, fmt.Errorf("encode batch: %w", err)
	}
	return buf.Bytes(), cw.n, nil
}

// countWriter counts what is written through it.
type countWriter struct {
	w io.Writer
	n int
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += n
	return n, err
}
