package cloud_test

import (
	"bytes"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cloudprotect/cloudprotect/agent/cloud"
	"github.com/cloudprotect/cloudprotect/wire"
)

// FuzzParseResponse feeds hostile answers to the agent's response
// parsing: it must never panic, never read past its bounds, and either
// fail or yield values the installation can use.
//
// Seeds are the answers in testdata/answers ("status content-type
// retry-after", a newline, the body); each file's name
// says what it reproduces.
func FuzzParseResponse(f *testing.F) {
	seeds, _ := filepath.Glob(filepath.Join("testdata", "answers", "*.txt"))
	for _, p := range seeds {
		data, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		// "status content-type retry-after\nbody"
		head, body, _ := bytes.Cut(data, []byte("\n"))
		fields := strings.SplitN(string(head), " ", 3)
		for len(fields) < 3 {
			fields = append(fields, "")
		}
		var code int
		for _, c := range fields[0] {
			code = code*10 + int(c-'0')
		}
		f.Add(code, fields[1], fields[2], body)
	}
	f.Fuzz(func(t *testing.T, code int, contentType, retryAfter string, body []byte) {
		h := http.Header{}
		h.Set("Content-Type", contentType)
		h.Set("Retry-After", retryAfter)
		for _, v := range []any{&wire.Registration{}, &wire.BatchResult{}, &wire.LookupResponse{}, nil} {
			r := &countingReader{r: bytes.NewReader(body)}
			err := cloud.ParseResponse("test", code, h, r, start, v)
			if r.n > cloud.MaxResponseBytes+1 {
				t.Fatalf("read %d bytes; the bound is %d", r.n, cloud.MaxResponseBytes)
			}
			var se *cloud.StatusError
			if errors.As(err, &se) {
				if se.Code != code || se.RetryAfter < 0 || len(se.Message) > 300 || len(se.Hint) > 300 {
					t.Fatalf("StatusError %+v for code %d", se, code)
				}
				if strings.ContainsAny(se.Message+se.Hint, "\n\r\x1b") {
					t.Fatalf("control characters kept in %q", se.Message)
				}
			}
			if (code < 200 || code > 299) && err == nil {
				t.Fatalf("status %d accepted", code)
			}
		}
		if code >= 200 && code <= 299 {
			var res wire.LookupResponse
			if cloud.ParseResponse("test", code, h, bytes.NewReader(body), start, &res) == nil {
				asked := make([]string, 0, len(res.Results))
				for _, r := range res.Results {
					asked = append(asked, r.SHA256)
				}
				for _, r := range cloud.CheckReputations(res.Results, asked) {
					switch r.Verdict {
					case wire.VerdictTrusted, wire.VerdictUntrusted, wire.VerdictMalicious, wire.VerdictUnknown:
					default:
						t.Fatalf("verdict %q kept", r.Verdict)
					}
					if r.TTLSeconds < 0 || r.TTLSeconds > 7*24*3600 {
						t.Fatalf("TTL %d kept", r.TTLSeconds)
					}
				}
			}
		}
	})
}

type countingReader struct {
	r *bytes.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}
