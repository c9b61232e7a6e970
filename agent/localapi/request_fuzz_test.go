package localapi

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/cloudprotect/cloudprotect/agent/api"
)

// FuzzParticipationRequest sends arbitrary bodies, methods and paths to
// the local API's handler as an authorised caller. Whatever arrives, the
// answer is a JSON object with a known status code, errors carry a
// message, and the backend is only called with a body that decodes
// strictly into one ParticipationRequest.
func FuzzParticipationRequest(f *testing.F) {
	seeds := []struct{ method, path, body string }{
		{"PUT", "/v1/participation", `{"participate": true, "statement_version": 1, "via": "cli"}`},
		{"PUT", "/v1/participation", `{"participate": false, "via": "tray"}`},
		{"PUT", "/v1/participation", `{"participate": tru`},
		{"PUT", "/v1/participation", `{"participate": true, "force": true}`},
		{"PUT", "/v1/participation", `{"via": "cli"}{}`},
		{"PUT", "/v1/participation", `{"statement_version": 1e400}`},
		{"PUT", "/v1/participation", `{"via": "\ud800"}`},
		{"PUT", "/v1/participation", `[]`},
		{"PUT", "/v1/participation", ``},
		{"PUT", "/v1/participation", strings.Repeat(`{"via":`, 5000)},
		{"GET", "/v1/status", ""},
		{"HEAD", "/v1/statement", ""},
		{"DELETE", "/v1/status", ""},
		{"GET", "/v1/../v1/status", ""},
		{"POST", "/v1/upload", "{}"},
	}
	for _, s := range seeds {
		f.Add(s.method, s.path, []byte(s.body))
	}
	known := map[int]bool{200: true, 400: true, 404: true, 405: true, 409: true, 413: true, 500: true}
	f.Fuzz(func(t *testing.T, method, path string, body []byte) {
		if !validMethod(method) || !strings.HasPrefix(path, "/") || strings.ContainsAny(path, "?#% \t") {
			return // not something net/http would hand to the handler
		}
		if _, err := url.ParseRequestURI("http://agent" + path); err != nil {
			return
		}
		b := newFakeBackend()
		s := NewServer(nil, b, func(Cred) bool { return true }, nil)
		req := httptest.NewRequestWithContext(context.WithValue(context.Background(), credKey{}, Cred{UID: 0}),
			method, "http://agent"+path, strings.NewReader(string(body)))
		if method == http.MethodGet && path == "/v1/events" {
			return // a stream: covered by the event tests
		}
		rec := httptest.NewRecorder()
		s.Handler().ServeHTTP(rec, req)
		res := rec.Result()
		if !known[res.StatusCode] {
			t.Fatalf("%s %s: status %d", method, path, res.StatusCode)
		}
		if method == http.MethodHead {
			return
		}
		if ct := res.Header.Get("Content-Type"); ct != "application/json" {
			t.Fatalf("%s %s: content type %q", method, path, ct)
		}
		if res.StatusCode != 200 && path != "/v1/upload" {
			var e api.Error
			if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || e.Error == "" {
				t.Fatalf("%s %s: error answer %q is not a JSON error (%v)", method, path, rec.Body.Bytes(), err)
			}
		}
		if b.nCalls() > 0 {
			if method != http.MethodPut || path != "/v1/participation" {
				t.Fatalf("%s %s reached SetParticipation", method, path)
			}
			var req api.ParticipationRequest
			dec := json.NewDecoder(strings.NewReader(string(body)))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&req); err != nil || len(body) > maxBody {
				t.Fatalf("body %q reached SetParticipation but does not decode strictly: %v", body, err)
			}
			if got := b.calls[0]; got != req {
				t.Fatalf("backend got %+v, body says %+v", got, req)
			}
		}
	})
}

func validMethod(m string) bool {
	if m == "" || m == "CONNECT" {
		return false
	}
	for _, r := range m {
		if r < 'A' || r > 'Z' {
			return false
		}
	}
	return true
}
