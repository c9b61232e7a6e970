package consent

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// View is the effective consent: the person's record seen through the
// administrator's policy and the current statement version.
type View struct {
	// State is the effective decision (a policy that forces participation
	// shows Participating, one that forbids it Declined).
	State State
	// StatementVersion is the statement this agent ships.
	StatementVersion int
	// AcceptedVersion is the statement version the person accepted.
	AcceptedVersion int
	// Paused is true when the person participates with an older statement.
	Paused bool
	// Collecting is true when the agent may collect, queue and send.
	Collecting bool
	// Locked is true when the policy forces the state; Policy is its path.
	Locked bool
	Policy string
	// PolicyError says why the policy file was ignored, if it was.
	PolicyError string
	// Via and Since say how and when the effective state was chosen.
	Via   Via
	Since time.Time
	// Notice is something the person should be told about their record.
	Notice string
	// Server is the policy's Security Network URL, if it sets one.
	Server string
	// CAFile is the policy's file of certificate authorities trusted for
	// the server, if it names one.
	CAFile string
	// AdminGroup is the policy's group allowed to change participation;
	// empty means the default (see AdminGroupName).
	AdminGroup string
	// EnrollSecretFile is the policy's file holding the enrollment secret
	// of a private Security Network, if it names one.
	EnrollSecretFile string
	// Protection is the policy's "block" (the default) or "alert", and
	// FirstSightTimeout how long an unfamiliar program may be held.
	Protection        string
	FirstSightTimeout time.Duration
}

// AdminGroupName returns the group allowed to change participation: the
// policy's, else "sudo" if that group exists, else "wheel". It reads the
// group database, so it is for authorisation, not for hot paths.
func (v View) AdminGroupName() string { return Policy{AdminGroup: v.AdminGroup}.AdminGroupName() }

// LockedError is returned when the policy forbids the change.
type LockedError struct {
	Policy string // the policy file's path
	Mode   string // "on" or "off"
}

func (e *LockedError) Error() string {
	return fmt.Sprintf("participation is set to %q by the administrator's policy %s", e.Mode, e.Policy)
}

// VersionError is returned when a client asks to participate with a
// statement version other than the current one.
type VersionError struct {
	Shown, Current int
}

func (e *VersionError) Error() string {
	if e.Shown == 0 {
		return fmt.Sprintf("no statement version given; the current Security Network Statement is version %d", e.Current)
	}
	return fmt.Sprintf("the statement shown was version %d, but the current Security Network Statement is version %d", e.Shown, e.Current)
}

// ErrSave wraps a failure to persist a decision; the decision did not
// take effect.
var ErrSave = errors.New("save consent record")

// Options configure a Manager.
type Options struct {
	// StatePath is the consent record's file.
	StatePath string
	// PolicyPath is the policy file's path (for messages and loading).
	PolicyPath string
	// StatementVersion overrides the shipped version (tests of version bumps).
	StatementVersion int
	Logger           *slog.Logger
	Now              func() time.Time
}

// Manager holds the effective consent and tells subscribers when it changes.
type Manager struct {
	store      *Store
	policyPath string
	current    int
	log        *slog.Logger
	now        func() time.Time

	// collecting mirrors View().Collecting for hot paths; it is written
	// under mu whenever the view may change.
	collecting atomic.Bool

	mu        sync.Mutex // protects the fields below
	rec       Record
	notice    string
	policy    Policy
	policyErr error
	subs      map[chan struct{}]struct{}
}

// Open loads the consent record and the policy. A corrupt record does not
// fail Open: it is set aside and the person is undecided. A broken policy
// is reported in the view and ignored.
func Open(opts Options) (*Manager, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.StatementVersion == 0 {
		opts.StatementVersion = StatementVersion
	}
	if opts.PolicyPath == "" {
		opts.PolicyPath = DefaultPolicyPath
	}
	m := &Manager{
		store:      NewStore(opts.StatePath, opts.Logger, opts.Now),
		policyPath: opts.PolicyPath,
		current:    opts.StatementVersion,
		log:        opts.Logger,
		now:        opts.Now,
		subs:       make(map[chan struct{}]struct{}),
	}
	rec, notice, err := m.store.Load()
	if err != nil {
		return nil, err
	}
	m.rec, m.notice = rec, notice
	m.policy = Policy{Participation: PolicyUser}
	m.ReloadPolicy()
	m.mu.Lock()
	m.notifyLocked()
	m.mu.Unlock()
	return m, nil
}

// PolicyPath returns the policy file's path.
func (m *Manager) PolicyPath() string { return m.policyPath }

// View returns the effective consent.
func (m *Manager) View() View {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.viewLocked()
}

func (m *Manager) viewLocked() View {
	v := View{
		State:             m.rec.State,
		StatementVersion:  m.current,
		AcceptedVersion:   m.rec.AcceptedVersion,
		Via:               m.rec.Via,
		Since:             m.rec.Time,
		Notice:            m.notice,
		Server:            m.policy.Server,
		CAFile:            m.policy.CAFile,
		AdminGroup:        m.policy.AdminGroup,
		EnrollSecretFile:  m.policy.EnrollSecretFile,
		Protection:        m.policy.Protection,
		FirstSightTimeout: m.policy.FirstSightTimeout(),
	}
	if v.Protection == "" {
		v.Protection = ProtectionBlock
	}
	if m.policyErr != nil {
		v.PolicyError = m.policyErr.Error()
		v.Policy = m.policyPath
	}
	switch m.policy.Participation {
	case PolicyOn:
		v.State, v.Locked, v.Policy, v.Via = Participating, true, m.policyPath, ViaPolicy
		v.Collecting = true
	case PolicyOff:
		v.State, v.Locked, v.Policy, v.Via = Declined, true, m.policyPath, ViaPolicy
	default:
		if v.State == Participating {
			v.Paused = v.AcceptedVersion < m.current
			v.Collecting = !v.Paused
		}
	}
	return v
}

// Set records a decision made by uid through via. To participate, shown
// must be the statement version the person was shown; it must be the
// current one. It returns the view after the change.
func (m *Manager) Set(participate bool, shown int, via Via, uid int) (View, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.policy.Locked() {
		return m.viewLocked(), &LockedError{Policy: m.policyPath, Mode: m.policy.Participation}
	}
	rec := Record{FormatVersion: recordFormat, State: Declined, Time: m.now().UTC(), Via: via, UID: uid}
	if participate {
		if shown != m.current {
			return m.viewLocked(), &VersionError{Shown: shown, Current: m.current}
		}
		rec.State, rec.AcceptedVersion = Participating, shown
	}
	notice := ""
	if err := m.store.Save(rec); err != nil {
		// Leaving must take effect even when the record cannot be written
		// (a full disk): the record is removed instead, which needs no
		// space and reads back as Undecided, which collects nothing.
		if participate || m.store.Remove() != nil {
			return m.viewLocked(), fmt.Errorf("%w: %v", ErrSave, err)
		}
		m.log.Warn("consent record could not be saved; removed it so that nothing is collected after a restart", "err", err)
		notice = fmt.Sprintf("Your choice to stop participating applies, but could not be saved (%v): "+
			"you will be asked again after the agent restarts. Nothing is collected meanwhile.", err)
	}
	m.rec, m.notice = rec, notice
	m.log.Info("participation changed", "state", rec.State, "accepted_version", rec.AcceptedVersion, "via", via, "uid", uid)
	m.notifyLocked()
	return m.viewLocked(), nil
}

// ReloadPolicy reads the policy file again and applies it whole. A policy
// that fails to load is reported in the view and ignored: the last good
// policy stays in force (the default one if there was none).
func (m *Manager) ReloadPolicy() {
	p, err := LoadPolicy(m.policyPath)
	m.mu.Lock()
	defer m.mu.Unlock()
	before := m.viewLocked()
	if err != nil {
		if m.policyErr == nil || m.policyErr.Error() != err.Error() {
			m.log.Error("policy file ignored", "path", m.policyPath, "err", err)
		}
		m.policyErr = err
	} else {
		if p != m.policy || m.policyErr != nil {
			m.log.Info("policy applied", "path", m.policyPath, "participation", p.Participation,
				"admin_group", p.AdminGroup, "server", p.Server)
		}
		m.policy, m.policyErr = p, nil
	}
	if m.viewLocked() != before {
		m.notifyLocked()
	}
}

// Subscribe returns a channel that receives a value whenever the view may
// have changed, and a function that ends the subscription. The channel
// holds one pending wake-up; a send never blocks.
func (m *Manager) Subscribe() (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	m.mu.Lock()
	m.subs[ch] = struct{}{}
	m.mu.Unlock()
	return ch, func() {
		m.mu.Lock()
		delete(m.subs, ch)
		m.mu.Unlock()
	}
}

// Collecting reports whether the agent may collect, queue and send. It
// is cheap: a load of a flag kept up to date with the view.
func (m *Manager) Collecting() bool { return m.collecting.Load() }

func (m *Manager) notifyLocked() {
	m.collecting.Store(m.viewLocked().Collecting)
	for ch := range m.subs {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}
