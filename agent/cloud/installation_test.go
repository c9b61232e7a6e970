package cloud_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/cloudprotect/cloudprotect/agent/cloud"
	"github.com/cloudprotect/cloudprotect/server"
	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/server/verdict"
)

// countingCloud is the reference cloud on loopback, counting the requests
// made to each path.
type countingCloud struct {
	url string
	mu  sync.Mutex // protects hits
	// hits counts requests by method and path.
	hits map[string]int
}

func newCountingCloud(t *testing.T) *countingCloud {
	t.Helper()
	st, err := store.Open(context.Background(), "sqlite:"+filepath.Join(t.TempDir(), "cloud.db"), nil)
	if err != nil {
		t.Fatalf("open store: %v", err)
	}
	t.Cleanup(func() { st.Close() })
	c := &countingCloud{hits: map[string]int{}}
	h := server.New(server.Config{Store: st, Rules: verdict.Default()})
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.mu.Lock()
		c.hits[r.Method+" "+r.URL.Path]++
		c.mu.Unlock()
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(ts.Close)
	c.url = ts.URL
	return c
}

func (c *countingCloud) count(what string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.hits[what]
}

// A person who leaves in the moment between the registration and a
// request that carries statistics or hashes sends nothing: the request of
// the installation left behind is never made. Without the installation's
// check of the generation before each request, the batch and the hashes
// went out under the installation being deleted.
func TestLeaveJustBeforeTheRequestSendsNothing(t *testing.T) {
	t.Parallel()
	srv := newCountingCloud(t)
	in, err := cloud.Open(cloud.Options{
		StatePath:        filepath.Join(t.TempDir(), cloud.StateFile),
		Server:           func() string { return srv.url },
		Allowed:          func() bool { return true },
		StatementVersion: func() int { return 1 },
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	hash := strings.Repeat("ab", 32)
	var leaveErr error
	leaveOnNext := func() {
		var once sync.Once
		cloud.SetBeforeRequest(in, func() { once.Do(func() { leaveErr = in.Leave() }) })
	}
	for _, tc := range []struct {
		what string
		call func(cloud.Generation) error
	}{
		{"POST /v1/statistics", func(gen cloud.Generation) error {
			return in.PostBatch(ctx, gen, "batch-1", []byte("never sent"))
		}},
		{"POST /v1/reputation/sha256", func(cloud.Generation) error {
			_, err := in.Lookup(ctx, []string{hash})
			return err
		}},
	} {
		// Registered first: a lookup of no hashes only registers.
		cloud.SetBeforeRequest(in, nil)
		if _, err := in.Lookup(ctx, nil); err != nil {
			t.Fatalf("register: %v", err)
		}
		gen := in.Generation()
		leaveOnNext()
		if err := tc.call(gen); !errors.Is(err, cloud.ErrLeft) {
			t.Errorf("%s after leaving = %v; want ErrLeft", tc.what, err)
		}
		if leaveErr != nil {
			t.Fatal(leaveErr)
		}
		if n := srv.count(tc.what); n != 0 {
			t.Errorf("%d requests %s made for the installation left behind; want none", n, tc.what)
		}
	}
	if n := srv.count("POST /v1/installations"); n != 2 {
		t.Errorf("%d registrations; want 2 (one before each leave)", n)
	}
}
