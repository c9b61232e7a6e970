// Package console is the Security Network's web console for analysts,
// served by cloudprotect-server under /console/: sign-in, an overview of
// the network, file search by SHA-256, setting a file's verdict with a
// reason, importing a feed, and the newest rare files as a work list.
//
// Pages are rendered on the server with html/template and work without
// JavaScript (the console has none). Analysts sign in with a password
// hashed with argon2id; the session lives in a Secure, HttpOnly,
// SameSite=Strict cookie whose SHA-256 is stored; every form that changes
// something carries the session's CSRF token, and cross-site requests
// are refused. Sign-in attempts are limited per address and per account.
package console

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"embed"
	"errors"
	"fmt"
	"html/template"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"net/netip"
	"net/url"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/cloudprotect/cloudprotect/server/feed"
	"github.com/cloudprotect/cloudprotect/server/internal/limit"
	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/server/verdict"
	"github.com/cloudprotect/cloudprotect/wire"
)

//go:embed templates/*.html static/*
var assets embed.FS

// Metrics receives what the console counts. Nil discards.
type Metrics interface {
	VerdictChanged(source string, n int)
	SignIn(result string)
}

// Config configures a Console.
type Config struct {
	Store store.Store
	Rules verdict.Rules
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Logger receives the analysts' actions (sign-ins, verdicts with
	// their reasons, imports); nil discards.
	Logger  *slog.Logger
	Metrics Metrics
	// TrustedProxies are reverse proxies whose X-Forwarded-For is
	// believed when limiting sign-ins per address.
	TrustedProxies []netip.Prefix
	// SessionTTL is how long a sign-in lasts; 0 means 12 hours.
	SessionTTL time.Duration
	// MaxImportBytes bounds an uploaded feed file; 0 means 256 MiB.
	MaxImportBytes int64
}

// Console is the console's HTTP handler, for the paths under /console/.
type Console struct {
	cfg      Config
	log      *slog.Logger
	now      func() time.Time
	metrics  Metrics
	mux      *http.ServeMux
	pages    map[string]*template.Template
	byAddr   *limit.Limiter // sign-in attempts per address
	byName   *limit.Limiter // failed sign-ins per account
	kdf      chan struct{}  // bounds password hashes computed at once
	maxBytes int64
}

// CookieName is the session cookie's name. The __Host- prefix makes the
// browser refuse it unless it is Secure, host-only and for path /.
const CookieName = "__Host-cloudprotect_console"

type nopMetrics struct{}

func (nopMetrics) VerdictChanged(string, int) {}
func (nopMetrics) SignIn(string)              {}

// New returns the console over cfg.Store.
func New(cfg Config) (*Console, error) {
	c := &Console{
		cfg:      cfg,
		log:      cfg.Logger,
		now:      cfg.Now,
		metrics:  cfg.Metrics,
		mux:      http.NewServeMux(),
		pages:    map[string]*template.Template{},
		byAddr:   limit.New(10, 30*time.Second, 100_000),
		byName:   limit.New(5, time.Minute, 100_000),
		kdf:      make(chan struct{}, 2),
		maxBytes: cfg.MaxImportBytes,
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if c.now == nil {
		c.now = time.Now
	}
	if c.metrics == nil {
		c.metrics = nopMetrics{}
	}
	if c.cfg.SessionTTL <= 0 {
		c.cfg.SessionTTL = 12 * time.Hour
	}
	if c.maxBytes <= 0 {
		c.maxBytes = 256 << 20
	}
	for _, p := range []string{"signin", "overview", "search", "file", "import", "worklist", "error"} {
		t, err := template.New("layout.html").Funcs(funcs).ParseFS(assets, "templates/layout.html", "templates/"+p+".html")
		if err != nil {
			return nil, fmt.Errorf("create console: parse %s page: %w", p, err)
		}
		c.pages[p] = t
	}
	c.mux.HandleFunc("GET /console/static/{file}", c.handleStatic)
	c.mux.HandleFunc("GET /console/signin", c.handleSignInPage)
	c.mux.HandleFunc("POST /console/signin", c.handleSignIn)
	c.mux.HandleFunc("POST /console/signout", c.authed(c.handleSignOut))
	c.mux.HandleFunc("GET /console/{$}", c.authed(c.handleOverview))
	c.mux.HandleFunc("GET /console/files", c.authed(c.handleSearch))
	c.mux.HandleFunc("GET /console/files/{sha256}", c.authed(c.handleFile))
	c.mux.HandleFunc("POST /console/files/{sha256}/verdict", c.authed(c.handleVerdict))
	c.mux.HandleFunc("GET /console/import", c.authed(c.handleImportPage))
	c.mux.HandleFunc("POST /console/import", c.authed(c.handleImport))
	c.mux.HandleFunc("GET /console/worklist", c.authed(c.handleWorklist))
	c.mux.HandleFunc("/console/", func(w http.ResponseWriter, r *http.Request) {
		c.errorPage(w, r, nil, http.StatusNotFound, "No such page", "Use the links at the top of the page.")
	})
	return c, nil
}

// ServeHTTP serves the console with headers that keep its pages out of
// frames, caches and other sites' reach.
func (c *Console) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Content-Security-Policy", "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
	h.Set("X-Frame-Options", "DENY")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "same-origin")
	h.Set("Cross-Origin-Opener-Policy", "same-origin")
	if !strings.HasPrefix(r.URL.Path, "/console/static/") {
		h.Set("Cache-Control", "no-store")
	}
	c.mux.ServeHTTP(w, r)
}

// page is what every page template receives.
type page struct {
	Title   string
	Nav     string
	Analyst string
	CSRF    string
	Now     time.Time
	Data    any
}

func (c *Console) render(w http.ResponseWriter, r *http.Request, status int, name string, p page) {
	p.Now = c.now().UTC()
	var b strings.Builder
	if err := c.pages[name].Execute(&b, p); err != nil {
		c.log.ErrorContext(r.Context(), "render console page", "page", name, "err", err)
		http.Error(w, "the page could not be shown: see the server's log", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	io.WriteString(w, b.String())
}

type errorData struct{ Message, Hint string }

func (c *Console) errorPage(w http.ResponseWriter, r *http.Request, s *session, status int, msg, hint string) {
	p := page{Title: msg, Data: errorData{msg, hint}}
	if s != nil {
		p.Analyst, p.CSRF = s.Analyst, s.CSRF
	}
	c.render(w, r, status, "error", p)
}

func (c *Console) handleStatic(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("file")
	b, err := assets.ReadFile("static/" + path.Base(name))
	if err != nil {
		http.NotFound(w, r)
		return
	}
	if t := mime.TypeByExtension(path.Ext(name)); t != "" {
		w.Header().Set("Content-Type", t)
	}
	w.Header().Set("Cache-Control", "public, max-age=3600")
	w.Write(b)
}

// session is a signed-in analyst.
type session struct {
	store.Session
	tokenHash []byte
}

func tokenHash(tok string) []byte {
	h := sha256.Sum256([]byte(tok))
	return h[:]
}

// current returns the request's session, or nil.
func (c *Console) current(r *http.Request) (*session, error) {
	ck, err := r.Cookie(CookieName)
	if err != nil || len(ck.Value) < 20 || len(ck.Value) > 128 {
		return nil, nil
	}
	th := tokenHash(ck.Value)
	s, err := c.cfg.Store.Session(r.Context(), th, c.now())
	if errors.Is(err, store.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return &session{Session: s, tokenHash: th}, nil
}

// authed runs h for a signed-in analyst; others go to the sign-in page.
// A POST must come from the console itself and carry the session's CSRF
// token.
func (c *Console) authed(h func(http.ResponseWriter, *http.Request, *session)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		s, err := c.current(r)
		if err != nil {
			c.storeError(w, r, nil, err)
			return
		}
		if s == nil {
			if r.Method != http.MethodGet {
				c.errorPage(w, r, nil, http.StatusUnauthorized, "Signed out", "Your session ended: sign in again and repeat what you did.")
				return
			}
			http.Redirect(w, r, "/console/signin?next="+url.QueryEscape(r.URL.RequestURI()), http.StatusSeeOther)
			return
		}
		if r.Method == http.MethodPost {
			if !sameOrigin(r) {
				c.errorPage(w, r, s, http.StatusForbidden, "Request refused", "The request came from another site. Use the console's own forms.")
				return
			}
			// A multipart form checks its token itself, as it reads it.
			if !strings.HasPrefix(r.Header.Get("Content-Type"), "multipart/") && !c.csrfOK(r.PostFormValue("csrf"), s) {
				c.errorPage(w, r, s, http.StatusForbidden, "Request refused", "The form was stale or not from this console. Reload the page and try again.")
				return
			}
		}
		h(w, r, s)
	}
}

func (c *Console) csrfOK(got string, s *session) bool {
	return got != "" && subtle.ConstantTimeCompare([]byte(got), []byte(s.CSRF)) == 1
}

// sameOrigin refuses requests a browser marks as coming from another
// site, or whose Origin is not this host.
func sameOrigin(r *http.Request) bool {
	if site := r.Header.Get("Sec-Fetch-Site"); site != "" && site != "same-origin" && site != "none" {
		return false
	}
	if o := r.Header.Get("Origin"); o != "" {
		u, err := url.Parse(o)
		if err != nil || u.Host != r.Host {
			return false
		}
	}
	return true
}

func (c *Console) storeError(w http.ResponseWriter, r *http.Request, s *session, err error) {
	c.log.ErrorContext(r.Context(), "console: storage failed", "path", r.URL.Path, "err", err)
	w.Header().Set("Retry-After", "30")
	c.errorPage(w, r, s, http.StatusServiceUnavailable, "The database did not answer", "Try again in a moment; if it repeats, see the server's log.")
}

type signInData struct {
	Next  string
	Name  string
	Error string
}

// safeNext keeps a redirect after sign-in inside the console.
func safeNext(next string) string {
	if !strings.HasPrefix(next, "/console/") || strings.HasPrefix(next, "//") || strings.ContainsAny(next, "\\\r\n") {
		return "/console/"
	}
	return next
}

func (c *Console) handleSignInPage(w http.ResponseWriter, r *http.Request) {
	if s, err := c.current(r); err == nil && s != nil {
		http.Redirect(w, r, safeNext(r.URL.Query().Get("next")), http.StatusSeeOther)
		return
	}
	c.render(w, r, http.StatusOK, "signin", page{Title: "Sign in", Data: signInData{Next: safeNext(r.URL.Query().Get("next"))}})
}

func (c *Console) handleSignIn(w http.ResponseWriter, r *http.Request) {
	if !sameOrigin(r) {
		c.errorPage(w, r, nil, http.StatusForbidden, "Request refused", "Sign in from the console's own page.")
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, 8<<10)
	name := strings.TrimSpace(r.PostFormValue("name"))
	pw := r.PostFormValue("password")
	next := safeNext(r.PostFormValue("next"))
	fail := func(status int, msg string) {
		c.render(w, r, status, "signin", page{Title: "Sign in", Data: signInData{Next: next, Name: name, Error: msg}})
	}
	now := c.now()
	if ok, wait := c.byAddr.Allow(limit.ClientAddr(r, c.cfg.TrustedProxies), now); !ok {
		c.metrics.SignIn("rate_limited")
		w.Header().Set("Retry-After", limit.RetryAfter(wait))
		fail(http.StatusTooManyRequests, fmt.Sprintf("Too many sign-in attempts from your address: wait %s seconds.", limit.RetryAfter(wait)))
		return
	}
	if !ValidAnalystName(name) || pw == "" || len(pw) > 4*MaxPasswordLen {
		c.metrics.SignIn("failed")
		fail(http.StatusUnauthorized, "Wrong name or password.")
		return
	}
	// Failed attempts on one account are limited wherever they come from.
	nameKey := nameAddr(name)
	if ok, wait := c.byName.Allow(nameKey, now); !ok {
		c.metrics.SignIn("rate_limited")
		w.Header().Set("Retry-After", limit.RetryAfter(wait))
		fail(http.StatusTooManyRequests, fmt.Sprintf("Too many failed sign-ins for this account: wait %s seconds.", limit.RetryAfter(wait)))
		return
	}
	hash, err := c.cfg.Store.AnalystPassword(r.Context(), name)
	known := err == nil
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		c.storeError(w, r, nil, err)
		return
	}
	if !known {
		hash = dummyHash() // the same work, so timing does not tell which names exist
	}
	select {
	case c.kdf <- struct{}{}:
	case <-r.Context().Done():
		return
	}
	ok, err := VerifyPassword(hash, pw)
	<-c.kdf
	if err != nil {
		c.log.ErrorContext(r.Context(), "console: unreadable password hash", "analyst", name, "err", err)
	}
	if !known || !ok {
		c.metrics.SignIn("failed")
		c.log.WarnContext(r.Context(), "console: sign-in failed", "name", name)
		fail(http.StatusUnauthorized, "Wrong name or password.")
		return
	}
	c.byName.Forgive(nameKey)
	tok := rand.Text() + rand.Text()
	sess := store.Session{Analyst: name, CSRF: rand.Text(), ExpiresAt: now.Add(c.cfg.SessionTTL)}
	if err := c.cfg.Store.CreateSession(r.Context(), tokenHash(tok), sess, now); err != nil {
		c.storeError(w, r, nil, err)
		return
	}
	c.metrics.SignIn("ok")
	c.log.InfoContext(r.Context(), "console: signed in", "analyst", name)
	http.SetCookie(w, &http.Cookie{
		Name: CookieName, Value: tok, Path: "/", MaxAge: int(c.cfg.SessionTTL / time.Second),
		Secure: true, HttpOnly: true, SameSite: http.SameSiteStrictMode,
	})
	http.Redirect(w, r, next, http.StatusSeeOther)
}

// nameAddr maps an account name to a key of the per-account limiter.
func nameAddr(name string) netip.Addr {
	h := sha256.Sum256([]byte(name))
	return netip.AddrFrom16([16]byte(h[:16]))
}

func (c *Console) handleSignOut(w http.ResponseWriter, r *http.Request, s *session) {
	if err := c.cfg.Store.DeleteSession(r.Context(), s.tokenHash); err != nil {
		c.storeError(w, r, s, err)
		return
	}
	http.SetCookie(w, &http.Cookie{Name: CookieName, Value: "", Path: "/", MaxAge: -1, Secure: true, HttpOnly: true, SameSite: http.SameSiteStrictMode})
	c.log.InfoContext(r.Context(), "console: signed out", "analyst", s.Analyst)
	http.Redirect(w, r, "/console/signin", http.StatusSeeOther)
}

func (c *Console) base(s *session, title, nav string, data any) page {
	return page{Title: title, Nav: nav, Analyst: s.Analyst, CSRF: s.CSRF, Data: data}
}

type overviewData struct {
	store.Overview
	At         time.Time
	Records24h int64
	MaxHour    int64
}

func (c *Console) handleOverview(w http.ResponseWriter, r *http.Request, s *session) {
	// The overview reads the store's summaries (a few milliseconds), so
	// it is read afresh for every view.
	at := c.now()
	o, err := c.cfg.Store.Overview(r.Context(), at)
	if err != nil {
		c.storeError(w, r, s, err)
		return
	}
	d := overviewData{Overview: o, At: at.UTC()}
	for _, n := range o.RecordsPerHour {
		d.Records24h += n
		d.MaxHour = max(d.MaxHour, n)
	}
	c.render(w, r, http.StatusOK, "overview", c.base(s, "Overview", "overview", d))
}

type searchData struct {
	Query string
	Error string
}

// normaliseHash accepts a SHA-256 as people paste it: either case,
// surrounding spaces.
func normaliseHash(q string) (string, bool) {
	h := strings.ToLower(strings.TrimSpace(q))
	return h, wire.ValidSHA256(h)
}

func (c *Console) handleSearch(w http.ResponseWriter, r *http.Request, s *session) {
	q := r.URL.Query().Get("sha256")
	if strings.TrimSpace(q) == "" {
		c.render(w, r, http.StatusOK, "search", c.base(s, "Files", "files", searchData{}))
		return
	}
	h, ok := normaliseHash(q)
	if !ok {
		c.render(w, r, http.StatusBadRequest, "search", c.base(s, "Files", "files",
			searchData{Query: q, Error: "That is not a SHA-256: paste the 64 hexadecimal digits of the file's hash."}))
		return
	}
	http.Redirect(w, r, "/console/files/"+h, http.StatusSeeOther)
}

type fileData struct {
	store.FileDetail
	Verdict wire.Reputation
	Saved   string
	Error   string
	Reason  string
}

func (c *Console) handleFile(w http.ResponseWriter, r *http.Request, s *session) {
	h, ok := normaliseHash(r.PathValue("sha256"))
	if !ok {
		c.errorPage(w, r, s, http.StatusBadRequest, "Not a SHA-256", "A file is named by the 64 hexadecimal digits of its SHA-256.")
		return
	}
	c.showFile(w, r, s, h, http.StatusOK, fileData{Saved: r.URL.Query().Get("saved")})
}

func (c *Console) showFile(w http.ResponseWriter, r *http.Request, s *session, h string, status int, d fileData) {
	now := c.now()
	detail, err := c.cfg.Store.File(r.Context(), h, c.cfg.Rules.Trust(now))
	if err != nil {
		c.storeError(w, r, s, err)
		return
	}
	d.FileDetail = detail
	d.Verdict = c.cfg.Rules.Decide(detail.FileInfo, now)
	c.render(w, r, status, "file", c.base(s, "File "+h[:12], "files", d))
}

// maxReason bounds a verdict's reason, in characters.
const maxReason = 500

func (c *Console) handleVerdict(w http.ResponseWriter, r *http.Request, s *session) {
	h, ok := normaliseHash(r.PathValue("sha256"))
	if !ok {
		c.errorPage(w, r, s, http.StatusBadRequest, "Not a SHA-256", "A file is named by the 64 hexadecimal digits of its SHA-256.")
		return
	}
	v := r.PostFormValue("verdict")
	reason := strings.TrimSpace(r.PostFormValue("reason"))
	fail := func(msg string) {
		c.showFile(w, r, s, h, http.StatusUnprocessableEntity, fileData{Error: msg, Reason: reason})
	}
	switch {
	case v != "clear" && !wire.ValidVerdict(v):
		fail("Choose a verdict.")
		return
	case reason == "":
		fail("Give a reason: it is kept in the file's history with your name.")
		return
	case len([]rune(reason)) > maxReason || !printable(reason):
		fail(fmt.Sprintf("Keep the reason to %d printable characters.", maxReason))
		return
	}
	if v == "clear" {
		v = ""
	}
	if err := c.cfg.Store.Decide(r.Context(), h, v, s.Analyst, reason, c.now()); err != nil {
		c.storeError(w, r, s, err)
		return
	}
	c.metrics.VerdictChanged(store.SourceAnalyst, 1)
	c.log.InfoContext(r.Context(), "console: verdict set", "analyst", s.Analyst, "sha256", h, "verdict", orCleared(v), "reason", reason)
	http.Redirect(w, r, "/console/files/"+h+"?saved=1", http.StatusSeeOther)
}

func orCleared(v string) string {
	if v == "" {
		return store.VerdictCleared
	}
	return v
}

// printable reports whether s holds no control characters other than
// line breaks and tabs, and no bidirectional overrides.
func printable(s string) bool {
	for _, r := range s {
		if (r < 0x20 && r != '\n' && r != '\r' && r != '\t') || r == 0x7f || (r >= 0x80 && r < 0xa0) || bidi(r) {
			return false
		}
	}
	return true
}

type importData struct {
	Feed    string
	List    string
	Replace bool
	Error   string
	Done    bool
	Count   store.ImportCount
}

func (c *Console) handleImportPage(w http.ResponseWriter, r *http.Request, s *session) {
	c.render(w, r, http.StatusOK, "import", c.base(s, "Import a feed", "import", importData{List: store.ListMalicious}))
}

// handleImport reads a multipart form whose fields come in the page's
// order: csrf, feed, list, replace, file. The file is read as a stream.
func (c *Console) handleImport(w http.ResponseWriter, r *http.Request, s *session) {
	d := importData{List: store.ListMalicious}
	fail := func(status int, msg string) {
		d.Error = msg
		c.render(w, r, status, "import", c.base(s, "Import a feed", "import", d))
	}
	r.Body = http.MaxBytesReader(w, r.Body, c.maxBytes)
	mr, err := r.MultipartReader()
	if err != nil {
		fail(http.StatusBadRequest, "Send the form of this page.")
		return
	}
	csrfSeen := false
	var hashes []string
	fileName := ""
	for {
		part, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			fail(http.StatusRequestEntityTooLarge, fmt.Sprintf("The file is larger than %d MiB: split it.", c.maxBytes>>20))
			return
		}
		if err != nil {
			fail(http.StatusBadRequest, "The upload was cut short: try again.")
			return
		}
		name := part.FormName()
		if name != "csrf" && !csrfSeen {
			c.errorPage(w, r, s, http.StatusForbidden, "Request refused", "The form was stale or not from this console. Reload the page and try again.")
			return
		}
		if name == "file" {
			fileName = path.Base(part.FileName())
			hashes, err = feed.Read(fileName, part)
			if errors.As(err, &tooBig) {
				fail(http.StatusRequestEntityTooLarge, fmt.Sprintf("The file is larger than %d MiB: split it.", c.maxBytes>>20))
				return
			}
			if err != nil {
				fail(http.StatusUnprocessableEntity, "Nothing was imported: "+err.Error()+".")
				return
			}
			continue
		}
		v, err := io.ReadAll(io.LimitReader(part, 1024))
		if err != nil {
			fail(http.StatusBadRequest, "The upload was cut short: try again.")
			return
		}
		switch name {
		case "csrf":
			if !c.csrfOK(string(v), s) {
				c.errorPage(w, r, s, http.StatusForbidden, "Request refused", "The form was stale or not from this console. Reload the page and try again.")
				return
			}
			csrfSeen = true
		case "feed":
			d.Feed = strings.TrimSpace(string(v))
		case "list":
			d.List = string(v)
		case "replace":
			d.Replace = string(v) == "on"
		}
	}
	if !csrfSeen {
		c.errorPage(w, r, s, http.StatusForbidden, "Request refused", "The form was stale or not from this console. Reload the page and try again.")
		return
	}
	if d.Feed == "" {
		d.Feed = strings.TrimSuffix(fileName, path.Ext(fileName))
	}
	switch {
	case !store.ValidList(d.List):
		fail(http.StatusUnprocessableEntity, "Choose the list the feed's files go on.")
		return
	case fileName == "" || fileName == ".":
		fail(http.StatusUnprocessableEntity, "Choose a file: a list of SHA-256 hashes, or a CSV export with a sha256_hash column.")
		return
	case !validFeedName(d.Feed):
		fail(http.StatusUnprocessableEntity, "Name the feed with 1 to 64 letters, digits, spaces and . _ - ( ).")
		return
	case len(hashes) == 0:
		fail(http.StatusUnprocessableEntity, "The file holds no SHA-256: nothing was imported.")
		return
	}
	counts, err := c.cfg.Store.ImportLists(r.Context(), d.Feed, map[string][]string{d.List: hashes}, d.Replace, c.now())
	if err != nil {
		c.storeError(w, r, s, err)
		return
	}
	d.Count, d.Done = counts[d.List], true
	c.metrics.VerdictChanged(store.SourceFeed, d.Count.Added+d.Count.Removed)
	c.log.InfoContext(r.Context(), "console: feed imported", "analyst", s.Analyst, "feed", d.Feed, "list", d.List,
		"hashes", d.Count.Hashes, "added", d.Count.Added, "removed", d.Count.Removed)
	c.render(w, r, http.StatusOK, "import", c.base(s, "Import a feed", "import", d))
}

// validFeedName is the rule of server.ValidFeedName.
func validFeedName(name string) bool {
	if name == "" || len(name) > 64 {
		return false
	}
	for _, c := range name {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case c == ' ', c == '.', c == '_', c == '-', c == '(', c == ')':
		default:
			return false
		}
	}
	return true
}

type worklistData struct {
	Days, Max int
	Files     []rareRow
}

type rareRow struct {
	store.RareFile
	Verdict wire.Reputation
}

func (c *Console) handleWorklist(w http.ResponseWriter, r *http.Request, s *session) {
	d := worklistData{Days: 7, Max: 3}
	if v, err := strconv.Atoi(r.URL.Query().Get("days")); err == nil && v >= 1 && v <= 90 {
		d.Days = v
	}
	if v, err := strconv.Atoi(r.URL.Query().Get("max")); err == nil && v >= 1 && v <= 1000 {
		d.Max = v
	}
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	files, err := c.cfg.Store.RareFiles(ctx, c.now().Add(-time.Duration(d.Days)*24*time.Hour), d.Max, 100)
	if err != nil {
		c.storeError(w, r, s, err)
		return
	}
	hashes := make([]string, len(files))
	for i, f := range files {
		hashes[i] = f.SHA256
	}
	now := c.now()
	infos, err := c.cfg.Store.Lookup(ctx, hashes, c.cfg.Rules.Trust(now))
	if err != nil {
		c.storeError(w, r, s, err)
		return
	}
	for i, f := range files {
		d.Files = append(d.Files, rareRow{RareFile: f, Verdict: c.cfg.Rules.Decide(infos[i], now)})
	}
	c.render(w, r, http.StatusOK, "worklist", c.base(s, "Work list", "worklist", d))
}
