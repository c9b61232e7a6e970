package cloud

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/cloudprotect/cloudprotect/agent/safetext"
	"github.com/cloudprotect/cloudprotect/wire"
)

// Defaults of ClientOptions.
const (
	DefaultDialTimeout           = 10 * time.Second
	DefaultTLSHandshakeTimeout   = 10 * time.Second
	DefaultResponseHeaderTimeout = 30 * time.Second
	DefaultRequestTimeout        = 2 * time.Minute
)

// MaxResponseBytes bounds what the client reads of any answer.
const MaxResponseBytes = 1 << 20

// maxErrorBody bounds what is read of an error answer.
const maxErrorBody = 64 << 10

// maxTTL bounds how long a verdict may be cached, whatever the server says.
const maxTTL = 7 * 24 * time.Hour

// ErrBadAnswer is wrapped by the errors for answers the client cannot use:
// a body that is not JSON, too large, of the wrong type or with invalid
// fields.
var ErrBadAnswer = errors.New("unusable answer from the server")

// StatusError is an answer other than success. Code is the HTTP status;
// RetryAfter is the server's Retry-After (seconds or an HTTP date, as a
// duration from when it arrived), or 0 without one. A redirect is a
// StatusError too: the client never follows one, so the token and the
// data never reach another address.
type StatusError struct {
	Op         string // what was attempted: "register", "send batch", ...
	Code       int
	RetryAfter time.Duration
	Message    string // the server's wire.Error, when it sent one
	Hint       string
}

func (e *StatusError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: server answered %d %s", e.Op, e.Code, http.StatusText(e.Code))
	if e.Code >= 300 && e.Code < 400 {
		b.WriteString(" (redirects are not followed: check the server URL)")
	}
	if e.Message != "" {
		b.WriteString(": " + e.Message)
	}
	if e.RetryAfter > 0 {
		fmt.Fprintf(&b, " (retry after %s)", e.RetryAfter)
	}
	return b.String()
}

// ClientOptions configure a Client. The zero value gives the defaults.
type ClientOptions struct {
	// TLS is the TLS configuration (for instance a private root CA).
	// Certificate verification stays on: a configuration that turns it
	// off is refused.
	TLS *tls.Config
	// Timeouts: connecting, the TLS handshake, waiting for the answer's
	// header after sending, and the whole request including the body.
	DialTimeout           time.Duration
	TLSHandshakeTimeout   time.Duration
	ResponseHeaderTimeout time.Duration
	RequestTimeout        time.Duration
	// UserAgent is sent with every request.
	UserAgent string
	// System applies the system agent's rules for servers on this
	// computer (see ParseServerURL); otherwise a user-mode agent's.
	System bool
	// Now is the clock used to read Retry-After dates; nil means time.Now.
	Now func() time.Time
}

// Client talks to one Security Network server. It is safe for concurrent
// use. It sends only what its callers pass; the consent gate is the
// Installation's.
type Client struct {
	base *url.URL
	hc   *http.Client
	ua   string
	now  func() time.Time
}

// NewClient returns a client for the server at rawURL: https, or a
// server on this computer that opts.System's rules allow (see
// ParseServerURL), checked again on every connection.
func NewClient(rawURL string, opts ClientOptions) (*Client, error) {
	u, socket, err := ParseServerURL(rawURL, opts.System)
	if err != nil {
		return nil, err
	}
	if opts.TLS != nil && opts.TLS.InsecureSkipVerify {
		return nil, fmt.Errorf("create client: TLS certificate verification cannot be turned off")
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&opts.DialTimeout, DefaultDialTimeout)
	def(&opts.TLSHandshakeTimeout, DefaultTLSHandshakeTimeout)
	def(&opts.ResponseHeaderTimeout, DefaultResponseHeaderTimeout)
	def(&opts.RequestTimeout, DefaultRequestTimeout)
	if opts.UserAgent == "" {
		opts.UserAgent = "cloudprotectd"
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	tlsConf := &tls.Config{MinVersion: tls.VersionTLS12}
	if opts.TLS != nil {
		tlsConf = opts.TLS.Clone()
		if tlsConf.MinVersion < tls.VersionTLS12 {
			tlsConf.MinVersion = tls.VersionTLS12
		}
	}
	dialer := &net.Dialer{Timeout: opts.DialTimeout, KeepAlive: 30 * time.Second}
	dial := dialer.DialContext
	switch {
	case socket != "":
		dial = func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialUnix(ctx, dialer, socket, opts.System)
		}
	case u.Scheme == "http":
		dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			return dialLoopback(ctx, dialer, network, addr, opts.System)
		}
	}
	proxy := http.ProxyFromEnvironment
	if u.Scheme != "https" {
		proxy = nil // a server on this computer is reached directly
	}
	tr := &http.Transport{
		Proxy:                 proxy,
		DialContext:           dial,
		TLSClientConfig:       tlsConf,
		TLSHandshakeTimeout:   opts.TLSHandshakeTimeout,
		ResponseHeaderTimeout: opts.ResponseHeaderTimeout,
		ExpectContinueTimeout: time.Second,
		MaxIdleConns:          4,
		MaxIdleConnsPerHost:   2,
		IdleConnTimeout:       90 * time.Second,
		ForceAttemptHTTP2:     true,
	}
	return &Client{
		base: u,
		hc: &http.Client{
			Transport: tr,
			Timeout:   opts.RequestTimeout,
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			},
		},
		ua:  opts.UserAgent,
		now: opts.Now,
	}, nil
}

// Server returns the server's URL.
func (c *Client) Server() string { return c.base.String() }

// CloseIdleConnections closes idle keep-alive connections.
func (c *Client) CloseIdleConnections() { c.hc.CloseIdleConnections() }

// Register registers a new installation: POST /v1/installations.
func (c *Client) Register(ctx context.Context, req wire.RegisterRequest) (wire.Registration, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return wire.Registration{}, fmt.Errorf("register: %w", err)
	}
	var reg wire.Registration
	if err := c.do(ctx, "register", http.MethodPost, "/v1/installations", "", body, nil, &reg); err != nil {
		return wire.Registration{}, err
	}
	if err := checkRegistration(reg); err != nil {
		return wire.Registration{}, fmt.Errorf("register: %w", err)
	}
	return reg, nil
}

// PostBatch sends a batch, gzip-compressed JSON: POST /v1/statistics
// with Content-Encoding: gzip and the batch ID as Idempotency-Key, so
// that a retry of a batch the server already counted is not counted again.
func (c *Client) PostBatch(ctx context.Context, token, batchID string, gz []byte) (wire.BatchResult, error) {
	if len(gz) > wire.MaxBatchCompressed {
		return wire.BatchResult{}, fmt.Errorf("send batch: %d bytes compressed, more than %d", len(gz), wire.MaxBatchCompressed)
	}
	h := http.Header{}
	h.Set("Content-Encoding", "gzip")
	h.Set("Idempotency-Key", batchID)
	var res wire.BatchResult
	if err := c.do(ctx, "send batch", http.MethodPost, "/v1/statistics", token, gz, h, &res); err != nil {
		return wire.BatchResult{}, err
	}
	if res.Accepted < 0 {
		return wire.BatchResult{}, fmt.Errorf("send batch: %w: negative accepted count", ErrBadAnswer)
	}
	return res, nil
}

// DeleteInstallation asks the server to delete installation id and
// everything it contributed: DELETE /v1/installations/{id}. It returns nil
// once the server confirms: 2xx, or 404, which the server answers when
// nothing is (any longer) stored under the ID.
func (c *Client) DeleteInstallation(ctx context.Context, id, token string) error {
	if !validInstallationID(id) {
		return fmt.Errorf("delete installation: malformed installation ID %q", id)
	}
	err := c.do(ctx, "delete installation", http.MethodDelete, "/v1/installations/"+url.PathEscape(id), token, nil, nil, nil)
	var se *StatusError
	if errors.As(err, &se) && se.Code == http.StatusNotFound {
		return nil
	}
	return err
}

// Lookup asks for the reputation of up to wire.MaxLookupHashes files:
// POST /v1/reputation/sha256. Only answers for hashes that were asked
// about are returned; TTLs are bounded to a week and unknown verdicts read
// as "unknown".
func (c *Client) Lookup(ctx context.Context, token string, hashes []string) ([]wire.Reputation, error) {
	if len(hashes) == 0 {
		return nil, nil
	}
	if len(hashes) > wire.MaxLookupHashes {
		return nil, fmt.Errorf("look up reputation: %d hashes, more than %d", len(hashes), wire.MaxLookupHashes)
	}
	body, err := json.Marshal(wire.LookupRequest{SHA256: hashes})
	if err != nil {
		return nil, fmt.Errorf("look up reputation: %w", err)
	}
	var res wire.LookupResponse
	if err := c.do(ctx, "look up reputation", http.MethodPost, "/v1/reputation/sha256", token, body, nil, &res); err != nil {
		return nil, err
	}
	return checkReputations(res.Results, hashes), nil
}

// do sends one request and reads its answer into v (nil: no body wanted).
func (c *Client) do(ctx context.Context, op, method, path, token string, body []byte, h http.Header, v any) error {
	u := *c.base
	u.Path = c.base.Path + path
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), rd)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	for k, vs := range h {
		req.Header[k] = vs
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", c.ua)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	defer resp.Body.Close()
	return ParseResponse(op, resp.StatusCode, resp.Header, resp.Body, c.now(), v)
}

// ParseResponse reads an answer: for a 2xx status it decodes a JSON body
// of at most MaxResponseBytes into v (nil: the body is ignored); for any
// other status it returns a *StatusError with the server's message and
// Retry-After relative to now. It never reads more than MaxResponseBytes.
func ParseResponse(op string, code int, h http.Header, body io.Reader, now time.Time, v any) error {
	if code < 200 || code > 299 {
		se := &StatusError{Op: op, Code: code, RetryAfter: ParseRetryAfter(h.Get("Retry-After"), now)}
		if isJSON(h.Get("Content-Type")) {
			raw, _ := io.ReadAll(io.LimitReader(body, maxErrorBody))
			var we wire.Error
			if json.Unmarshal(raw, &we) == nil {
				se.Message, se.Hint = clean(we.Error), clean(we.Hint)
			}
		}
		io.Copy(io.Discard, io.LimitReader(body, maxErrorBody))
		return se
	}
	if v == nil {
		io.Copy(io.Discard, io.LimitReader(body, maxErrorBody))
		return nil
	}
	if !isJSON(h.Get("Content-Type")) {
		return fmt.Errorf("%s: %w: content type %q, want application/json", op, ErrBadAnswer, clean(h.Get("Content-Type")))
	}
	raw, err := io.ReadAll(io.LimitReader(body, MaxResponseBytes+1))
	if err != nil {
		return fmt.Errorf("%s: read answer: %w", op, err)
	}
	if len(raw) > MaxResponseBytes {
		return fmt.Errorf("%s: %w: larger than %d bytes", op, ErrBadAnswer, MaxResponseBytes)
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return fmt.Errorf("%s: %w: %v", op, ErrBadAnswer, err)
	}
	return nil
}

func isJSON(contentType string) bool {
	mt, _, err := mime.ParseMediaType(contentType)
	return err == nil && mt == "application/json"
}

// clean keeps a server-supplied message short and printable on one line
// (safetext.Line) before it is logged or shown.
func clean(s string) string {
	if len(s) > 300 {
		s = s[:300]
	}
	return safetext.Line(s)
}

// ParseRetryAfter reads a Retry-After header, delay-seconds or an HTTP
// date, as a duration from now. It returns 0 for a missing, malformed or
// past value.
func ParseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if n, err := strconv.ParseInt(v, 10, 64); err == nil {
		if n <= 0 {
			return 0
		}
		if n > int64(maxTTL/time.Second) {
			n = int64(maxTTL / time.Second)
		}
		return time.Duration(n) * time.Second
	}
	t, err := http.ParseTime(v)
	if err != nil {
		return 0
	}
	d := t.Sub(now)
	if d <= 0 {
		return 0
	}
	return min(d, maxTTL)
}

// validInstallationID matches the server's rule for installation IDs.
func validInstallationID(id string) bool {
	return wire.ValidBatchID(id) && len(id) <= 64
}

func checkRegistration(reg wire.Registration) error {
	if !validInstallationID(reg.InstallationID) {
		return fmt.Errorf("%w: malformed installation ID", ErrBadAnswer)
	}
	if reg.Token == "" || len(reg.Token) > 256 || !utf8.ValidString(reg.Token) {
		return fmt.Errorf("%w: malformed token", ErrBadAnswer)
	}
	for _, r := range reg.Token {
		if r <= ' ' || r >= 0x7f {
			return fmt.Errorf("%w: malformed token", ErrBadAnswer)
		}
	}
	return nil
}

// checkReputations keeps the answers to hashes that were asked about, one
// per hash, with known verdicts and sources and bounded TTLs.
func checkReputations(reps []wire.Reputation, asked []string) []wire.Reputation {
	want := make(map[string]bool, len(asked))
	for _, h := range asked {
		want[h] = true
	}
	out := make([]wire.Reputation, 0, len(reps))
	for _, r := range reps {
		if !want[r.SHA256] {
			continue
		}
		want[r.SHA256] = false
		if !wire.ValidVerdict(r.Verdict) {
			r.Verdict = wire.VerdictUnknown
		}
		if !wire.ValidSource(r.Source) {
			r.Source = ""
		}
		r.TTLSeconds = max(0, min(r.TTLSeconds, int(maxTTL/time.Second)))
		r.Prevalence = max(0, r.Prevalence)
		out = append(out, r)
	}
	return out
}
