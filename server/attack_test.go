package server_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/server"
	"github.com/cloudprotect/cloudprotect/server/store/storetest"
	"github.com/cloudprotect/cloudprotect/server/verdict"
	"github.com/cloudprotect/cloudprotect/wire"
)

// established registers n installations a month before now and has each
// send a batch on three days, so that the default rules count them as
// established; the clock is back at now afterwards.
func (e *env) established(n int, recs func(i int) []wire.Record) []wire.Registration {
	e.t.Helper()
	regs := make([]wire.Registration, n)
	e.clock.Set(now.Add(-30 * 24 * time.Hour))
	for i := range regs {
		regs[i] = e.register()
	}
	for day := range 3 {
		shift := time.Duration(day-3) * 24 * time.Hour
		e.clock.Set(now.Add(shift))
		for i, reg := range regs {
			rs := recs(i)
			for j := range rs {
				rs[j].FirstSeen, rs[j].LastSeen = rs[j].FirstSeen.Add(shift), rs[j].LastSeen.Add(shift)
			}
			if a := e.postBatch(reg.Token, batch(fmt.Sprint("day", day), rs...)); a.status != http.StatusOK {
				e.t.Fatalf("installation %d, day %d: %d %s", i, day, a.status, a.body)
			}
		}
	}
	e.clock.Set(now)
	return regs
}

// TestOneMalformedReportLeavesVerdict reproduces the attack in which one
// installation reported a system program's ELF header as malformed, and
// every participant's agent then alerted on the program.
func TestOneMalformedReportLeavesVerdict(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		e := newEnvWith(t, server.Config{Store: storetest.New(t, b), Rules: verdict.Default(), RegisterBurst: -1})
		base32 := record("base32", 1)
		honest := e.established(8, func(int) []wire.Record { return []wire.Record{base32} })
		attacker := e.established(1, func(int) []wire.Record { return []wire.Record{record("ls", 1)} })[0]

		bad := record("base32", 1)
		bad.ELF.Malformed = "section header table out of bounds"
		if a := e.postBatch(attacker.Token, batch("attack", bad)); a.status != http.StatusOK {
			t.Fatalf("attacker's report: %d %s", a.status, a.body)
		}
		// A few fresh installations join in.
		for i := range 5 {
			if a := e.postBatch(e.register().Token, batch("attack", bad)); a.status != http.StatusOK {
				t.Fatalf("fresh report %d: %d %s", i, a.status, a.body)
			}
		}
		rep := e.lookup(honest[0].Token, hashOf("base32"))[0]
		if rep.Verdict != wire.VerdictUnknown || rep.Source != wire.SourcePrevalence {
			t.Fatalf("after malformed reports from one established and 5 fresh installations: %s from %s; want unknown from prevalence", rep.Verdict, rep.Source)
		}

		// Real evidence still counts: a file that established
		// installations agree is malformed is untrusted.
		broken := record("broken", 1)
		broken.ELF.Malformed = "truncated program header"
		e.established(3, func(int) []wire.Record { return []wire.Record{broken} })
		if rep := e.lookup(honest[0].Token, hashOf("broken"))[0]; rep.Verdict != wire.VerdictUntrusted || rep.Source != wire.SourcePrevalence {
			t.Fatalf("malformed on 3 established installations: %s from %s; want untrusted from prevalence", rep.Verdict, rep.Source)
		}
	})
}

// TestFreshRegistrationsCannotTrust reproduces the attack in which five
// registrations made any hash trusted; fifty cannot either.
func TestFreshRegistrationsCannotTrust(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		e := newEnvWith(t, server.Config{Store: storetest.New(t, b), Rules: verdict.Default(), RegisterBurst: -1})
		victim := e.register()
		for _, n := range []int{5, 50} {
			evil := record(fmt.Sprint("dropper", n), 1)
			evil.Path = "~/Downloads/invoice.pdf"
			for i := range n {
				if a := e.postBatch(e.register().Token, batch("b", evil)); a.status != http.StatusOK {
					t.Fatalf("registration %d of %d: %d %s", i, n, a.status, a.body)
				}
			}
			rep := e.lookup(victim.Token, evil.SHA256)[0]
			if rep.Prevalence != n || rep.Verdict == wire.VerdictTrusted {
				t.Fatalf("%d fresh registrations: verdict %s, prevalence %d; want not trusted, prevalence %d", n, rep.Verdict, rep.Prevalence, n)
			}
		}
		// Neither do established ones: only feeds and analysts trust.
		e.established(6, func(int) []wire.Record { return []wire.Record{record("tool", 1)} })
		if rep := e.lookup(victim.Token, hashOf("tool"))[0]; rep.Verdict != wire.VerdictUnknown {
			t.Fatalf("6 established installations: %s; want unknown", rep.Verdict)
		}
	})
}

var refusedLine = regexp.MustCompile(`cloudprotect_registrations_refused_total\{reason="rate_limited"\} (\d+)`)

// TestRegistrationFlood registers 2,000 times from one address as fast as
// it can: the address gets its burst, the rest 429 with Retry-After,
// while another address behind the trusted proxy still registers.
func TestRegistrationFlood(t *testing.T) {
	t.Parallel()
	st := storetest.New(t, storetest.Backends()[0])
	e := newEnvWith(t, server.Config{Store: st, RegisterBurst: 20, RegisterInterval: time.Minute,
		TrustedProxies: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}})
	const total = 2000
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex // protects counts and badRetry
		counts  = map[int]int{}
		badHint int
	)
	body := []byte(`{"agent_version":"1.0.0","statement_version":1}`)
	work := make(chan int)
	for range 16 {
		wg.Go(func() {
			for range work {
				a := e.do("POST", "/v1/installations", "", body, map[string]string{"X-Forwarded-For": "203.0.113.9"})
				mu.Lock()
				counts[a.status]++
				if a.status == http.StatusTooManyRequests {
					if s, err := strconv.Atoi(a.header.Get("Retry-After")); err != nil || s < 1 || s > 60 {
						badHint++
					}
				}
				mu.Unlock()
			}
		})
	}
	for i := range total {
		work <- i
	}
	close(work)
	wg.Wait()
	if counts[http.StatusCreated] != 20 || counts[http.StatusTooManyRequests] != total-20 || badHint != 0 {
		t.Fatalf("statuses %v, %d without a usable Retry-After; want 20 created and %d refused with Retry-After", counts, badHint, total-20)
	}
	a := e.do("POST", "/v1/installations", "", body, map[string]string{"X-Forwarded-For": "198.51.100.7, 203.0.113.9"})
	if a.status != http.StatusTooManyRequests {
		t.Fatalf("a forged first hop before the flooding address: %d; want 429 (the proxy appended the real one)", a.status)
	}
	if a := e.do("POST", "/v1/installations", "", body, map[string]string{"X-Forwarded-For": "198.51.100.7"}); a.status != http.StatusCreated {
		t.Fatalf("another address: %d %s; want 201", a.status, a.body)
	}
	m := refusedLine.FindStringSubmatch(string(e.do("GET", "/metrics", "", nil, nil).body))
	if m == nil || m[1] != strconv.Itoa(total-20+1) {
		t.Fatalf("metrics count %v refusals; want %d", m, total-20+1)
	}
}

func TestEnrollSecret(t *testing.T) {
	t.Parallel()
	e := newEnvWith(t, server.Config{Store: storetest.New(t, storetest.Backends()[0]), RegisterBurst: -1, EnrollSecret: []byte("s3cret-of-the-organisation")})
	for _, tc := range []struct {
		name, secret string
		want         int
	}{
		{"none", "", http.StatusForbidden},
		{"wrong", "guess", http.StatusForbidden},
		{"prefix", "s3cret", http.StatusForbidden},
		{"right", "s3cret-of-the-organisation", http.StatusCreated},
	} {
		body := mustJSON(t, wire.RegisterRequest{AgentVersion: "1", StatementVersion: 1, EnrollSecret: tc.secret})
		a := e.do("POST", "/v1/installations", "", body, nil)
		if a.status != tc.want {
			t.Fatalf("%s: %d %s; want %d", tc.name, a.status, a.body, tc.want)
		}
		if a.status == http.StatusForbidden {
			if got := a.errBody(t); !strings.Contains(got.Hint, "enroll_secret_file") {
				t.Errorf("%s: hint %q does not say what to do", tc.name, got.Hint)
			}
		}
	}
	if m := string(e.do("GET", "/metrics", "", nil, nil).body); !strings.Contains(m, `cloudprotect_registrations_refused_total{reason="enroll_secret"} 3`) {
		t.Errorf("metrics do not count 3 refused secrets:\n%s", m)
	}
}

var (
	inFlightStats = regexp.MustCompile(`cloudprotect_http_requests_in_flight\{route="POST /v1/statistics"\} (\d+)`)
	arriving      = regexp.MustCompile(`cloudprotect_batches_arriving (\d+)`)
)

// slowUpload starts a batch upload that sends its headers and a few bytes
// of its body, then stalls. The connection closes when the test ends.
func slowUpload(t *testing.T, url, token, key string) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	fmt.Fprintf(conn, "POST /v1/statistics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Encoding: gzip\r\n"+
		"Idempotency-Key: %s\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n\x1f\x8b\x08\x00", token, key)
}

// TestSlowUploadsDoNotStarveABatch reproduces the attack in which eight
// uploads that never finish sending held every ingest slot, so a real
// batch got 503 until they timed out.
func TestSlowUploadsDoNotStarveABatch(t *testing.T) {
	t.Parallel()
	st := storetest.New(t, storetest.Backends()[0])
	e := newEnvWith(t, server.Config{Store: st, RegisterBurst: -1, MaxConcurrentIngest: 8, IngestWait: time.Millisecond})
	for i := range 8 {
		slowUpload(t, e.url, e.register().Token, fmt.Sprint("slow", i))
	}
	// Wait until all eight are inside the handler, and are receiving
	// their bodies where the server says so (no time limit: the gauges
	// must get there).
	for {
		text := string(e.do("GET", "/metrics", "", nil, nil).body)
		m := inFlightStats.FindStringSubmatch(text)
		a := arriving.FindStringSubmatch(text)
		if m != nil && m[1] == "8" && (a == nil || a[1] == "8") {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	reg := e.register()
	if a := e.postBatch(reg.Token, batch("real", record("ls", 1))); a.status != http.StatusOK {
		t.Fatalf("a real batch beside 8 slow uploads: %d %s; want 200", a.status, a.body)
	}

	// One installation cannot hold more than its share either.
	slowUpload(t, e.url, reg.Token, "s1")
	slowUpload(t, e.url, reg.Token, "s2")
	for {
		m := arriving.FindStringSubmatch(string(e.do("GET", "/metrics", "", nil, nil).body))
		if m != nil && m[1] == "10" {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	a := e.postBatch(reg.Token, batch("third", record("cat", 1)))
	if a.status != http.StatusTooManyRequests || a.header.Get("Retry-After") == "" {
		t.Fatalf("a third batch of an installation sending two: %d %s; want 429 with Retry-After", a.status, a.body)
	}
	if a := e.postBatch(e.register().Token, batch("other", record("cat", 1))); a.status != http.StatusOK {
		t.Fatalf("another installation meanwhile: %d %s; want 200", a.status, a.body)
	}
}

// TestDeletedInstallationGoneFromFiles reproduces the finding that a
// deleted installation's ID could be read from the SQLite file's free
// pages: after the deletion, no file of the database holds its ID, its
// token's hash or the hashes only it reported.
func TestDeletedInstallationGoneFromFiles(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	st := storetest.Open(t, "sqlite:"+filepath.Join(dir, "cloud.db"))
	e := newEnvOn(t, st)
	leaver, stays := e.register(), e.register()
	var own []string
	for i := range 3 {
		recs := realisticRecords(500, uint64(100+i))
		for _, r := range recs {
			own = append(own, r.SHA256)
		}
		recs = append(recs, record("shared", 1))
		if a := e.postBatch(leaver.Token, batch(fmt.Sprint("b", i), recs...)); a.status != http.StatusOK {
			t.Fatalf("post: %d %s", a.status, a.body)
		}
	}
	if a := e.postBatch(stays.Token, batch("b0", append(realisticRecords(500, 7), record("shared", 1))...)); a.status != http.StatusOK {
		t.Fatalf("post: %d %s", a.status, a.body)
	}
	needles := map[string][]byte{"installation ID": []byte(leaver.InstallationID), "token hash": hashToken(leaver.Token)}
	for i, h := range own {
		needles[fmt.Sprint("hash ", i)] = []byte(h)
	}
	scan := func() map[string]int {
		found := map[string]int{}
		files, err := filepath.Glob(filepath.Join(dir, "*"))
		if err != nil || len(files) == 0 {
			t.Fatalf("no database files in %s: %v", dir, err)
		}
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			for name, n := range needles {
				if c := bytes.Count(b, n); c > 0 {
					found[filepath.Base(f)+": "+name] += c
				}
			}
		}
		return found
	}
	if before := scan(); len(before) == 0 {
		t.Fatal("before the deletion no file holds the installation: the scan cannot see anything")
	}
	if a := e.do("DELETE", "/v1/installations/"+leaver.InstallationID, leaver.Token, nil, nil); a.status != http.StatusNoContent {
		t.Fatalf("delete: %d %s", a.status, a.body)
	}
	if found := scan(); len(found) > 0 {
		t.Fatalf("after the deletion the files still hold %d traces, e.g. %v", len(found), firstKeys(found, 5))
	}
	// The other installation's data is intact.
	if got, err := st.Stats(context.Background(), stays.InstallationID); err != nil || len(got) != 501 {
		t.Fatalf("the other installation holds %d records, %v; want 501", len(got), err)
	}
}

func firstKeys(m map[string]int, n int) []string {
	var out []string
	for k, v := range m {
		if len(out) == n {
			break
		}
		out = append(out, fmt.Sprintf("%s ×%d", k, v))
	}
	return out
}
