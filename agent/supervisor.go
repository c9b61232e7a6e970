package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// FatalError stops the whole agent: a component that cannot go on (the
// local API lost its socket, the state folder vanished) returns one.
// Read it with errors.As.
type FatalError struct {
	Component string
	Err       error
}

func (e *FatalError) Error() string { return fmt.Sprintf("%s: %v", e.Component, e.Err) }
func (e *FatalError) Unwrap() error { return e.Err }

// Fatal wraps err so the supervisor stops the agent.
func Fatal(component string, err error) error { return &FatalError{Component: component, Err: err} }

// service is one long-running part of the agent.
type service struct {
	name  string
	serve func(ctx context.Context) error
}

// Restart backoff for components that fail without a FatalError.
const (
	restartMin = time.Second
	restartMax = time.Minute
)

// supervise runs every service until ctx is cancelled or one returns a
// FatalError. A service that returns another error is logged and
// restarted after a growing delay. It returns ctx.Err() on a clean stop,
// or the FatalError.
func supervise(ctx context.Context, log *slog.Logger, services ...service) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	for _, s := range services {
		wg.Add(1)
		go func() {
			defer wg.Done()
			delay := restartMin
			for {
				started := time.Now()
				err := s.serve(ctx)
				if ctx.Err() != nil {
					return
				}
				var fe *FatalError
				if errors.As(err, &fe) {
					log.Error("component failed; stopping the agent", "component", s.name, "err", err)
					cancel(err)
					return
				}
				if time.Since(started) > restartMax {
					delay = restartMin
				}
				log.Warn("component stopped; restarting", "component", s.name, "err", err, "in", delay)
				select {
				case <-ctx.Done():
					return
				case <-time.After(delay):
				}
				delay = min(delay*2, restartMax)
			}
		}()
	}
	<-ctx.Done()
	wg.Wait()
	if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) {
		return cause
	}
	return ctx.Err()
}
