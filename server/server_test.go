package server_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/cloudprotect/cloudprotect/server"
	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/server/store/storetest"
	"github.com/cloudprotect/cloudprotect/wire"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestRegisterAndAuthenticate(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		e := newEnv(t, b)
		reg := e.register()
		if reg2 := e.register(); reg2.InstallationID == reg.InstallationID || reg2.Token == reg.Token {
			t.Fatal("two registrations got the same ID or token")
		}
		if res, _ := e.store.Residue(context.Background(), "nothing", []byte(reg.Token)); res["installations"] != 0 {
			t.Fatal("the store holds the token itself, not only its hash")
		}
		one := "/v1/reputation/sha256/" + hashOf("x")
		tests := []struct {
			name       string
			method     string
			path       string
			auth       string // Authorization header
			body       string
			wantStatus int
			wantErr    string
		}{
			{"valid token", "GET", one, "Bearer " + reg.Token, "", 200, ""},
			{"scheme is case-insensitive", "GET", one, "bearer " + reg.Token, "", 200, ""},
			{"no header", "GET", one, "", "", 401, "missing"},
			{"basic auth", "GET", one, "Basic " + reg.Token, "", 401, "missing"},
			{"unknown token", "GET", one, "Bearer cpt_NOPE", "", 401, "unknown token"},
			{"huge token", "GET", one, "Bearer " + strings.Repeat("a", 300), "", 401, "missing"},
			{"statistics need a token", "POST", "/v1/statistics", "", "", 401, "missing"},
			{"registration without version", "POST", "/v1/installations", "", `{"agent_version":"1"}`, 422, "statement_version"},
			{"registration with unknown field", "POST", "/v1/installations", "", `{"statement_version":1,"hostname":"x"}`, 400, "unknown field"},
			{"registration not JSON", "POST", "/v1/installations", "", `hello`, 400, "not valid JSON"},
			{"registration too large", "POST", "/v1/installations", "", `{"agent_version":"` + strings.Repeat("x", 5000) + `"}`, 413, "larger"},
			{"wrong method", "GET", "/v1/installations", "", "", 405, "not allowed"},
			{"no such endpoint", "GET", "/v2/anything", "", "", 404, "no such endpoint"},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				h := map[string]string{}
				if tc.auth != "" {
					h["Authorization"] = tc.auth
				}
				a := e.do(tc.method, tc.path, "", []byte(tc.body), h)
				if a.status != tc.wantStatus {
					t.Fatalf("status %d, body %s; want %d", a.status, a.body, tc.wantStatus)
				}
				if tc.wantErr != "" {
					if got := a.errBody(t); !strings.Contains(got.Error, tc.wantErr) || got.Hint == "" {
						t.Errorf("error %+v; want it to mention %q and give a hint", got, tc.wantErr)
					}
				}
			})
		}
	})
}

func TestStatisticsRejects(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		e := newEnv(t, b)
		tok := e.register().Token
		good := batch("b1", record("ls", 1), record("cat", 2))
		js := func(v wire.Batch) []byte { return mustJSON(t, v) }
		with := func(f func(*wire.Batch)) []byte {
			bb := batch("b1", record("ls", 1), record("cat", 2))
			f(&bb)
			return js(bb)
		}
		many := make([]wire.Record, wire.MaxBatchRecords+1)
		for i := range many {
			many[i] = record(fmt.Sprint(i), 1)
		}
		gzHeaders := map[string]string{"Content-Encoding": "gzip", "Idempotency-Key": "b1"}
		tests := []struct {
			name       string
			body       []byte // gzipped unless raw
			raw        bool
			header     map[string]string
			wantStatus int
			wantErr    string
		}{
			{name: "not declared gzip", body: js(good), header: map[string]string{"Idempotency-Key": "b1"}, wantStatus: 415, wantErr: "gzip"},
			{name: "declared gzip but plain", body: js(good), raw: true, wantStatus: 400, wantErr: "not gzip"},
			{name: "no idempotency key", body: js(good), header: map[string]string{"Content-Encoding": "gzip"}, wantStatus: 400, wantErr: "Idempotency-Key"},
			{name: "key differs from batch id", body: js(good), header: map[string]string{"Content-Encoding": "gzip", "Idempotency-Key": "b2"}, wantStatus: 400, wantErr: "differs"},
			{name: "unknown field", body: []byte(`{"batch_id":"b1","statement_version":1,"records":[],"hostname":"x"}`), wantStatus: 400, wantErr: "unknown field"},
			{name: "verdict in a record", body: bytes.Replace(js(good), []byte(`"loaded"`), []byte(`"verdict":"trusted","loaded"`), 1), wantStatus: 400, wantErr: "unknown field"},
			{name: "trailing data", body: append(js(good), []byte(` {}`)...), wantStatus: 400, wantErr: "after the JSON"},
			{name: "wrong type", body: bytes.Replace(js(good), []byte(`"size":4096`), []byte(`"size":"big"`), 1), wantStatus: 400, wantErr: "size"},
			{name: "negative exec count", body: bytes.Replace(js(good), []byte(`"exec_count":1`), []byte(`"exec_count":-1`), 1), wantStatus: 400, wantErr: "exec_count"},
			{name: "empty batch", body: js(batch("b1")), wantStatus: 422, wantErr: "records: empty"},
			{name: "statement version 0", body: with(func(b *wire.Batch) { b.StatementVersion = 0 }), wantStatus: 422, wantErr: "statement_version"},
			{name: "uppercase hash", body: with(func(b *wire.Batch) { b.Records[1].SHA256 = strings.ToUpper(b.Records[1].SHA256) }), wantStatus: 422, wantErr: "records[1].sha256"},
			{name: "short hash", body: with(func(b *wire.Batch) { b.Records[0].SHA256 = "abc" }), wantStatus: 422, wantErr: "records[0].sha256"},
			{name: "negative size", body: with(func(b *wire.Batch) { b.Records[1].Size = -1 }), wantStatus: 422, wantErr: "records[1].size"},
			{name: "home path", body: with(func(b *wire.Batch) { b.Records[1].Path = "/home/alice/bin/x" }), wantStatus: 422, wantErr: "records[1].path"},
			{name: "root path", body: with(func(b *wire.Batch) { b.Records[0].Path = "/root/x" }), wantStatus: 422, wantErr: "records[0].path"},
			{name: "empty path", body: with(func(b *wire.Batch) { b.Records[0].Path = "" }), wantStatus: 422, wantErr: "records[0].path"},
			{name: "relative path", body: with(func(b *wire.Batch) { b.Records[0].Path = "bin/x" }), wantStatus: 422, wantErr: "records[0].path"},
			{name: "home in interpreter", body: with(func(b *wire.Batch) { b.Records[0].ELF.Interpreter = "/home/bob/ld.so" }), wantStatus: 422, wantErr: "records[0].elf.interpreter"},
			{name: "bad kind", body: with(func(b *wire.Batch) { b.Records[0].Kind = "exe" }), wantStatus: 422, wantErr: "records[0].kind"},
			{name: "elf facts on a script", body: with(func(b *wire.Batch) { b.Records[0].Kind = "script" }), wantStatus: 422, wantErr: "records[0].elf"},
			{name: "absurd exec count", body: with(func(b *wire.Batch) { b.Records[0].ExecCount = 1 << 62 }), wantStatus: 422, wantErr: "records[0].exec_count"},
			{name: "zero time", body: with(func(b *wire.Batch) { b.Records[0].FirstSeen = time.Time{} }), wantStatus: 422, wantErr: "records[0].first_seen"},
			{name: "future time", body: with(func(b *wire.Batch) { b.Records[1].LastSeen = now.Add(48 * time.Hour) }), wantStatus: 422, wantErr: "records[1].last_seen"},
			{name: "last before first", body: with(func(b *wire.Batch) { b.Records[1].LastSeen = now.Add(-2 * time.Hour) }), wantStatus: 422, wantErr: "before first_seen"},
			{name: "bad batch id", body: with(func(b *wire.Batch) { b.BatchID = "a b" }), header: map[string]string{"Content-Encoding": "gzip", "Idempotency-Key": "a b"}, wantStatus: 400, wantErr: "Idempotency-Key"},
			{name: "too many records", body: js(batch("b1", many...)), wantStatus: 413, wantErr: "more than 5000"},
			{name: "decodes too large", body: append([]byte(`{"batch_id":"b1","records":[],"statement_version":1`), bytes.Repeat([]byte(" "), wire.MaxBatchDecoded)...), wantStatus: 413, wantErr: "decompresses"},
			{name: "compressed too large", body: bytes.Repeat([]byte{0x1f}, wire.MaxBatchCompressed+1), raw: true, wantStatus: 413, wantErr: "larger"},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				body := tc.body
				if !tc.raw {
					body = gz(t, body)
				}
				h := tc.header
				if h == nil {
					h = gzHeaders
				}
				a := e.do("POST", "/v1/statistics", tok, body, h)
				if a.status != tc.wantStatus {
					t.Fatalf("status %d, body %s; want %d", a.status, a.body, tc.wantStatus)
				}
				if got := a.errBody(t); !strings.Contains(got.Error, tc.wantErr) || got.Hint == "" {
					t.Errorf("error %+v; want it to mention %q and give a hint", got, tc.wantErr)
				}
			})
		}
		if got, err := e.store.Stats(context.Background(), "any"); err != nil || len(got) != 0 {
			t.Errorf("rejected batches left records: %v %v", got, err)
		}
		// After all that, the good batch still goes in.
		if a := e.postBatch(tok, good); a.status != 200 {
			t.Fatalf("good batch: %d %s", a.status, a.body)
		}
	})
}

func TestStatisticsCountsAndDuplicates(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		e := newEnv(t, b)
		reg := e.register()
		steps := []struct {
			name    string
			batch   wire.Batch
			wantRes wire.BatchResult
		}{
			{"first", batch("b1", record("ls", 2), record("cat", 1)), wire.BatchResult{Accepted: 2}},
			{"retry", batch("b1", record("ls", 2), record("cat", 1)), wire.BatchResult{Duplicate: true}},
			{"next", batch("b2", record("ls", 3)), wire.BatchResult{Accepted: 1}},
			{"same file twice in a batch", batch("b3", record("cat", 1), record("cat", 4)), wire.BatchResult{Accepted: 2}},
		}
		for _, step := range steps {
			a := e.postBatch(reg.Token, step.batch)
			var res wire.BatchResult
			if a.status != 200 || json.Unmarshal(a.body, &res) != nil || res != step.wantRes {
				t.Fatalf("%s: %d %s; want 200 %+v", step.name, a.status, a.body, step.wantRes)
			}
		}
		got, err := e.store.Stats(context.Background(), reg.InstallationID)
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]int64{hashOf("ls"): 5, hashOf("cat"): 6}
		if len(got) != len(want) {
			t.Fatalf("stored %v; want %v", got, want)
		}
		for _, st := range got {
			if st.ExecCount != want[st.SHA256] {
				t.Errorf("%s: %d executions; want %d", st.SHA256, st.ExecCount, want[st.SHA256])
			}
		}
	})
}

// TestTwoServersOneDatabase runs two servers, each over its own store
// connection on one database, and posts one batch to both many times at
// once: it is counted once.
func TestTwoServersOneDatabase(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		dsn := b.NewDSN(t)
		// Each server lets the installation send all its copies at once
		// (by default a third would get 429 while two still arrive).
		e1 := newEnvWith(t, server.Config{Store: storetest.Open(t, dsn), RegisterBurst: -1, MaxBodiesPerInstallation: 10})
		e2 := newEnvWith(t, server.Config{Store: storetest.Open(t, dsn), RegisterBurst: -1, MaxBodiesPerInstallation: 10})
		reg := e1.register()
		bt := batch("same", realisticRecords(500, 1)...)
		body := gz(t, mustJSON(t, bt))
		h := map[string]string{"Content-Encoding": "gzip", "Idempotency-Key": bt.BatchID}
		var (
			wg       sync.WaitGroup
			mu       sync.Mutex // protects accepted and statuses
			accepted int
			statuses []int
		)
		for i := range 10 {
			e := e1
			if i%2 == 1 {
				e = e2
			}
			wg.Go(func() {
				a := e.do("POST", "/v1/statistics", reg.Token, body, h)
				var res wire.BatchResult
				json.Unmarshal(a.body, &res)
				mu.Lock()
				defer mu.Unlock()
				statuses = append(statuses, a.status)
				if a.status == 200 && !res.Duplicate {
					accepted++
				}
			})
		}
		wg.Wait()
		for _, s := range statuses {
			if s != 200 {
				t.Fatalf("statuses %v; want all 200", statuses)
			}
		}
		if accepted != 1 {
			t.Fatalf("%d posts were counted; want 1", accepted)
		}
		got, err := e2.store.Stats(context.Background(), reg.InstallationID)
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]uint64{}
		for _, r := range bt.Records {
			want[r.SHA256] = r.ExecCount
		}
		for _, st := range got {
			if uint64(st.ExecCount) != want[st.SHA256] {
				t.Fatalf("%s counted %d; want %d", st.SHA256, st.ExecCount, want[st.SHA256])
			}
		}
		if len(got) != len(want) {
			t.Fatalf("stored %d files; want %d", len(got), len(want))
		}
	})
}

func TestDeleteInstallation(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		ctx := context.Background()
		e := newEnv(t, b)
		leaver, other := e.register(), e.register()
		for _, reg := range []wire.Registration{leaver, other} {
			if a := e.postBatch(reg.Token, batch("b1", record("ls", 1), record("vim", 1))); a.status != 200 {
				t.Fatalf("post: %d %s", a.status, a.body)
			}
		}
		if rep := e.lookup(other.Token, hashOf("ls")); rep[0].Prevalence != 2 || rep[0].Verdict != wire.VerdictUnknown {
			t.Fatalf("before deletion: %+v; want prevalence 2, unknown", rep[0])
		}
		del := "/v1/installations/"
		steps := []struct {
			name       string
			id, token  string
			wantStatus int
		}{
			{"no token", leaver.InstallationID, "", 401},
			{"another installation's token", leaver.InstallationID, other.Token, 403},
			{"unknown token for an existing installation", leaver.InstallationID, "cpt_WRONG", 401},
			{"malformed id", "a%20b", leaver.Token, 400},
			{"own token", leaver.InstallationID, leaver.Token, 204},
			{"retry after success", leaver.InstallationID, leaver.Token, 404},
			{"retry with another token", leaver.InstallationID, other.Token, 404},
			{"never existed", "NEVER", other.Token, 404},
		}
		for _, step := range steps {
			a := e.do("DELETE", del+step.id, step.token, nil, nil)
			if a.status != step.wantStatus {
				t.Fatalf("%s: %d %s; want %d", step.name, a.status, a.body, step.wantStatus)
			}
			if a.status != 204 {
				a.errBody(t)
			}
		}
		res, err := e.store.Residue(ctx, leaver.InstallationID, hashToken(leaver.Token))
		if err != nil {
			t.Fatal(err)
		}
		for table, n := range res {
			if n != 0 {
				t.Errorf("table %s still holds %d rows of the deleted installation", table, n)
			}
		}
		if rep := e.lookup(other.Token, hashOf("ls")); rep[0].Prevalence != 1 || rep[0].Verdict != wire.VerdictUnknown {
			t.Errorf("after deletion: %+v; want prevalence 1, unknown", rep[0])
		}
		if a := e.postBatch(leaver.Token, batch("b2", record("ls", 1))); a.status != 401 {
			t.Errorf("post with a deleted installation's token: %d; want 401", a.status)
		}
		if got, _ := e.store.Stats(ctx, other.InstallationID); len(got) != 2 {
			t.Errorf("the other installation's records: %v; want 2", got)
		}
	})
}

func TestLookup(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		ctx := context.Background()
		e := newEnv(t, b)
		r1, r2 := e.register(), e.register()
		bad := record("bad", 1)
		bad.ELF.Malformed = "truncated program header"
		for i, reg := range []wire.Registration{r1, r2} {
			recs := []wire.Record{record("common", 1), record("listed", 1)}
			if i == 0 {
				recs = append(recs, record("rare", 1), bad)
			}
			if a := e.postBatch(reg.Token, batch("b", recs...)); a.status != 200 {
				t.Fatalf("post: %d %s", a.status, a.body)
			}
		}
		if _, err := e.store.ImportLists(ctx, "bazaar", map[string][]string{
			store.ListMalicious: {hashOf("evil"), hashOf("listed")},
			store.ListTrusted:   {hashOf("listed"), hashOf("good")},
			store.ListUntrusted: {hashOf("meh")},
		}, false, now.Add(-time.Hour)); err != nil {
			t.Fatal(err)
		}
		if err := e.store.Decide(ctx, hashOf("decided"), wire.VerdictTrusted, "ana", "signed vendor build", now.Add(-time.Minute)); err != nil {
			t.Fatal(err)
		}
		first := now.Add(-time.Hour)
		fed, decided := now.Add(-time.Hour), now.Add(-time.Minute)
		tests := []struct {
			name           string
			file           string
			wantVerdict    string
			wantSource     string
			wantAt         time.Time
			wantPrevalence int
			wantTTL        int
			wantFirst      bool
		}{
			{"prevalent is not trusted by counts", "common", wire.VerdictUnknown, wire.SourcePrevalence, now, 2, 3600, true},
			{"rare", "rare", wire.VerdictUnknown, wire.SourcePrevalence, now, 1, 3600, true},
			{"malformed ELF from one installation", "bad", wire.VerdictUnknown, wire.SourcePrevalence, now, 1, 3600, true},
			{"malicious wins over trusted", "listed", wire.VerdictMalicious, wire.SourceFeed, fed, 2, 86400, true},
			{"malicious, never seen", "evil", wire.VerdictMalicious, wire.SourceFeed, fed, 0, 86400, false},
			{"trusted list", "good", wire.VerdictTrusted, wire.SourceFeed, fed, 0, 86400, false},
			{"untrusted list", "meh", wire.VerdictUntrusted, wire.SourceFeed, fed, 0, 86400, false},
			{"analyst", "decided", wire.VerdictTrusted, wire.SourceAnalyst, decided, 0, 86400, false},
			{"never seen", "nothing", wire.VerdictUnknown, wire.SourcePrevalence, now, 0, 3600, false},
		}
		var all []string
		for _, tc := range tests {
			all = append(all, hashOf(tc.file))
		}
		bulk := e.lookup(r1.Token, append(all, all[0])...) // a repeated hash is answered once
		if len(bulk) != len(tests) {
			t.Fatalf("bulk lookup: %d results; want %d", len(bulk), len(tests))
		}
		for i, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				a := e.do("GET", "/v1/reputation/sha256/"+hashOf(tc.file), r1.Token, nil, nil)
				var one wire.Reputation
				if a.status != 200 || json.Unmarshal(a.body, &one) != nil {
					t.Fatalf("GET: %d %s", a.status, a.body)
				}
				for _, rep := range []wire.Reputation{one, bulk[i]} {
					if rep.SHA256 != hashOf(tc.file) || rep.Verdict != tc.wantVerdict || rep.Prevalence != tc.wantPrevalence ||
						rep.TTLSeconds != tc.wantTTL || (rep.FirstSeen != nil) != tc.wantFirst ||
						rep.Source != tc.wantSource || rep.DecidedAt == nil || !rep.DecidedAt.Equal(tc.wantAt) {
						t.Errorf("got %+v; want %s from %s at %v, prevalence %d, ttl %d, first seen %v", rep, tc.wantVerdict, tc.wantSource, tc.wantAt, tc.wantPrevalence, tc.wantTTL, tc.wantFirst)
					}
					if rep.FirstSeen != nil && !rep.FirstSeen.Equal(first) {
						t.Errorf("first seen %v; want %v", rep.FirstSeen, first)
					}
				}
				if got := a.header.Get("Cache-Control"); got != fmt.Sprintf("private, max-age=%d", tc.wantTTL) {
					t.Errorf("Cache-Control %q", got)
				}
			})
		}
		tooMany := make([]string, wire.MaxLookupHashes+1)
		for i := range tooMany {
			tooMany[i] = hashOf(fmt.Sprint(i))
		}
		rejects := []struct {
			name       string
			method     string
			path       string
			body       string
			header     map[string]string
			wantStatus int
		}{
			{"GET uppercase", "GET", "/v1/reputation/sha256/" + strings.ToUpper(hashOf("x")), "", nil, 400},
			{"GET short", "GET", "/v1/reputation/sha256/abc", "", nil, 400},
			{"POST empty list", "POST", "/v1/reputation/sha256", `{"sha256":[]}`, nil, 400},
			{"POST not JSON", "POST", "/v1/reputation/sha256", `[`, nil, 400},
			{"POST unknown field", "POST", "/v1/reputation/sha256", `{"sha256":["` + hashOf("x") + `"],"path":"/x"}`, nil, 400},
			{"POST bad hash", "POST", "/v1/reputation/sha256", `{"sha256":["` + hashOf("x") + `","nope"]}`, nil, 400},
			{"POST too many", "POST", "/v1/reputation/sha256", string(mustJSON(t, wire.LookupRequest{SHA256: tooMany})), nil, 413},
			{"POST too large", "POST", "/v1/reputation/sha256", `{"sha256":[` + strings.Repeat(" ", server.MaxLookupBody) + `]}`, nil, 413},
			{"POST gzip", "POST", "/v1/reputation/sha256", `{}`, map[string]string{"Content-Encoding": "br"}, 415},
		}
		for _, tc := range rejects {
			t.Run(tc.name, func(t *testing.T) {
				a := e.do(tc.method, tc.path, r1.Token, []byte(tc.body), tc.header)
				if a.status != tc.wantStatus {
					t.Fatalf("%d %s; want %d", a.status, a.body, tc.wantStatus)
				}
				a.errBody(t)
			})
		}
	})
}

var metricLine = regexp.MustCompile(`^(# (HELP|TYPE) [a-z_]+ .+|[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? [0-9.e+-]+|[a-z_]+\{.*le="\+Inf"\} [0-9]+)$`)

func TestHealthAndMetrics(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		st, err := store.Open(context.Background(), b.NewDSN(t), nil)
		if err != nil {
			t.Fatal(err)
		}
		e := newEnvOn(t, st)
		if a := e.do("GET", "/healthz", "", nil, nil); a.status != 200 {
			t.Fatalf("healthz: %d %s", a.status, a.body)
		}
		reg := e.register()
		e.postBatch(reg.Token, batch("b1", record("ls", 1), record("cat", 1)))
		e.postBatch(reg.Token, batch("b1", record("ls", 1), record("cat", 1)))
		e.lookup(reg.Token, hashOf("ls"), hashOf("cat"), hashOf("zz"))
		e.do("DELETE", "/v1/installations/"+reg.InstallationID, reg.Token, nil, nil)

		a := e.do("GET", "/metrics", "", nil, nil)
		if a.status != 200 || !strings.HasPrefix(a.header.Get("Content-Type"), "text/plain; version=0.0.4") {
			t.Fatalf("metrics: %d %s", a.status, a.header.Get("Content-Type"))
		}
		text := string(a.body)
		for _, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
			if !metricLine.MatchString(line) {
				t.Errorf("not in the text format: %q", line)
			}
		}
		for _, want := range []string{
			"cloudprotect_registrations_total 1\n",
			`cloudprotect_batches_total{result="accepted"} 1` + "\n",
			`cloudprotect_batches_total{result="duplicate"} 1` + "\n",
			"cloudprotect_records_ingested_total 2\n",
			"cloudprotect_lookup_hashes_total 3\n",
			"cloudprotect_deletions_total 1\n",
			`cloudprotect_http_requests_total{route="POST /v1/statistics",code="200"} 2` + "\n",
			`cloudprotect_http_requests_total{route="DELETE /v1/installations/{id}",code="204"} 1` + "\n",
			`cloudprotect_http_request_duration_seconds_count{route="POST /v1/statistics"} 2` + "\n",
		} {
			if !strings.Contains(text, want) {
				t.Errorf("metrics lack %q", want)
			}
		}
		if strings.Contains(text, reg.InstallationID) || strings.Contains(text, hashOf("ls")) {
			t.Error("metrics name an installation or a file")
		}

		st.Close()
		a = e.do("GET", "/healthz", "", nil, nil)
		if a.status != 503 || a.header.Get("Retry-After") == "" {
			t.Fatalf("healthz with the database closed: %d; want 503 with Retry-After", a.status)
		}
		a.errBody(t)
	})
}

// panicStore panics on lookups, as a bug would.
type panicStore struct{ store.Store }

func (panicStore) Lookup(context.Context, []string, store.Trust) ([]store.FileInfo, error) {
	panic("boom")
}

func TestPanicIsRecovered(t *testing.T) {
	t.Parallel()
	sqlite := storetest.Backends()[0]
	e := newEnvOn(t, panicStore{storetest.New(t, sqlite)})
	reg := e.register()
	a := e.do("GET", "/v1/reputation/sha256/"+hashOf("x"), reg.Token, nil, nil)
	if a.status != 500 {
		t.Fatalf("status %d; want 500", a.status)
	}
	if got := a.errBody(t); strings.Contains(got.Error, "boom") {
		t.Errorf("error %q leaks the panic", got.Error)
	}
	if a := e.do("GET", "/healthz", "", nil, nil); a.status != 200 {
		t.Fatalf("server down after a panic: %d", a.status)
	}
}

func TestRequestLogsHoldNoSecrets(t *testing.T) {
	t.Parallel()
	var (
		mu  sync.Mutex // protects buf
		buf bytes.Buffer
	)
	st := storetest.New(t, storetest.Backends()[0])
	srv := server.New(server.Config{Store: st, Now: func() time.Time { return now }, Logger: newTestLogger(&mu, &buf)})
	e := newEnvOn(t, st)
	e.url = startServer(t, srv)
	reg := e.register()
	e.postBatch(reg.Token, batch("b1", record("secret-program", 1)))
	e.do("GET", "/v1/reputation/sha256/"+hashOf("secret-program"), reg.Token, nil, nil)
	e.do("DELETE", "/v1/installations/"+reg.InstallationID, reg.Token, nil, nil)
	mu.Lock()
	logs := buf.String()
	mu.Unlock()
	if !strings.Contains(logs, "route=\"POST /v1/statistics\"") {
		t.Fatalf("no request log line: %s", logs)
	}
	for _, secret := range []string{reg.Token, reg.InstallationID, hashOf("secret-program"), "secret-program", "127.0.0.1"} {
		if strings.Contains(logs, secret) {
			t.Errorf("logs hold %q:\n%s", secret, logs)
		}
	}
}

// blockingStore holds every Ingest until release is closed.
type blockingStore struct {
	store.Store
	entered chan struct{}
	release chan struct{}
}

func (s blockingStore) Ingest(ctx context.Context, id, batchID string, stats []store.Stat, now time.Time) (bool, error) {
	s.entered <- struct{}{}
	<-s.release
	return s.Store.Ingest(ctx, id, batchID, stats, now)
}

func TestIngestBusy(t *testing.T) {
	t.Parallel()
	bs := blockingStore{Store: storetest.New(t, storetest.Backends()[0]), entered: make(chan struct{}, 1), release: make(chan struct{})}
	srv := server.New(server.Config{Store: bs, Now: func() time.Time { return now }, MaxConcurrentIngest: 1, IngestWait: time.Millisecond})
	e := newEnvOn(t, bs)
	e.url = startServer(t, srv)
	tok := e.register().Token
	first := make(chan answer, 1)
	go func() { first <- e.postBatch(tok, batch("b1", record("ls", 1))) }()
	<-bs.entered
	a := e.postBatch(tok, batch("b2", record("ls", 1)))
	if a.status != 503 || a.header.Get("Retry-After") == "" {
		t.Fatalf("second batch while the only slot is taken: %d %q; want 503 with Retry-After", a.status, a.header.Get("Retry-After"))
	}
	a.errBody(t)
	close(bs.release)
	if a := <-first; a.status != 200 {
		t.Fatalf("first batch: %d %s", a.status, a.body)
	}
}
