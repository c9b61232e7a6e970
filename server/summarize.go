package server

import (
	"context"
	"log/slog"
	"time"

	"github.com/cloudprotect/cloudprotect/server/store"
)

// DefaultSummarizeEvery is how often a Summarizer brings the summaries
// up to date when Every is zero.
const DefaultSummarizeEvery = 30 * time.Second

// Summarizer counts stored batches into the store's summaries in the
// background (store.Store.Summarize), so that the console's overview
// finds at most a few seconds' batches left to count. Every server on a
// database may run one: they take turns.
type Summarizer struct {
	Store store.Store
	// Every is the pause between runs; 0 means DefaultSummarizeEvery.
	Every time.Duration
	// Logger receives failures; nil discards.
	Logger *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Serve summarizes at once and then every s.Every until ctx is done, and
// returns ctx.Err(). A failed run is logged and the next one tries
// again: nothing is lost, the batches stay pending.
func (s *Summarizer) Serve(ctx context.Context) error {
	every := s.Every
	if every <= 0 {
		every = DefaultSummarizeEvery
	}
	log := s.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	now := s.Now
	if now == nil {
		now = time.Now
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if err := s.Store.Summarize(ctx, now()); err != nil && ctx.Err() == nil {
			log.WarnContext(ctx, "summaries not brought up to date; trying again later", "err", err, "retry_in", every)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}
