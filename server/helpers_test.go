package server_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/server"
	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/server/store/storetest"
	"github.com/cloudprotect/cloudprotect/server/verdict"
	"github.com/cloudprotect/cloudprotect/wire"
)

// now is the fixed clock of the tests.
var now = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// env is a real server on loopback over a real store.
type env struct {
	t     testing.TB
	url   string
	store store.Store
	http  *http.Client
	clock *clock
}

// clock is the server's time in a test; it stands still unless set.
type clock struct {
	mu sync.Mutex // protects t
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

func rules() verdict.Rules {
	return verdict.Rules{MalformedQuorum: 3, EstablishedAge: 7 * 24 * time.Hour, EstablishedDays: 3, ListedTTL: 24 * time.Hour, UnknownTTL: time.Hour}
}

// newEnv starts a server over a fresh database of backend b.
func newEnv(tb testing.TB, b storetest.Backend) *env {
	tb.Helper()
	return newEnvOn(tb, storetest.Open(tb, b.NewDSN(tb)))
}

// newEnvOn starts a server over st with the test rules, a clock
// standing at now and no limit on registrations.
func newEnvOn(tb testing.TB, st store.Store) *env {
	tb.Helper()
	return newEnvWith(tb, server.Config{Store: st, RegisterBurst: -1})
}

// newEnvWith starts a server configured by cfg, with the test rules and
// clock unless cfg has its own.
func newEnvWith(tb testing.TB, cfg server.Config) *env {
	tb.Helper()
	c := &clock{t: now}
	if cfg.Now == nil {
		cfg.Now = c.Now
	}
	if cfg.Rules == (verdict.Rules{}) {
		cfg.Rules = rules()
	}
	ts := httptest.NewServer(server.New(cfg))
	tb.Cleanup(ts.Close)
	return &env{t: tb, url: ts.URL, store: cfg.Store, http: ts.Client(), clock: c}
}

type answer struct {
	status int
	header http.Header
	body   []byte
}

// errBody decodes a wire.Error answer.
func (a answer) errBody(t testing.TB) wire.Error {
	t.Helper()
	var e wire.Error
	if err := json.Unmarshal(a.body, &e); err != nil || e.Error == "" {
		t.Fatalf("answer %d is not a JSON error: %q (%v)", a.status, a.body, err)
	}
	return e
}

func (e *env) do(method, path, token string, body []byte, header map[string]string) answer {
	e.t.Helper()
	req, err := http.NewRequestWithContext(context.Background(), method, e.url+path, bytes.NewReader(body))
	if err != nil {
		e.t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := e.http.Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatalf("%s %s: read answer: %v", method, path, err)
	}
	return answer{status: resp.StatusCode, header: resp.Header, body: b}
}

func (e *env) register() wire.Registration {
	e.t.Helper()
	a := e.do("POST", "/v1/installations", "", []byte(`{"agent_version":"1.0.0","statement_version":1}`), nil)
	if a.status != http.StatusCreated {
		e.t.Fatalf("register: %d %s", a.status, a.body)
	}
	var reg wire.Registration
	if err := json.Unmarshal(a.body, &reg); err != nil || reg.Token == "" || reg.InstallationID == "" {
		e.t.Fatalf("register: answer %s: %v", a.body, err)
	}
	return reg
}

func gz(tb testing.TB, b []byte) []byte {
	tb.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(b); err != nil {
		tb.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

func mustJSON(tb testing.TB, v any) []byte {
	tb.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// postBatch sends b as the agent does: gzip, Idempotency-Key.
func (e *env) postBatch(token string, b wire.Batch) answer {
	e.t.Helper()
	return e.do("POST", "/v1/statistics", token, gz(e.t, mustJSON(e.t, b)),
		map[string]string{"Content-Encoding": "gzip", "Content-Type": "application/json", "Idempotency-Key": b.BatchID})
}

func (e *env) lookup(token string, hashes ...string) []wire.Reputation {
	e.t.Helper()
	a := e.do("POST", "/v1/reputation/sha256", token, mustJSON(e.t, wire.LookupRequest{SHA256: hashes}), nil)
	if a.status != http.StatusOK {
		e.t.Fatalf("lookup: %d %s", a.status, a.body)
	}
	var res wire.LookupResponse
	if err := json.Unmarshal(a.body, &res); err != nil {
		e.t.Fatalf("lookup: %v", err)
	}
	return res.Results
}

func hashOf(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

// record returns a valid record for the file named name.
func record(name string, execs uint64) wire.Record {
	return wire.Record{
		Facts: wire.Facts{
			SHA256: hashOf(name), Size: 4096, Path: "/usr/bin/" + name, Kind: "elf", PackageManaged: true,
			ELF: &wire.ELF{Machine: "x86_64", Type: "dyn", PIE: true, Interpreter: "/lib64/ld-linux-x86-64.so.2"},
		},
		ExecCount: execs,
		FirstSeen: now.Add(-time.Hour),
		LastSeen:  now.Add(-time.Minute),
	}
}

func batch(id string, recs ...wire.Record) wire.Batch {
	return wire.Batch{BatchID: id, StatementVersion: 1, Records: recs}
}

var (
	dirs    = []string{"/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/libexec", "/opt/google/chrome", "~/.local/bin", "~/Downloads", "/usr/local/bin", "/snap/firefox/4173/usr/lib/firefox"}
	names   = []string{"bash", "git", "python3.12", "node", "chrome_crashpad_handler", "ld-linux", "code", "gnome-shell", "firefox", "cargo", "make", "gcc-13", "systemd-run", "ssh", "grep"}
	scripts = []string{"/usr/bin/python3", "/bin/sh", "/usr/bin/bash", "/usr/bin/perl"}
)

// realisticRecords returns n records as a desktop reports them over a
// quarter of an hour: mostly package-managed ELF programs, some scripts,
// unique hashes and build IDs (which gzip cannot shrink).
func realisticRecords(n int, seed uint64) []wire.Record {
	rng := rand.New(rand.NewPCG(seed, 42))
	out := make([]wire.Record, n)
	for i := range out {
		var sum, build [32]byte
		for j := range sum {
			sum[j] = byte(rng.Uint32())
		}
		for j := range build[:20] {
			build[j] = byte(rng.Uint32())
		}
		dir := dirs[rng.IntN(len(dirs))]
		name := names[rng.IntN(len(names))]
		if rng.IntN(3) == 0 {
			name = fmt.Sprintf("%s-%d", name, rng.IntN(1000))
		}
		first := now.Add(-time.Duration(rng.IntN(900)) * time.Second)
		r := wire.Record{
			Facts: wire.Facts{
				SHA256:         hex.EncodeToString(sum[:]),
				Size:           int64(rng.IntN(50 << 20)),
				Path:           dir + "/" + name,
				Kind:           "elf",
				PackageManaged: dir[0] == '/' && dir != "/usr/local/bin" && dir[:4] != "/opt",
			},
			ExecCount: uint64(1 + rng.IntN(20)),
			Loaded:    dir == "~/Downloads",
			FirstSeen: first.Truncate(time.Second),
			LastSeen:  first.Add(time.Duration(rng.IntN(300)) * time.Second).Truncate(time.Second),
		}
		if rng.IntN(10) == 0 {
			r.Kind = "script"
			r.Interpreter = scripts[rng.IntN(len(scripts))]
		} else {
			r.ELF = &wire.ELF{Machine: "x86_64", Type: "dyn", PIE: true,
				Interpreter: "/lib64/ld-linux-x86-64.so.2", BuildID: hex.EncodeToString(build[:20])}
		}
		out[i] = r
	}
	return out
}
