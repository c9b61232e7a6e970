package localapi

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
)

// streamQueue answers GET /v1/queue with the backend's preview, writing
// each record as it comes, so the answer costs the agent a page of
// records whatever the size of the queue, and each write has its own
// deadline. The JSON is an api.QueuePreview with "records" first. An
// error before the first record is returned for the caller to answer
// with; a later one ends the answer short (the client sees broken JSON).
func streamQueue(ctx context.Context, w http.ResponseWriter, timeout time.Duration, b Backend) (started bool, err error) {
	rc := http.NewResponseController(w)
	bw := bufio.NewWriterSize(&deadlineWriter{w: w, rc: rc, timeout: timeout}, 32<<10)
	enc := json.NewEncoder(bw)
	n := 0
	start := func() error {
		if started {
			return nil
		}
		started = true
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusOK)
		_, err := bw.WriteString(`{"records":[`)
		return err
	}
	head, err := b.QueuePreview(ctx, func(rec api.QueueRecord) error {
		if err := start(); err != nil {
			return err
		}
		if n > 0 {
			if err := bw.WriteByte(','); err != nil {
				return err
			}
		}
		n++
		return enc.Encode(rec)
	})
	if err != nil {
		return started, err
	}
	if err := start(); err != nil {
		return started, err
	}
	head.Records = nil
	rest, err := json.Marshal(head)
	if err != nil || len(rest) < 2 || rest[0] != '{' {
		return started, fmt.Errorf("encode queue totals: %w", err)
	}
	if _, err := bw.WriteString("],"); err != nil {
		return started, err
	}
	if _, err := bw.Write(rest[1:]); err != nil {
		return started, err
	}
	if err := bw.WriteByte('\n'); err != nil {
		return started, err
	}
	return started, bw.Flush()
}
