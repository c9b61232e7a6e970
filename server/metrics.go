package server

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// durationBuckets are the upper bounds, in seconds, of the request
// duration histogram.
var durationBuckets = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}

// metrics counts what the server does, for /metrics in the Prometheus text
// format. Labels never carry installation IDs, hashes or paths: routes are
// the mux patterns.
type metrics struct {
	mu        sync.Mutex // protects requests and durations
	requests  map[routeCode]uint64
	durations map[string]*histogram // by route

	registrations   atomic.Uint64
	batchesAccepted atomic.Uint64
	batchesDup      atomic.Uint64
	batchesRejected atomic.Uint64
	recordsIngested atomic.Uint64
	lookupRequests  atomic.Uint64
	hashesLookedUp  atomic.Uint64
	deletions       atomic.Uint64
	panics          atomic.Uint64
}

type routeCode struct {
	route string
	code  int
}

type histogram struct {
	counts []uint64 // per bucket, not cumulative; last is +Inf
	sum    float64
	n      uint64
}

func newMetrics() *metrics {
	return &metrics{requests: map[routeCode]uint64{}, durations: map[string]*histogram{}}
}

func (m *metrics) observeRequest(route string, code int, d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.requests[routeCode{route, code}]++
	h := m.durations[route]
	if h == nil {
		h = &histogram{counts: make([]uint64, len(durationBuckets)+1)}
		m.durations[route] = h
	}
	s := d.Seconds()
	i, _ := slices.BinarySearch(durationBuckets, s)
	h.counts[i]++
	h.sum += s
	h.n++
}

// writeTo writes the exposition, metrics and series in a stable order.
func (m *metrics) writeTo(w io.Writer) error {
	bw := bufio.NewWriter(w)
	counter := func(name, help string, v uint64) {
		fmt.Fprintf(bw, "# HELP %s %s\n# TYPE %s counter\n%s %d\n", name, help, name, name, v)
	}
	counter("cloudprotect_registrations_total", "Installations registered.", m.registrations.Load())
	fmt.Fprintf(bw, "# HELP cloudprotect_batches_total Statistics batches by result.\n# TYPE cloudprotect_batches_total counter\n")
	fmt.Fprintf(bw, "cloudprotect_batches_total{result=\"accepted\"} %d\n", m.batchesAccepted.Load())
	fmt.Fprintf(bw, "cloudprotect_batches_total{result=\"duplicate\"} %d\n", m.batchesDup.Load())
	fmt.Fprintf(bw, "cloudprotect_batches_total{result=\"rejected\"} %d\n", m.batchesRejected.Load())
	counter("cloudprotect_records_ingested_total", "Statistics records counted.", m.recordsIngested.Load())
	counter("cloudprotect_lookup_requests_total", "Reputation lookup requests answered.", m.lookupRequests.Load())
	counter("cloudprotect_lookup_hashes_total", "Hashes looked up.", m.hashesLookedUp.Load())
	counter("cloudprotect_deletions_total", "Installations deleted with everything they contributed.", m.deletions.Load())
	counter("cloudprotect_panics_total", "Handler panics recovered.", m.panics.Load())

	m.mu.Lock()
	keys := make([]routeCode, 0, len(m.requests))
	for k := range m.requests {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b routeCode) int {
		if c := strings.Compare(a.route, b.route); c != 0 {
			return c
		}
		return a.code - b.code
	})
	fmt.Fprintf(bw, "# HELP cloudprotect_http_requests_total HTTP requests by route and status code.\n# TYPE cloudprotect_http_requests_total counter\n")
	for _, k := range keys {
		fmt.Fprintf(bw, "cloudprotect_http_requests_total{route=\"%s\",code=\"%d\"} %d\n", escapeLabel(k.route), k.code, m.requests[k])
	}
	routes := make([]string, 0, len(m.durations))
	for r := range m.durations {
		routes = append(routes, r)
	}
	slices.Sort(routes)
	fmt.Fprintf(bw, "# HELP cloudprotect_http_request_duration_seconds HTTP request duration by route.\n# TYPE cloudprotect_http_request_duration_seconds histogram\n")
	for _, r := range routes {
		h := m.durations[r]
		label := escapeLabel(r)
		var cum uint64
		for i, c := range h.counts {
			cum += c
			le := "+Inf"
			if i < len(durationBuckets) {
				le = strconv.FormatFloat(durationBuckets[i], 'g', -1, 64)
			}
			fmt.Fprintf(bw, "cloudprotect_http_request_duration_seconds_bucket{route=\"%s\",le=\"%s\"} %d\n", label, le, cum)
		}
		fmt.Fprintf(bw, "cloudprotect_http_request_duration_seconds_sum{route=\"%s\"} %s\n", label, formatFloat(h.sum))
		fmt.Fprintf(bw, "cloudprotect_http_request_duration_seconds_count{route=\"%s\"} %d\n", label, h.n)
	}
	m.mu.Unlock()
	return bw.Flush()
}

func formatFloat(f float64) string {
	if math.IsInf(f, 1) {
		return "+Inf"
	}
	return strconv.FormatFloat(f, 'g', -1, 64)
}

// escapeLabel escapes a label value as the text format requires.
func escapeLabel(s string) string {
	return strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(s)
}
