package server_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/cloudprotect/cloudprotect/server"
	"github.com/cloudprotect/cloudprotect/server/store"
)

// summarizeCounter is a store whose Summarize records its calls and
// fails when told to.
type summarizeCounter struct {
	store.Store // nil: only Summarize is called

	mu    sync.Mutex // protects calls and fail
	calls []time.Time
	fail  bool
}

func (s *summarizeCounter) Summarize(_ context.Context, now time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls = append(s.calls, now)
	if s.fail {
		return errors.New("database unreachable")
	}
	return nil
}

func (s *summarizeCounter) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.calls)
}

func TestSummarizerRunsEveryInterval(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		st := &summarizeCounter{fail: true}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- (&server.Summarizer{Store: st, Every: time.Minute}).Serve(ctx) }()
		synctest.Wait()
		if n := st.count(); n != 1 {
			t.Fatalf("%d runs at start; want 1", n)
		}
		// A failed run does not stop it.
		time.Sleep(time.Minute)
		synctest.Wait()
		st.mu.Lock()
		st.fail = false
		st.mu.Unlock()
		time.Sleep(time.Minute)
		synctest.Wait()
		if n := st.count(); n != 3 {
			t.Fatalf("%d runs after two minutes; want 3", n)
		}
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Fatalf("Serve = %v; want context.Canceled", err)
		}
	})
}
