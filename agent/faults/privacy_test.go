package faults

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/testenv"
)

// tap is a TCP proxy on loopback that records every byte clients send
// before passing it on.
type tap struct {
	ln     net.Listener
	target string

	mu     sync.Mutex // protects chunks and conns
	chunks []chunk
	conns  int
}

type chunk struct {
	conn int
	data []byte
}

func startTap(t *testing.T, target string) *tap {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tp := &tap{ln: ln, target: target}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			tp.mu.Lock()
			tp.conns++
			id := tp.conns
			tp.mu.Unlock()
			wg.Go(func() { tp.relay(id, c) })
		}
	})
	return tp
}

func (tp *tap) relay(id int, c net.Conn) {
	defer c.Close()
	up, err := net.Dial("tcp", tp.target)
	if err != nil {
		return
	}
	defer up.Close()
	go func() { io.Copy(c, up); c.Close() }()
	buf := make([]byte, 32<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			tp.mu.Lock()
			tp.chunks = append(tp.chunks, chunk{id, bytes.Clone(buf[:n])})
			tp.mu.Unlock()
			if _, werr := up.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (tp *tap) URL() string { return "http://" + tp.ln.Addr().String() }

// mark returns how many chunks were recorded so far.
func (tp *tap) mark() int {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	return len(tp.chunks)
}

// sentRequest is one request read back from the recorded bytes.
type sentRequest struct {
	first  int // index of the chunk holding its first byte
	method string
	path   string
	header http.Header
	body   []byte // as decoded (gunzipped) by the server
	raw    []byte // the bytes as sent
}

// requests parses the recorded bytes of every connection as HTTP
// requests. Bytes that do not parse fail the test: everything sent must
// be accounted for.
func (tp *tap) requests(t *testing.T) (all []byte, reqs []sentRequest) {
	t.Helper()
	tp.mu.Lock()
	chunks := slicesClone(tp.chunks)
	tp.mu.Unlock()
	byConn := map[int][]int{}
	for i, c := range chunks {
		byConn[c.conn] = append(byConn[c.conn], i)
		all = append(all, c.data...)
	}
	for _, idx := range byConn {
		var stream []byte
		var starts []int // offset where each chunk starts
		for _, i := range idx {
			starts = append(starts, len(stream))
			stream = append(stream, chunks[i].data...)
		}
		cr := &countingReader{r: bytes.NewReader(stream)}
		br := bufio.NewReader(cr)
		for {
			off := cr.n - int64(br.Buffered())
			if off >= int64(len(stream)) {
				break
			}
			req, err := http.ReadRequest(br)
			if err != nil {
				t.Fatalf("bytes sent that are not an HTTP request at offset %d: %v\n%q", off, err, stream[off:min(int(off)+200, len(stream))])
			}
			body, err := io.ReadAll(req.Body)
			if err != nil {
				t.Fatalf("read body of %s %s: %v", req.Method, req.URL.Path, err)
			}
			end := cr.n - int64(br.Buffered())
			sr := sentRequest{method: req.Method, path: req.URL.Path, header: req.Header, raw: stream[off:end], body: body}
			if req.Header.Get("Content-Encoding") == "gzip" {
				zr, err := gzip.NewReader(bytes.NewReader(body))
				if err != nil {
					t.Fatalf("gzip body of %s: %v", req.URL.Path, err)
				}
				if sr.body, err = io.ReadAll(zr); err != nil {
					t.Fatalf("gunzip body of %s: %v", req.URL.Path, err)
				}
			}
			k := sort.Search(len(starts), func(i int) bool { return int64(starts[i]) > off }) - 1
			sr.first = idx[k]
			reqs = append(reqs, sr)
		}
	}
	sort.Slice(reqs, func(i, j int) bool { return reqs[i].first < reqs[j].first })
	return all, reqs
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

func slicesClone[T any](s []T) []T { return append([]T(nil), s...) }

// jsonKeys lists the keys of a JSON document as dotted paths; array
// elements take their parent's path.
func jsonKeys(v any, prefix string, out map[string]bool) {
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			p := k
			if prefix != "" {
				p = prefix + "." + k
			}
			out[p] = true
			jsonKeys(e, p, out)
		}
	case []any:
		for _, e := range x {
			jsonKeys(e, prefix, out)
		}
	}
}

// The privacy proof: every byte the agent sends during a whole session
// (participate, programs executed with secrets in their arguments and
// environment from a person's home, a download, an upload, leaving) is
// recorded on its way to the real reference cloud. No user name, home
// path, argument, environment value or host name is in it, whatever its
// case, as a path component or inside one: an account made while the
// agent runs, with its home outside /home, runs programs from its home,
// from folders named after it and from a folder named after the computer;
// every statistics field is one the statement names; the only headers and
// endpoints are the API's; and after leaving, only the deletion request
// goes out.
func TestPrivacyEveryByteSent(t *testing.T) {
	faultCase(t)
	user := "alice-test-" + strings.ToLower(rand.Text()[:8])
	home := filepath.Join("/home", user)
	if err := os.MkdirAll(filepath.Join(home, "Downloads"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(home) })
	argvSecret := "ARGV-SECRET-" + rand.Text()
	envSecret := "ENV-SECRET-" + rand.Text()
	hostname, _ := os.Hostname()

	srv := startCloud(t)
	tp := startTap(t, strings.TrimPrefix(srv.URL, "http://"))
	a := newAgent(t, agentOpts{Home: home, Server: tp.URL()})
	a.cloud = srv
	a.start()
	a.participate()
	a.waitWatching(worldDir(t, "cloudprotect-faults-privacy-"))

	// Programs in the person's home, run with secrets in argv and env.
	bin := filepath.Join(home, ".local", "bin")
	proj := filepath.Join(home, "projects", "secret-project", "build")
	os.MkdirAll(bin, 0o755)
	os.MkdirAll(proj, 0o755)
	tool, toolSum := uniqueProgram(t, bin, "tool")
	built, builtSum := uniqueProgram(t, proj, "built")
	for _, p := range []string{tool, built} {
		for range 3 {
			cmd := exec.Command(p, "--password="+argvSecret, user)
			cmd.Env = []string{"SECRET_ENV=" + envSecret, "USER=" + user, "HOME=" + home, "HOSTNAME=" + hostname}
			cmd.Dir = home
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("run %s: %v %s", p, err, out)
			}
		}
	}
	// A person whose account is made now (the agent read the accounts
	// at its start), with a home outside /home, runs programs from their
	// home and from folders named after them, in other cases; and a
	// program from a folder named after the computer.
	zoeHome := filepath.Join("/u", "cpzoe"+strings.ToLower(rand.Text()[:6]))
	t.Cleanup(func() { os.Remove("/u") })
	zoe := testenv.AddUser(t, "cpzoe", zoeHome)
	upper := strings.ToUpper(zoe.Name)
	var zoeSums []string
	zoeDirs := map[string]string{ // folder → the path expected in the records
		filepath.Join(zoe.Home, "bin"):                                             "~/bin/tool",
		filepath.Join(zoe.Home, "secret-project", zoe.Name+"-payroll-export"):      "~/secret-project/~-payroll-export/tool",
		filepath.Join(worldDir(t, "cloudprotect-faults-privacy-"), upper+"-build"): "/~-build/tool",
	}
	short, _, _ := strings.Cut(hostname, ".")
	if short != "" && !strings.EqualFold(short, "localhost") {
		zoeDirs[filepath.Join(worldDir(t, "cloudprotect-faults-privacy-"), short+"-nightly")] = "/~-nightly/tool"
	}
	for dir := range zoeDirs {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		prog, sum := uniqueProgram(t, dir, "tool")
		os.Chown(prog, int(zoe.UID), int(zoe.GID))
		for d := dir; strings.HasPrefix(d, zoe.Home); d = filepath.Dir(d) {
			os.Chown(d, int(zoe.UID), int(zoe.GID))
		}
		cmd := exec.Command(prog)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: zoe.UID, Gid: zoe.GID, Groups: []uint32{}}}
		cmd.Dir = "/"
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("run %s as %s: %v %s", prog, zoe.Name, err, out)
		}
		zoeSums = append(zoeSums, sum)
	}
	// A download.
	_, dlSum := uniqueProgram(t, filepath.Join(home, "Downloads"), "installer")
	// Wait (bounded) for what the session produced to be counted; the
	// checks below say what went missing.
	deadline := time.Now().Add(20 * time.Second)
	zoeSeen := func() bool {
		for _, sum := range zoeSums {
			if a.seen(sum) < 1 {
				return false
			}
		}
		return true
	}
	for a.seen(toolSum) < 3 || a.seen(builtSum) < 3 || (!srv.loaded(t, dlSum) && !loadedQueued(a, dlSum)) || !zoeSeen() {
		if time.Now().After(deadline) {
			t.Errorf("the session's programs were not all counted within 20s: tool %d, built %d, download sent %v queued %v",
				a.seen(toolSum), a.seen(builtSum), srv.loaded(t, dlSum), loadedQueued(a, dlSum))
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	a.Client.Upload(ctx)
	cancel()

	// Leave: after the answer, only the deletion request may go out.
	a.leave()
	leftAt := tp.mark()
	a.waitStatus("the deletion to be confirmed", func(s api.Status) bool { return !s.Upload.DeletionPending })
	// Programs keep running after leaving.
	runN(t, tool, 2)
	time.Sleep(1500 * time.Millisecond)
	a.stop()

	all, reqs := tp.requests(t)
	if len(reqs) == 0 {
		t.Fatal("nothing was sent")
	}
	for _, bad := range []string{user, home, zoe.Name, upper, zoe.Home, argvSecret, envSecret, "SECRET_ENV"} {
		if bytes.Contains(all, []byte(bad)) {
			t.Errorf("the bytes sent contain %q", bad)
		}
	}
	if len(hostname) >= 4 && bytes.Contains(all, []byte(hostname)) {
		t.Errorf("the bytes sent contain the host name %q", hostname)
	}
	// In what was sent, decoded (leaving out the random token, batch and
	// installation IDs), no user name, home or host name in any case: a
	// name of three characters or more anywhere, a shorter one ("vm") as
	// a word.
	names := []string{user, home, zoe.Name, zoe.Home, hostname, short}
	var patterns []*regexp.Regexp
	for _, n := range names {
		if n == "" {
			continue
		}
		q := regexp.QuoteMeta(n)
		if len(n) < 3 {
			q = `(^|[^A-Za-z0-9])` + q + `($|[^A-Za-z0-9])`
		}
		patterns = append(patterns, regexp.MustCompile(`(?i)`+q))
	}
	batchID := regexp.MustCompile(`"batch_id":"[^"]*"`)
	for _, r := range reqs {
		path := r.path
		if strings.HasPrefix(path, "/v1/installations/") {
			path = "/v1/installations/{}"
		}
		texts := []string{path, batchID.ReplaceAllString(string(r.body), `"batch_id":""`)}
		for h, vs := range r.header {
			if h != "Authorization" && h != "Idempotency-Key" {
				texts = append(texts, vs...)
			}
		}
		for _, s := range texts {
			for _, re := range patterns {
				if loc := re.FindStringIndex(s); loc != nil {
					t.Errorf("%s %s sends %q in %q", r.method, r.path, s[loc[0]:loc[1]], s[max(0, loc[0]-80):min(len(s), loc[1]+80)])
				}
			}
		}
	}
	allowedHeaders := map[string]bool{"Host": true, "User-Agent": true, "Content-Length": true, "Content-Type": true,
		"Content-Encoding": true, "Accept": true, "Accept-Encoding": true, "Authorization": true, "Idempotency-Key": true}
	bodyKeys := map[string]map[string]bool{
		"POST /v1/installations":      {"agent_version": true, "statement_version": true},
		"POST /v1/statistics":         {"batch_id": true, "statement_version": true, "records": true},
		"POST /v1/reputation/sha256":  {"sha256": true},
		"DELETE /v1/installations/{}": {},
	}
	sawTool, sawPaths := false, map[string]bool{}
	for _, r := range reqs {
		route := r.method + " " + r.path
		if strings.HasPrefix(r.path, "/v1/installations/") {
			route = r.method + " /v1/installations/{}"
		}
		allowed, ok := bodyKeys[route]
		if !ok {
			t.Errorf("request to an endpoint outside the API: %s", route)
			continue
		}
		for h := range r.header {
			if !allowedHeaders[h] {
				t.Errorf("%s sent header %s: %q", route, h, r.header.Get(h))
			}
		}
		if r.first >= leftAt && route != "DELETE /v1/installations/{}" {
			t.Errorf("%s sent after leaving", route)
		}
		if len(r.body) == 0 {
			continue
		}
		var doc any
		if err := json.Unmarshal(r.body, &doc); err != nil {
			t.Errorf("%s body is not JSON: %v", route, err)
			continue
		}
		keys := map[string]bool{}
		jsonKeys(doc, "", keys)
		for k := range keys {
			if rec, ok := strings.CutPrefix(k, "records."); ok {
				if !consent.StatementMentions(rec) && !(rec == "elf" && consent.StatementMentions("elf.machine")) {
					t.Errorf("%s sends field %q, which the statement does not name", route, rec)
				}
				continue
			}
			if !allowed[k] {
				t.Errorf("%s sends field %q", route, k)
			}
		}
		if route == "POST /v1/statistics" {
			var b struct {
				Records []struct {
					SHA256 string `json:"sha256"`
					Path   string `json:"path"`
				} `json:"records"`
			}
			json.Unmarshal(r.body, &b)
			for _, rec := range b.Records {
				sawPaths[rec.Path] = true
				if rec.SHA256 == toolSum {
					sawTool = true
				}
			}
		}
	}
	// The capture is complete: what the session produced is in it, with
	// anonymised paths.
	if !sawTool {
		t.Fatalf("the tool's record is not in the bytes sent: the capture missed the upload")
	}
	wants := []string{"~/.local/bin/tool", "~/projects/secret-project/build/built", "~/Downloads/installer"}
	for dir, want := range zoeDirs {
		if !strings.HasPrefix(want, "~") {
			want = filepath.Dir(dir) + want // the test's folder, then the anonymised one
		}
		wants = append(wants, want)
	}
	for _, want := range wants {
		if !sawPaths[want] {
			t.Errorf("no record with path %q was sent (paths sent: %d)", want, len(sawPaths))
		}
	}
	if n := srv.installations(t); n != 0 {
		t.Errorf("the cloud still knows %d installations after leaving", n)
	}
	t.Logf("privacy: %d requests, %d bytes recorded; %d distinct paths sent, none with the user name, home, argv, env or host name",
		len(reqs), len(all), len(sawPaths))
}

// loadedQueued reports whether the queue holds sha as a loaded file.
func loadedQueued(a *agentProc, sha string) bool {
	_, m := a.queued()
	return m[sha].Loaded
}
