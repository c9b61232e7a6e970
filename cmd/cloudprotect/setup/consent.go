package setup

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
)

// How a decision reached the consent record.
const (
	// ThroughAgent: the running agent recorded it (PUT /v1/participation).
	ThroughAgent = "agent"
	// ThroughFile: no agent answered, so the record was written through
	// package consent, which the agent reads when it starts.
	ThroughFile = "file"
)

// Current is the participation found before installing.
type Current struct {
	State  consent.State
	Via    string
	Since  time.Time
	Paused bool
	// Locked is true when the administrator's policy decides; Policy is
	// its path.
	Locked bool
	Policy string
	// From is ThroughAgent or ThroughFile: who was asked.
	From string
}

// Decided reports whether a decision stands that installing should not
// ask about again.
func (c Current) Decided() bool {
	return c.Locked || (c.State != consent.Undecided && !c.Paused)
}

// Recorded is a decision made during installation.
type Recorded struct {
	State consent.State
	// Through is ThroughAgent or ThroughFile.
	Through string
	// Where is the agent's socket or the consent record's file.
	Where string
}

// SocketPath is where the system agent of layout l listens.
func SocketPath(l Layout) string { return l.OnDisk(localapi.SystemSocket) }

// RecordPath is the system agent's consent record under layout l.
func RecordPath(l Layout) string { return l.OnDisk(path.Join(StateDir, "consent.json")) }

func policyPath(l Layout) string { return l.OnDisk(consent.DefaultPolicyPath) }

// CurrentConsent asks the system agent of layout l for its participation,
// or reads the consent record and the policy when no agent answers.
func CurrentConsent(ctx context.Context, l Layout) (Current, error) {
	c := localapi.NewClient(SocketPath(l))
	defer c.Close()
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := c.Status(actx)
	if err == nil {
		p := st.Participation
		cur := Current{State: consent.State(p.State), Via: p.Via, Paused: p.Paused, Locked: p.Locked, Policy: p.Policy, From: ThroughAgent}
		if p.Since != nil {
			cur.Since = *p.Since
		}
		return cur, nil
	}
	if !errors.Is(err, localapi.ErrUnreachable) {
		return Current{}, fmt.Errorf("ask the agent: %w", err)
	}
	m, err := openRecord(l)
	if err != nil {
		return Current{}, err
	}
	v := m.View()
	return Current{State: v.State, Via: string(v.Via), Since: v.Since, Paused: v.Paused,
		Locked: v.Locked, Policy: v.Policy, From: ThroughFile}, nil
}

func openRecord(l Layout) (*consent.Manager, error) {
	m, err := consent.Open(consent.Options{StatePath: RecordPath(l), PolicyPath: policyPath(l)})
	if err != nil {
		return nil, fmt.Errorf("read the consent record: %w", err)
	}
	return m, nil
}

// RecordConsent records a decision made during installation by uid, with
// via "install" and the statement this version ships (the one shown). The
// agent of layout l records it when it answers; otherwise the record is
// written in its state folder through package consent, with the same
// checks the agent makes (a policy that locks participation refuses).
func RecordConsent(ctx context.Context, l Layout, participate bool, uid int) (Recorded, error) {
	req := api.ParticipationRequest{Participate: participate, Via: string(consent.ViaInstall)}
	if participate {
		req.StatementVersion = consent.StatementVersion
	}
	c := localapi.NewClient(SocketPath(l))
	defer c.Close()
	actx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	st, err := c.SetParticipation(actx, req)
	if err == nil {
		return Recorded{State: consent.State(st.Participation.State), Through: ThroughAgent, Where: SocketPath(l)}, nil
	}
	if !errors.Is(err, localapi.ErrUnreachable) {
		return Recorded{}, fmt.Errorf("record participation through the agent: %w", err)
	}
	// The agent creates its state folder readable by root alone.
	created, err := mkdirs(l.Root, path.Dir(StateDir))
	if _, serr := os.Stat(l.OnDisk(path.Dir(l.FoldersRecord()))); err == nil && serr == nil && len(created) > 0 {
		// Installed here: uninstall removes these folders too.
		err = recordFolders(l, created)
	}
	if err != nil {
		return Recorded{}, fmt.Errorf("record participation: %w", err)
	}
	if err := os.Mkdir(l.OnDisk(StateDir), 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return Recorded{}, fmt.Errorf("record participation: %w", err)
	}
	m, err := openRecord(l)
	if err != nil {
		return Recorded{}, err
	}
	v, err := m.Set(participate, consent.StatementVersion, consent.ViaInstall, uid)
	if err != nil {
		return Recorded{}, fmt.Errorf("record participation: %w", err)
	}
	return Recorded{State: v.State, Through: ThroughFile, Where: RecordPath(l)}, nil
}
