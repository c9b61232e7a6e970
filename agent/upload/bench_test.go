package upload_test

import (
	"context"
	"encoding/json"
	"path/filepath"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/cloud"
	"github.com/cloudprotect/cloudprotect/agent/upload"
	"github.com/cloudprotect/cloudprotect/agent/upload/uploadtest"
	"github.com/cloudprotect/cloudprotect/wire"
)

// BenchmarkWireBytesPerRecord measures what the uploader puts on the wire
// per record: a full batch of realistic records (EncodeBatch: JSON, then
// gzip), and the JSON before compression.
func BenchmarkWireBytesPerRecord(b *testing.B) {
	for _, n := range []int{100, 1000, wire.MaxBatchRecords} {
		b.Run(itoa(n), func(b *testing.B) {
			recs := make([]wire.Record, n)
			for i := range recs {
				recs[i] = uploadtest.Record(i, uint64(i%9+1), start)
			}
			batch := upload.NewBatch("bench", recs, 1)
			raw, _ := json.Marshal(batch)
			var gz []byte
			for b.Loop() {
				var err error
				if gz, err = upload.EncodeBatch(&batch); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(gz))/float64(n), "gzip-B/record")
			b.ReportMetric(float64(len(raw))/float64(n), "json-B/record")
		})
	}
}

func itoa(n int) string {
	data, _ := json.Marshal(n)
	return string(data)
}

// BenchmarkDrain100k measures how long an agent's uploader takes to send
// 100,000 pending records to the reference cloud on loopback: an
// in-memory queue feeds the real Uploader (real clock, Send now), which
// posts to the real server over SQLite in a temporary folder.
func BenchmarkDrain100k(b *testing.B) {
	const n = 100_000
	seen := time.Now().Add(-time.Hour)
	recs := make([]wire.Record, n)
	for i := range recs {
		recs[i] = uploadtest.Record(i, uint64(i%9+1), seen)
	}
	var total time.Duration
	for b.Loop() {
		b.StopTimer()
		rs := newRealServer(b, time.Now)
		q := uploadtest.NewQueue(0)
		inst, err := cloud.Open(cloud.Options{
			StatePath:        filepath.Join(b.TempDir(), cloud.StateFile),
			Server:           func() string { return rs.url },
			Allowed:          func() bool { return true },
			StatementVersion: func() int { return 1 },
		})
		if err != nil {
			b.Fatal(err)
		}
		up, err := upload.New(upload.Options{
			Queue:            q,
			Installation:     inst,
			Allowed:          func() bool { return true },
			StatementVersion: func() int { return 1 },
			Interval:         24 * time.Hour, // only Send now sends
		})
		if err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 2)
		go func() { done <- inst.Serve(ctx) }()
		go func() { done <- up.Serve(ctx) }()
		// Serve's first pass finds the queue empty and schedules the next
		// upload; then the records arrive.
		for up.Status().NextAttempt == nil {
			time.Sleep(time.Millisecond)
		}
		q.Add(recs...)
		b.StartTimer()
		t0 := time.Now()
		res, err := up.SendNow(ctx)
		for err == nil && res.Pending > 0 {
			more := res.Sent
			res, err = up.SendNow(ctx)
			res.Sent += more
		}
		total += time.Since(t0)
		b.StopTimer()
		if err != nil || res.Sent != n {
			b.Fatalf("SendNow = %+v, %v; want %d sent", res, err, n)
		}
		cancel()
		<-done
		<-done
		b.StartTimer()
	}
	b.ReportMetric(float64(n)*float64(b.N)/total.Seconds(), "records/s")
}
