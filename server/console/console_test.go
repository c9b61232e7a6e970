package console_test

import (
	"bytes"
	"context"
	"io"
	"mime/multipart"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/cloudprotect/cloudprotect/server"
	"github.com/cloudprotect/cloudprotect/server/console"
	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/server/store/storetest"
	"github.com/cloudprotect/cloudprotect/server/verdict"
	"github.com/cloudprotect/cloudprotect/wire"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var now = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

const password = "correct horse battery staple"

// site is the real server with its console, over TLS (the session cookie
// is Secure), and a browser-like client with a cookie jar.
type site struct {
	t       *testing.T
	url     string
	store   store.Store
	client  *http.Client
	logs    *syncBuffer
	metrics *server.Metrics
}

type syncBuffer struct {
	mu sync.Mutex // protects b
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// hashedPassword is the test analyst's password hash, with argon2id
// parameters that keep tests fast (TestPasswordHash checks the real ones).
var hashedPassword = sync.OnceValue(func() string { return console.HashPasswordCheap(password) })

func TestPasswordHash(t *testing.T) {
	t.Parallel()
	h, err := console.HashPassword(password)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(h, "$argon2id$v=19$m=65536,t=3,p=2$") {
		t.Fatalf("hash %q; want argon2id with 64 MiB and 3 passes", h)
	}
	if h2, _ := console.HashPassword(password); h2 == h {
		t.Fatal("two hashes of one password are equal: no salt")
	}
	for _, tc := range []struct {
		hash, pw string
		ok       bool
		err      bool
	}{
		{h, password, true, false},
		{h, password + " ", false, false},
		{h[:len(h)-4], password, false, false},
		{"$argon2id$v=19$m=65536,t=3,p=2$c2FsdHNhbHQ", password, false, true},
		{"$2a$10$abcdefghijklmnopqrstuv", password, false, true},
		{"$argon2id$v=19$m=99999999,t=3,p=2$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5", password, false, true},
	} {
		ok, err := console.VerifyPassword(tc.hash, tc.pw)
		if ok != tc.ok || (err != nil) != tc.err {
			t.Errorf("VerifyPassword(%q) = %v, %v; want %v, error %v", tc.hash, ok, err, tc.ok, tc.err)
		}
	}
	if _, err := console.HashPassword("short"); err == nil {
		t.Error("a 5-character password was hashed")
	}
}

func newSite(t *testing.T, b storetest.Backend) *site {
	t.Helper()
	st := storetest.New(t, b)
	if err := st.AddAnalyst(context.Background(), "ana", hashedPassword(), false, now); err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	log := slogText(logs)
	m := server.NewMetrics()
	c, err := console.New(console.Config{Store: st, Rules: verdict.Default(), Now: func() time.Time { return now }, Logger: log, Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewTLSServer(server.New(server.Config{Store: st, Rules: verdict.Default(), Now: func() time.Time { return now },
		Console: c, Metrics: m, RegisterBurst: -1}))
	t.Cleanup(ts.Close)
	cl := ts.Client()
	cl.Jar, _ = cookiejar.New(nil)
	cl.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return &site{t: t, url: ts.URL, store: st, client: cl, logs: logs, metrics: m}
}

type page struct {
	status int
	header http.Header
	body   string
}

func (s *site) get(path string) page {
	s.t.Helper()
	return s.send("GET", path, nil, "")
}

func (s *site) send(method, path string, body io.Reader, contentType string, hdr ...string) page {
	s.t.Helper()
	req, err := http.NewRequest(method, s.url+path, body)
	if err != nil {
		s.t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := s.client.Do(req)
	if err != nil {
		s.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		s.t.Fatal(err)
	}
	return page{resp.StatusCode, resp.Header, string(b)}
}

func (s *site) post(path string, form url.Values, hdr ...string) page {
	s.t.Helper()
	return s.send("POST", path, strings.NewReader(form.Encode()), "application/x-www-form-urlencoded", hdr...)
}

func (s *site) signIn(name, pw string) page {
	s.t.Helper()
	return s.post("/console/signin", url.Values{"name": {name}, "password": {pw}, "next": {"/console/"}})
}

var csrfField = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

func (s *site) csrf() string {
	s.t.Helper()
	m := csrfField.FindStringSubmatch(s.get("/console/files").body)
	if m == nil {
		s.t.Fatal("no CSRF token on the files page")
	}
	return m[1]
}

func TestSignIn(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		s := newSite(t, b)
		if p := s.get("/console/"); p.status != http.StatusSeeOther || !strings.HasPrefix(p.header.Get("Location"), "/console/signin?next=") {
			t.Fatalf("overview signed out: %d %s; want a redirect to sign in", p.status, p.header.Get("Location"))
		}
		p := s.get("/console/signin")
		if p.status != 200 || !strings.Contains(p.body, `type="password"`) {
			t.Fatalf("sign-in page: %d", p.status)
		}
		for _, h := range []string{"Content-Security-Policy", "X-Frame-Options"} {
			if p.header.Get(h) == "" {
				t.Errorf("sign-in page without %s", h)
			}
		}
		if p := s.signIn("ana", "wrong password!"); p.status != http.StatusUnauthorized || !strings.Contains(p.body, "Wrong name or password") {
			t.Fatalf("wrong password: %d", p.status)
		}
		if p := s.signIn("nobody", password); p.status != http.StatusUnauthorized {
			t.Fatalf("unknown name: %d", p.status)
		}
		if p := s.post("/console/signin", url.Values{"name": {"ana"}, "password": {password}}, "Origin", "https://evil.example"); p.status != http.StatusForbidden {
			t.Fatalf("sign-in from another site: %d; want 403", p.status)
		}
		p = s.signIn("ana", password)
		if p.status != http.StatusSeeOther || p.header.Get("Location") != "/console/" {
			t.Fatalf("sign in: %d %s", p.status, p.header.Get("Location"))
		}
		ck := p.header.Get("Set-Cookie")
		for _, attr := range []string{console.CookieName + "=", "Secure", "HttpOnly", "SameSite=Strict", "Path=/"} {
			if !strings.Contains(ck, attr) {
				t.Errorf("session cookie %q lacks %s", ck, attr)
			}
		}
		if p := s.get("/console/"); p.status != 200 || !strings.Contains(p.body, "Active installations") || !strings.Contains(p.body, "ana") {
			t.Fatalf("overview: %d", p.status)
		}
		// Signing out ends the session on the server too.
		tok := s.csrf()
		if p := s.post("/console/signout", url.Values{"csrf": {tok}}); p.status != http.StatusSeeOther {
			t.Fatalf("sign out: %d", p.status)
		}
		if p := s.get("/console/"); p.status != http.StatusSeeOther {
			t.Fatalf("overview after signing out: %d; want a redirect", p.status)
		}
		m := new(bytes.Buffer)
		s.metrics.Write(m)
		for _, want := range []string{`cloudprotect_console_sign_ins_total{result="ok"} 1`, `cloudprotect_console_sign_ins_total{result="failed"} 2`} {
			if !strings.Contains(m.String(), want) {
				t.Errorf("metrics lack %q", want)
			}
		}
	})
}

func TestSignInLimited(t *testing.T) {
	t.Parallel()
	s := newSite(t, storetest.Backends()[0])
	limited := 0
	for range 12 {
		if p := s.signIn("ana", "not the password"); p.status == http.StatusTooManyRequests {
			limited++
			if p.header.Get("Retry-After") == "" {
				t.Fatal("429 without Retry-After")
			}
		}
	}
	if limited == 0 {
		t.Fatal("12 wrong passwords in a row were all tried")
	}
	if p := s.signIn("ana", password); p.status != http.StatusTooManyRequests {
		t.Fatalf("the right password during the lockout: %d; want 429", p.status)
	}
}

func TestSetVerdict(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		s := newSite(t, b)
		s.signIn("ana", password)
		h := strings.Repeat("ab", 32)
		if p := s.get("/console/"); p.status != 200 || strings.Contains(p.body, h[:16]) {
			t.Fatalf("overview before the decision: %d", p.status)
		}
		tok := s.csrf()
		path := "/console/files/" + h + "/verdict"
		steps := []struct {
			name   string
			form   url.Values
			hdr    []string
			status int
			want   string
		}{
			{"no CSRF token", url.Values{"verdict": {"malicious"}, "reason": {"x"}}, nil, 403, "Request refused"},
			{"wrong CSRF token", url.Values{"csrf": {"nope"}, "verdict": {"malicious"}, "reason": {"x"}}, nil, 403, "Request refused"},
			{"other site", url.Values{"csrf": {tok}, "verdict": {"malicious"}, "reason": {"x"}}, []string{"Sec-Fetch-Site", "cross-site"}, 403, "another site"},
			{"no reason", url.Values{"csrf": {tok}, "verdict": {"malicious"}}, nil, 422, "Give a reason"},
			{"bad verdict", url.Values{"csrf": {tok}, "verdict": {"evil"}, "reason": {"x"}}, nil, 422, "Choose a verdict"},
			{"bidi in reason", url.Values{"csrf": {tok}, "verdict": {"malicious"}, "reason": {"ok\u202eexe.txt"}}, nil, 422, "printable"},
			{"set", url.Values{"csrf": {tok}, "verdict": {"malicious"}, "reason": {"sandbox: ransomware <b>note</b>"}}, nil, 303, ""},
		}
		for _, st := range steps {
			p := s.post(path, st.form, st.hdr...)
			if p.status != st.status || !strings.Contains(p.body, st.want) {
				t.Fatalf("%s: %d; want %d with %q\n%s", st.name, p.status, st.status, st.want, p.body)
			}
		}
		p := s.get("/console/files/" + strings.ToUpper(h))
		if p.status != 200 || !strings.Contains(p.body, `id="verdict">malicious`) || !strings.Contains(p.body, "&lt;b&gt;note&lt;/b&gt;") {
			t.Fatalf("file page after the decision: %d\n%s", p.status, p.body)
		}
		// The overview, read before, shows the decision at once.
		if p := s.get("/console/"); p.status != 200 || !strings.Contains(p.body, h[:16]) {
			t.Fatalf("overview after the decision does not list it: %d", p.status)
		}
		infos, err := s.store.Lookup(context.Background(), []string{h}, store.Trust{Now: now})
		if err != nil || infos[0].Decision == nil || infos[0].Decision.Analyst != "ana" || infos[0].Decision.Verdict != wire.VerdictMalicious {
			t.Fatalf("stored decision: %+v, %v", infos[0].Decision, err)
		}
		if !strings.Contains(s.logs.String(), "verdict set") || !strings.Contains(s.logs.String(), "analyst=ana") {
			t.Errorf("the decision is not logged with the analyst's name:\n%s", s.logs.String())
		}
		// Withdrawing it is a change too.
		if p := s.post(path, url.Values{"csrf": {tok}, "verdict": {"clear"}, "reason": {"false positive"}}); p.status != 303 {
			t.Fatalf("withdraw: %d", p.status)
		}
		d, err := s.store.File(context.Background(), h, store.Trust{Now: now})
		if err != nil || d.Decision != nil || len(d.History) != 2 || d.History[0].Verdict != store.VerdictCleared {
			t.Fatalf("after withdrawing: %+v %v", d, err)
		}
		// Search.
		if p := s.get("/console/files?sha256=+" + strings.ToUpper(h) + "+"); p.status != http.StatusSeeOther || p.header.Get("Location") != "/console/files/"+h {
			t.Fatalf("search: %d %s", p.status, p.header.Get("Location"))
		}
		if p := s.get("/console/files?sha256=abc"); p.status != 400 || !strings.Contains(p.body, "not a SHA-256") {
			t.Fatalf("bad search: %d", p.status)
		}
	})
}

func multipartForm(t *testing.T, fields [][2]string, fileName, file string) (io.Reader, string) {
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for _, f := range fields {
		mw.WriteField(f[0], f[1])
	}
	if fileName != "" {
		fw, err := mw.CreateFormFile("file", fileName)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(fw, file)
	}
	mw.Close()
	return &buf, mw.FormDataContentType()
}

func TestImportFeed(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		s := newSite(t, b)
		s.signIn("ana", password)
		tok := s.csrf()
		a, c := strings.Repeat("a", 64), strings.Repeat("c", 64)
		csv := "# \"first_seen_utc\",\"sha256_hash\",\"file_name\"\n\"2026-02-28 10:00:00\", \"" + a + "\", \"x.exe\"\n\"2026-02-28 11:00:00\", \"" + strings.ToUpper(c) + "\", \"y.exe\"\n"
		body, ct := multipartForm(t, [][2]string{{"csrf", tok}, {"feed", "bazaar"}, {"list", "malicious"}}, "recent.csv", csv)
		p := s.send("POST", "/console/import", body, ct)
		if p.status != 200 || !strings.Contains(p.body, "Imported feed <strong>bazaar</strong>") || !strings.Contains(p.body, "2 newly listed") {
			t.Fatalf("import: %d\n%s", p.status, p.body)
		}
		infos, err := s.store.Lookup(context.Background(), []string{a, c}, store.Trust{Now: now})
		if err != nil {
			t.Fatal(err)
		}
		for _, in := range infos {
			if l, ok := in.Listed(store.ListMalicious); !ok || l.Feed != "bazaar" {
				t.Errorf("%s: listings %+v; want malicious from bazaar", in.SHA256, in.Listings)
			}
		}
		// A bad line imports nothing and says which.
		body, ct = multipartForm(t, [][2]string{{"csrf", tok}, {"feed", "x"}, {"list", "trusted"}}, "bad.txt", strings.Repeat("d", 64)+"\nnot a hash\n")
		if p := s.send("POST", "/console/import", body, ct); p.status != 422 || !strings.Contains(p.body, "bad.txt:2") {
			t.Fatalf("bad file: %d\n%s", p.status, p.body)
		}
		// The token must come first, before the file is read.
		body, ct = multipartForm(t, [][2]string{{"feed", "x"}, {"csrf", tok}}, "f.txt", a)
		if p := s.send("POST", "/console/import", body, ct); p.status != 403 {
			t.Fatalf("token after other fields: %d; want 403", p.status)
		}
		body, ct = multipartForm(t, nil, "f.txt", a)
		if p := s.send("POST", "/console/import", body, ct); p.status != 403 {
			t.Fatalf("no token: %d; want 403", p.status)
		}
		m := new(bytes.Buffer)
		s.metrics.Write(m)
		if !strings.Contains(m.String(), `cloudprotect_verdict_changes_total{source="feed"} 2`) {
			t.Errorf("metrics do not count 2 feed changes:\n%s", m)
		}
	})
}

func TestPagesRender(t *testing.T) {
	t.Parallel()
	s := newSite(t, storetest.Backends()[0])
	s.signIn("ana", password)
	for _, path := range []string{"/console/", "/console/files", "/console/worklist?days=3&max=2", "/console/import", "/console/files/" + strings.Repeat("0", 64)} {
		if p := s.get(path); p.status != 200 || !strings.Contains(p.body, "</html>") {
			t.Errorf("%s: %d", path, p.status)
		}
	}
	if p := s.get("/console/nothing"); p.status != 404 {
		t.Errorf("unknown page: %d", p.status)
	}
	if p := s.get("/console/static/console.css"); p.status != 200 || !strings.HasPrefix(p.header.Get("Content-Type"), "text/css") {
		t.Errorf("stylesheet: %d %s", p.status, p.header.Get("Content-Type"))
	}
}
