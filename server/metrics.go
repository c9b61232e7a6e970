package server

import (
	"bufio"
	"fmt"
	"io"
	"maps"
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

// Reasons a registration is refused, for the metrics.
const (
	refusedRateLimited  = "rate_limited"
	refusedEnrollSecret = "enroll_secret"
	refusedInvalid      = "invalid"
)

// Metrics counts what the server and its console do, for /metrics in the
// Prometheus text format. Labels never carry installation IDs, hashes,
// paths or analysts' names: routes are the mux patterns. It is safe for
// concurrent use.
type Metrics struct {
	mu        sync.Mutex // protects the maps below
	requests  map[routeCode]uint64
	durations map[string]*histogram // by route
	inflight  map[string]int64      // requests being served, by route
	refusals  map[string]uint64     // registrations refused, by reason
	changes   map[string]uint64     // verdict changes, by source
	signIns   map[string]uint64     // console sign-ins, by result

	arriving        atomic.Int64 // batch bodies being received
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

// NewMetrics returns empty metrics.
func NewMetrics() *Metrics {
	return &Metrics{
		requests: map[routeCode]uint64{}, durations: map[string]*histogram{}, inflight: map[string]int64{},
		refusals: map[string]uint64{refusedRateLimited: 0, refusedEnrollSecret: 0, refusedInvalid: 0},
		changes:  map[string]uint64{"analyst": 0, "feed": 0},
		signIns:  map[string]uint64{"ok": 0, "failed": 0, "rate_limited": 0},
	}
}

// VerdictChanged counts n changes of verdicts from source ("analyst" or
// "feed").
func (m *Metrics) VerdictChanged(source string, n int) {
	m.mu.Lock()
	m.changes[source] += uint64(n)
	m.mu.Unlock()
}

// SignIn counts a console sign-in attempt by result ("ok", "failed",
// "rate_limited").
func (m *Metrics) SignIn(result string) {
	m.mu.Lock()
	m.signIns[result]++
	m.mu.Unlock()
}

func (m *Metrics) refused(reason string) {
	m.mu.Lock()
	m.refusals[reason]++
	m.mu.Unlock()
}

// inFlight counts a request to route until done is called.
func (m *Metrics) inFlight(route string) (done func()) {
	if route == "" {
		route = "unmatched"
	}
	m.mu.Lock()
	m.inflight[route]++
	m.mu.Unlock()
	return func() {
		m.mu.Lock()
		m.inflight[route]--
		m.mu.Unlock()
	}
}

func (m *Metrics) observeRequest(route string, code int, d time.Duration) {
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

// Write writes the exposition, metrics and series in a stable order.
func (m *Metrics) Write(w io.Writer) error {
	bw := bufio.NewWriter(w)
	counter := func(name, help string, v uint64) {
		fmt.Fprintf(bw, "# HELP %s %s\n# TYPE %s counter\n%s %d\n", name, help, name, name, v)
	}
	counter("cloudprotect_registrations_total", "Installations registered.", m.registrations.Load())
	fmt.Fprintf(bw, "# HELP cloudprotect_batches_arriving Statistics batches whose bodies are being received.\n# TYPE cloudprotect_batches_arriving gauge\ncloudprotect_batches_arriving %d\n", m.arriving.Load())
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
	labelled := func(name, help, label string, values map[string]uint64) {
		fmt.Fprintf(bw, "# HELP %s %s\n# TYPE %s counter\n", name, help, name)
		for _, k := range slices.Sorted(maps.Keys(values)) {
			fmt.Fprintf(bw, "%s{%s=\"%s\"} %d\n", name, label, escapeLabel(k), values[k])
		}
	}
	labelled("cloudprotect_registrations_refused_total", "Registrations refused, by reason.", "reason", m.refusals)
	labelled("cloudprotect_verdict_changes_total", "Verdicts set or withdrawn, by source.", "source", m.changes)
	labelled("cloudprotect_console_sign_ins_total", "Console sign-in attempts, by result.", "result", m.signIns)
	fmt.Fprintf(bw, "# HELP cloudprotect_http_requests_in_flight HTTP requests being served, by route.\n# TYPE cloudprotect_http_requests_in_flight gauge\n")
	for _, k := range slices.Sorted(maps.Keys(m.inflight)) {
		fmt.Fprintf(bw, "cloudprotect_http_requests_in_flight{route=\"%s\"} %d\n", escapeLabel(k), m.inflight[k])
	}
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
