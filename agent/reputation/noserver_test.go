package reputation_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/cloud"
	"github.com/cloudprotect/cloudprotect/agent/reputation"
)

// logBuffer collects what a logger writes.
type logBuffer struct {
	mu sync.Mutex // protects b
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// count returns how many lines hold s.
func (l *logBuffer) count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.b.String(), s)
}

// While no server is configured (or only one that may not be used), the
// checker makes no lookup and does not even wake up to retry: a day
// passes with programs arriving and nothing happens but one line in the
// log per change of configuration. The hashes wait, and are looked up as
// soon as the agent says the configuration changed and a server can be
// used. (Before, the checker retried with backoff and logged a warning
// every time.)
func TestNoRetriesWithoutAServer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		lk := &fakeLookup{verdicts: map[string]string{}, problem: cloud.ErrNoServer}
		var logs logBuffer
		c, err := reputation.New(reputation.Options{
			Lookup:  lk,
			Allowed: func() bool { return true },
			Alert:   func(api.Alert) {},
			Batch:   10,
			Logger:  slog.New(slog.NewTextHandler(&logs, nil)),
		})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- c.Serve(ctx) }()
		defer func() {
			cancel()
			if err := <-done; !errors.Is(err, context.Canceled) {
				t.Errorf("Serve = %v; want context.Canceled", err)
			}
		}()
		synctest.Wait()
		woken := lk.problemChecks()
		// Programs keep arriving, more than a batch of them.
		for i := range 25 {
			c.Check(hash(i), "~/bin/tool")
			time.Sleep(time.Hour)
		}
		synctest.Wait()
		if n := lk.callCount(); n != 0 {
			t.Errorf("%d lookups without a server; want none", n)
		}
		if n := lk.problemChecks(); n != woken {
			t.Errorf("the checker woke up %d times in a day without a server; want never", n-woken)
		}
		if n := logs.count("level=WARN"); n != 1 || logs.count("no Security Network server") != 1 {
			t.Errorf("%d warnings; want the missing server said once:\n%s", n, logs.b.String())
		}
		if st := c.Stats(); st.Pending != 25 || st.Dropped != 0 {
			t.Errorf("stats %+v; want the 25 hashes kept for later", st)
		}
		if _, err := c.Ask(ctx, []string{hash(0)}); !errors.Is(err, cloud.ErrNoServer) || lk.callCount() != 0 {
			t.Errorf("Ask without a server = %v after %d lookups; want ErrNoServer at once", err, lk.callCount())
		}

		// Another configuration that cannot be used is said once more;
		// the same one again, not.
		refused := &cloud.EndpointError{URL: "http://127.0.0.1:8787", Reason: "plain HTTP on a port any user can take", Hint: "use https://"}
		lk.setProblem(refused)
		c.Wake()
		synctest.Wait()
		c.Wake()
		synctest.Wait()
		if n := logs.count("level=WARN"); n != 2 || logs.count("any user can take") != 1 {
			t.Errorf("%d warnings after the server changed to one refused; want 2:\n%s", n, logs.b.String())
		}

		// A server that can be used: the hashes that waited are looked
		// up after the usual gathering window.
		lk.setProblem(nil)
		c.Wake()
		time.Sleep(reputation.DefaultWindow)
		synctest.Wait()
		if n := lk.callCount(); n != 3 {
			t.Errorf("%d lookups once a server can be used; want 3 (25 hashes, 10 at a time)", n)
		}
		if st := c.Stats(); st.Pending != 0 || st.Cached != 25 {
			t.Errorf("stats %+v; want every hash looked up", st)
		}
		if logs.count("reputation lookups resume") != 1 {
			t.Errorf("the return of a server was not logged:\n%s", logs.b.String())
		}
	})
}
