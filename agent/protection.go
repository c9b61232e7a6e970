package agent

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/agent/protect"
)

// guardRetry is how long the agent waits before it tries again to create
// the permission group after the kernel refused it.
const guardRetry = time.Minute

// protection holds the agent's side of blocking at exec.
type protection struct {
	guard      *protect.Guard
	exceptions *protect.Exceptions

	mu     sync.Mutex // protects reason
	reason string     // why blocking is not active, when the policy asks for it
}

// newProtection opens the exceptions in the state folder and prepares the
// guard; it runs only while protect says so.
func (a *Agent) newProtection() (*protection, error) {
	x, err := protect.OpenExceptions(filepath.Join(a.cfg.StateDir, protect.ExceptionsFile))
	if err != nil {
		return nil, err
	}
	if n := x.Notice(); n != "" {
		a.log.Error("local exceptions set aside", "notice", n)
	}
	g, err := protect.New(protect.Options{
		Identify:   a.ident,
		Reputation: a.rep,
		Exceptions: x,
		Report:     a.blocked,
		FirstSight: a.consent.View().FirstSightTimeout,
		Paths:      a.cfg.ProtectPaths,
		Logger:     a.log,
	})
	if err != nil {
		return nil, err
	}
	return &protection{guard: g, exceptions: x}, nil
}

// protect runs the permission group while the person participates and the
// policy says "block", and removes it at once otherwise: it exists only
// then. Stopping it allows every execution it holds.
func (a *Agent) protect(ctx context.Context) error {
	changed, unsubscribe := a.consent.Subscribe()
	defer unsubscribe()
	var (
		cancel context.CancelFunc
		done   chan error
		retry  <-chan time.Time
		// refused: the kernel refused the group for lack of privilege;
		// only a change of consent or policy is worth another try.
		refused bool
	)
	stop := func() {
		if cancel == nil {
			return
		}
		cancel()
		<-done
		cancel, done = nil, nil
		a.log.Info("blocking at exec stopped")
	}
	defer stop()
	for {
		v := a.consent.View()
		a.prot.guard.SetFirstSight(v.FirstSightTimeout)
		want := v.Collecting && v.Protection == consent.ProtectionBlock && !a.cfg.NoBlocking
		switch {
		case want && cancel == nil && retry == nil:
			gctx, c := context.WithCancel(ctx)
			cancel, done = c, make(chan error, 1)
			go func() { done <- a.prot.guard.Serve(gctx) }()
			a.prot.setReason("")
		case !want:
			stop()
			retry = nil
			a.prot.setReason(notActiveReason(v, a.cfg.NoBlocking))
		}
		a.statusChanged()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
			if refused {
				retry, refused = nil, false
			}
		case <-retry:
			retry = nil
		case err := <-done:
			cancel()
			cancel, done = nil, nil
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, unix.EPERM) {
				// Without CAP_SYS_ADMIN no retry can succeed: the next
				// change of consent or policy tries again.
				a.log.Warn("blocking at exec needs root: not available to this agent", "err", err)
				a.prot.setReason("blocking needs the system agent, which runs as root")
				retry, refused = make(chan time.Time), true // never fires
				break
			}
			a.log.Error("blocking at exec is not available", "err", err, "retry_in", guardRetry)
			a.prot.setReason(fmt.Sprintf("this computer does not allow checking programs before they run (%v)", err))
			retry = time.After(guardRetry)
		}
	}
}

// notActiveReason says why blocking is off, in words for the person.
func notActiveReason(v consent.View, noBlocking bool) string {
	switch {
	case noBlocking:
		return "blocking is turned off for this agent"
	case v.Protection == consent.ProtectionAlert:
		return "the policy says to alert only: programs the Security Network knows to be malicious run, and you are told"
	case v.Paused:
		return "paused until you agree to the current statement"
	default:
		return "blocking works while you participate in the Security Network"
	}
}

func (p *protection) setReason(r string) {
	p.mu.Lock()
	p.reason = r
	p.mu.Unlock()
}

// protectionInfo is the protection part of the status.
func (a *Agent) protectionInfo(v consent.View) api.ProtectionInfo {
	st := a.prot.guard.Stats()
	a.prot.mu.Lock()
	reason := a.prot.reason
	a.prot.mu.Unlock()
	info := api.ProtectionInfo{
		Mode:       v.Protection,
		Active:     st.Active,
		Blocked:    st.Denied,
		Held:       st.Held,
		LastBlock:  st.LastBlock,
		Exceptions: a.prot.exceptions.Len(),
	}
	if !st.Active {
		info.Reason = reason
	}
	if info.Active && st.CircuitOpen {
		info.Reason = "the Security Network did not answer in time: unfamiliar programs run without waiting for it until it answers again"
	}
	if n := a.prot.exceptions.Notice(); n != "" {
		info.Reason = join(info.Reason, n)
	}
	return info
}

func join(a, b string) string {
	if a == "" {
		return b
	}
	return a + "; " + b
}

// blocked reports a denied execution as an alert, the way reputation
// alerts are raised.
func (a *Agent) blocked(al api.Alert, uid int) {
	a.log.Warn("program blocked", "uid", uid)
	var users []uint32
	if uid >= 0 {
		users = []uint32{uint32(uid)}
	}
	a.raise(al, users)
	a.statusChanged()
}

// Exceptions implements localapi.Backend.
func (a *Agent) Exceptions() (api.ExceptionList, error) {
	return api.ExceptionList{Exceptions: a.prot.exceptions.List()}, nil
}

// SetException implements localapi.Backend: the change applies to the
// next execution. Removing an exception also removes the ignore marks,
// so a program allowed only by it is checked again.
func (a *Agent) SetException(req api.ExceptionRequest, uid int) (api.ExceptionList, error) {
	var err error
	if req.Remove {
		err = a.prot.exceptions.Remove(req.SHA256)
		if err == nil {
			a.prot.guard.Invalidate()
		}
	} else {
		_, err = a.prot.exceptions.Add(req.SHA256, req.Reason, uid, time.Now())
	}
	switch {
	case errors.Is(err, protect.ErrBadHash), errors.Is(err, protect.ErrBadReason), errors.Is(err, protect.ErrTooMany):
		return api.ExceptionList{}, &localapi.HTTPError{Code: http.StatusBadRequest, Msg: "exception refused: " + err.Error(),
			Hint: fmt.Sprintf("give the program's SHA-256 (64 hexadecimal digits) and a reason of up to %d characters", protect.MaxReasonLength)}
	case errors.Is(err, protect.ErrNotFound):
		return api.ExceptionList{}, &localapi.HTTPError{Code: http.StatusNotFound, Msg: "no exception for " + protect.NormalizeSHA256(req.SHA256),
			Hint: "`cloudprotect allow --list` shows the exceptions"}
	case err != nil:
		return api.ExceptionList{}, &localapi.HTTPError{Code: http.StatusInternalServerError, Msg: err.Error(),
			Hint: "nothing changed; check free space and permissions of the agent's state folder"}
	}
	a.log.Info("exception changed", "sha256", protect.NormalizeSHA256(req.SHA256), "removed", req.Remove, "uid", uid)
	a.statusChanged()
	return a.Exceptions()
}
