// Package agent is cloudprotectd: it wires consent, the exec sources, file
// identification, the statistics queue, the uploader, reputation lookups
// and the local API under one supervisor, and makes sure nothing is
// collected, queued or sent unless the person agreed.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/alerts"
	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/cloud"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/execwatch"
	"github.com/cloudprotect/cloudprotect/agent/identify"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/agent/queue"
	"github.com/cloudprotect/cloudprotect/agent/reputation"
	"github.com/cloudprotect/cloudprotect/agent/upload"
	"github.com/cloudprotect/cloudprotect/wire"
)

// MemoryLimit is the soft memory limit cloudprotectd gives the Go runtime
// (runtime/debug.SetMemoryLimit) unless GOMEMLIMIT says otherwise: the
// garbage collector works harder as the heap nears it, so the peak
// resident memory stays near what the agent really holds.
const MemoryLimit = 28 << 20

// queueFile is the queue's file in the state folder.
const queueFile = "queue.db"

// Modes the agent runs in.
const (
	ModeSystem = "system"
	ModeUser   = "user"
)

// Config is what cloudprotectd's flags set.
type Config struct {
	// Mode is ModeSystem (root, machine-wide) or ModeUser.
	Mode string
	// Version is the agent's release, reported in the status and to the
	// cloud at registration ("dev" when unset).
	Version string
	// StateDir holds the consent record, the queue and the upload state.
	StateDir string
	// Socket is the local API's unix socket.
	Socket string
	// PolicyPath is the administrator's policy file.
	PolicyPath string
	// Server is the Security Network's URL; the policy's wins. With
	// neither, nothing is sent.
	Server string
	// ExecSource forces an exec source by name ("" picks the best).
	ExecSource string
	// LoadDirs replaces the folders watched for programs that arrive
	// (by default the download folder and ~/.local/bin of each person).
	LoadDirs []string
	// StatementVersion overrides the shipped statement version (tests).
	StatementVersion int
	// NoBlocking keeps the agent from checking programs before they run,
	// whatever the policy says. Tests that run the agent inside their own
	// process set it: a permission group must live in a process that a
	// watchdog can kill (see docs/SECURITY.md).
	NoBlocking bool
	// ProtectPaths, when set, limits blocking to the filesystems holding
	// these folders (tests mark a private tmpfs); by default every local
	// filesystem is checked.
	ProtectPaths []string
	Logger       *slog.Logger
}

// IdentifyCacheFile is the file in the state folder where the facts of
// identified programs are kept across restarts (see identify.Serve).
const IdentifyCacheFile = "identify.cache"

// DefaultConfig returns the configuration for mode: system paths for
// ModeSystem, XDG paths of the current user for ModeUser.
func DefaultConfig(mode string) Config {
	c := Config{Mode: mode, PolicyPath: consent.DefaultPolicyPath}
	if mode == ModeSystem {
		c.StateDir = "/var/lib/cloudprotect"
		c.Socket = localapi.SystemSocket
		return c
	}
	state := os.Getenv("XDG_STATE_HOME")
	if state == "" {
		home, _ := os.UserHomeDir()
		state = filepath.Join(home, ".local", "state")
	}
	c.StateDir = filepath.Join(state, "cloudprotect")
	c.Socket = localapi.UserSocket()
	return c
}

// Agent is a running cloudprotectd.
type Agent struct {
	cfg     Config
	log     *slog.Logger
	consent *consent.Manager
	ln      net.Listener
	api     *localapi.Server
	hub     *localapi.Hub
	// alerts is the history of recent alerts.
	alerts  *alerts.History
	started time.Time

	queue   *queue.Queue
	install *cloud.Installation
	upload  *upload.Uploader
	rep     *reputation.Checker
	ident   *identify.Identifier
	anon    *identify.Anonymizer
	prot    *protection
	collect *collector
	// runners knows which users ran each program.
	runners *runners
	// dirty wakes the status publisher; one slot, never blocks.
	dirty chan struct{}
}

// New prepares an agent: it opens the state folder and the consent record
// and takes the socket. It fails when another agent serves the socket.
func New(cfg Config) (*Agent, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Mode != ModeSystem && cfg.Mode != ModeUser {
		return nil, fmt.Errorf("unknown mode %q", cfg.Mode)
	}
	if err := prepareStateDir(cfg.StateDir, cfg.Logger); err != nil {
		return nil, err
	}
	// The socket first: a second agent must not touch the first one's state.
	ln, err := localapi.Listen(cfg.Socket, cfg.Mode == ModeSystem)
	if err != nil {
		return nil, err
	}
	removeStaleTemps(cfg.StateDir, cfg.Logger)
	cm, err := consent.Open(consent.Options{
		StatePath:        filepath.Join(cfg.StateDir, "consent.json"),
		PolicyPath:       cfg.PolicyPath,
		StatementVersion: cfg.StatementVersion,
		Logger:           cfg.Logger,
	})
	if err != nil {
		ln.Close()
		return nil, err
	}
	hist, err := alerts.Open(filepath.Join(cfg.StateDir, alerts.FileName), alerts.Options{Logger: cfg.Logger})
	if err != nil {
		ln.Close()
		return nil, err
	}
	q, err := queue.Open(filepath.Join(cfg.StateDir, queueFile), queue.Options{Logger: cfg.Logger})
	if err != nil {
		ln.Close()
		return nil, err
	}
	a := &Agent{
		cfg:     cfg,
		log:     cfg.Logger,
		consent: cm,
		ln:      ln,
		hub:     localapi.NewHub(),
		alerts:  hist,
		started: time.Now().UTC(),
		queue:   q,
		anon:    identify.SystemAnonymizer(),
		runners: newRunners(),
		dirty:   make(chan struct{}, 1),
	}
	a.ident = identify.New(identify.Options{Anonymizer: a.anon, Logger: cfg.Logger,
		CachePath: filepath.Join(cfg.StateDir, IdentifyCacheFile)})
	a.install, err = cloud.Open(cloud.Options{
		StatePath:        filepath.Join(cfg.StateDir, cloud.StateFile),
		Server:           a.server,
		CAFile:           func() string { return a.consent.View().CAFile },
		Client:           cloud.ClientOptions{System: cfg.Mode == ModeSystem},
		Allowed:          cm.Collecting,
		StatementVersion: a.statementVersion,
		AgentVersion:     a.version(),
		EnrollSecret:     a.enrollSecret,
		Logger:           cfg.Logger,
		OnChange:         a.statusChanged,
	})
	if err == nil {
		a.upload, err = upload.New(upload.Options{
			Queue:            queueForUpload{q},
			Installation:     a.install,
			Scrub:            a.anon.Records,
			Allowed:          cm.Collecting,
			StatementVersion: a.statementVersion,
			Logger:           cfg.Logger,
			OnChange:         a.statusChanged,
		})
	}
	if err == nil {
		a.rep, err = reputation.New(reputation.Options{
			Lookup:  a.install,
			Allowed: cm.Collecting,
			Alert:   a.alert,
			Logger:  cfg.Logger,
		})
	}
	if err == nil {
		a.prot, err = a.newProtection()
	}
	if err != nil {
		q.Close()
		ln.Close()
		return nil, err
	}
	a.collect = newCollector(collectorDeps{
		log:     cfg.Logger,
		consent: cm,
		queue:   q,
		ident:   a.ident,
		rep:     a.rep,
		runners: a.runners,
		chain:   func() ([]func(execwatch.Options) execwatch.Source, error) { return execwatch.Chain(cfg.ExecSource) },
		loaded: func() execwatch.Source {
			return execwatch.NewLoaded(execwatch.LoadedOptions{Logger: cfg.Logger, Dirs: cfg.LoadDirs, People: a.loadPeople()})
		},
		afterBatch:     a.afterBatch,
		forget:         a.forget,
		consentChanged: a.onConsentChange,
		statusChanged:  a.statusChanged,
	})
	auth := localapi.OwnerOnly(os.Getuid())
	if cfg.Mode == ModeSystem {
		auth = localapi.RootOrGroup(func() string { return a.consent.View().AdminGroupName() })
	}
	a.api = localapi.NewServer(ln, a, auth, cfg.Logger)
	return a, nil
}

// Run runs the agent until ctx is cancelled (a clean stop returns nil) or
// a component fails fatally.
func (a *Agent) Run(ctx context.Context) error {
	defer a.ln.Close()
	defer a.queue.Close()
	a.log.Info("agent started", "version", a.version(), "mode", a.cfg.Mode, "socket", a.cfg.Socket,
		"state_dir", a.cfg.StateDir, "participation", a.consent.View().State)
	err := supervise(ctx, a.log,
		service{"localapi", func(ctx context.Context) error {
			if err := a.api.Serve(ctx); ctx.Err() == nil {
				return Fatal("local API", err)
			}
			return ctx.Err()
		}},
		service{"policy", a.consent.WatchPolicy},
		service{"status", a.publishStatus},
		service{"alerts", a.alerts.Serve},
		service{"queue", a.queue.Serve},
		service{"identify", a.ident.Serve},
		service{"collect", a.collect.Serve},
		service{"installation", a.install.Serve},
		service{"upload", a.upload.Serve},
		service{"reputation", a.rep.Serve},
		service{"senders", a.wakeSenders},
		service{"protect", a.protect},
	)
	a.log.Info("agent stopped")
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// statusMinGap spaces status events while events stream in, so a storm of
// executions costs the tray a few updates a second, not one per exec.
const statusMinGap = 250 * time.Millisecond

// statusChanged tells the publisher the status may have changed.
func (a *Agent) statusChanged() {
	select {
	case a.dirty <- struct{}{}:
	default:
	}
}

// publishStatus sends a status event whenever something the status shows
// changes, at most one per statusMinGap. It sleeps while nothing changes.
func (a *Agent) publishStatus(ctx context.Context) error {
	changed, cancel := a.consent.Subscribe()
	defer cancel()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		case <-a.dirty:
		}
		if a.hub.Len() > 0 {
			st := a.Status()
			a.hub.Publish(api.Event{Type: api.EventStatus, Time: time.Now().UTC(), Status: &st})
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(statusMinGap):
		}
	}
}

// afterBatch runs after events were queued: the uploader sends early when
// enough is pending. It is woken only then: below the threshold a nudge
// would wake it for nothing at every batch.
func (a *Agent) afterBatch() {
	if a.queue.Stats().Pending >= upload.DefaultNudgeThreshold {
		a.upload.Nudge()
	}
	a.statusChanged()
}

// onForget runs whenever the person is not participating: the cloud is
// asked to delete what it received from this installation (a durable
// request, retried until confirmed), and pending lookups are dropped.
func (a *Agent) onForget() {
	if err := a.alerts.Clear(); err != nil {
		a.log.Error("clear the alert history", "err", err)
	}
	// A damaged queue set aside (perhaps by a kill during the purge when
	// the person left) is wiped too: the purge wipes such files.
	if aside := a.setAside(); len(aside) > 0 {
		if err := a.queue.Purge(); err != nil {
			a.log.Error("wipe files set aside", "err", err)
		} else {
			a.log.Info("files set aside as damaged were wiped", "files", len(aside))
		}
	}
	if a.install.Status().Registered {
		if err := a.install.Leave(); err != nil {
			a.log.Error("queue deletion request", "err", err)
		}
	}
	a.rep.Forget()
}

// onConsentChange wakes the parts that send, so they stop or start at once.
func (a *Agent) onConsentChange() {
	a.install.Wake()
	a.upload.Wake()
	a.rep.Wake()
}

// RanBy returns the users the agent saw running the program with this
// SHA-256 (or owning it, for a file that arrived in a download folder),
// to decide who may see an alert about it; nil when none is known. A
// user is learnt from the owner of /proc/PID while the process runs, so
// a program that ends before the agent looks (within about 100 ms) may
// leave none. The agent remembers the latest 16,384 programs, 16 users
// each, and forgets everything when the person stops participating.
func (a *Agent) RanBy(sha256 string) []uint32 { return a.runners.of(sha256) }

// alert keeps a reputation alert in the history and publishes it on the
// event stream, for the users who ran the program and the administrators.
func (a *Agent) alert(al api.Alert) { a.raise(al, nil) }

// raise is alert with users known to have run (or tried to run) the
// program besides those the agent saw.
func (a *Agent) raise(al api.Alert, users []uint32) {
	for _, u := range a.RanBy(al.SHA256) {
		if !slices.Contains(users, u) {
			users = append(users, u)
		}
	}
	a.log.Warn("reputation alert", "program", al.Program, "path", al.Path, "verdict", al.Verdict, "sha256", al.SHA256, "users", users)
	if al.Action == "" {
		al.Action = api.AlertActionAlerted
	}
	if al.Action == api.AlertActionAlerted && al.Verdict == wire.VerdictMalicious {
		// Its file may carry an ignore mark from before the verdict: the
		// next execution must be decided again, and denied.
		a.prot.guard.Invalidate()
	}
	al = a.alerts.Add(al, users)
	a.hub.Publish(api.Event{Type: api.EventAlert, Time: al.Time, Alert: &al, Users: users})
	a.statusChanged()
}

// Alerts implements localapi.Backend.
func (a *Agent) Alerts(uid uint32, all bool) []api.Alert { return a.alerts.For(uid, all) }

// AlertSummary implements localapi.Backend.
func (a *Agent) AlertSummary(uid uint32, all bool) (int, *api.Alert) {
	return a.alerts.Summary(uid, all)
}

// version is the agent's release as configured.
func (a *Agent) version() string {
	if a.cfg.Version == "" {
		return "dev"
	}
	return a.cfg.Version
}

// statementVersion is the statement version sent with uploads: the one
// the person accepted, or the current one when the policy decided.
func (a *Agent) statementVersion() int {
	v := a.consent.View()
	if v.AcceptedVersion > 0 {
		return v.AcceptedVersion
	}
	return v.StatementVersion
}

// queueForUpload adapts the queue to what the uploader needs.
type queueForUpload struct{ q *queue.Queue }

func (u queueForUpload) TakeBatch(max int) (string, []wire.Record, error) {
	b, err := u.q.TakeBatch(max)
	return b.ID, b.Records, err
}
func (u queueForUpload) ReleaseBatch(id string) error { return u.q.ReleaseBatch(id) }
func (u queueForUpload) MarkSent(id string) error     { return u.q.MarkSent(id) }
func (u queueForUpload) DropBatch(id string) error    { return u.q.DropBatch(id) }
func (u queueForUpload) Pending() int                 { return u.q.Stats().Pending }

// Status implements localapi.Backend.
func (a *Agent) Status() api.Status {
	v := a.consent.View()
	st := api.Status{
		Participation: api.Participation{
			State:            api.State(v.State),
			StatementVersion: v.StatementVersion,
			AcceptedVersion:  v.AcceptedVersion,
			Paused:           v.Paused,
			Collecting:       v.Collecting,
			Locked:           v.Locked,
			Policy:           v.Policy,
			PolicyError:      v.PolicyError,
			Via:              string(v.Via),
			Notice:           v.Notice,
		},
		Agent: api.AgentInfo{
			Version: a.version(),
			Mode:    a.cfg.Mode,
			Started: a.started,
		},
		Upload:     a.upload.Status(),
		Protection: a.protectionInfo(v),
	}
	if !v.Since.IsZero() {
		since := v.Since
		st.Participation.Since = &since
	}
	qs := a.queue.Stats()
	st.Queue = api.QueueInfo{Pending: qs.Pending, Executions: qs.PendingExecs, Batch: qs.Batch, BatchExecutions: qs.BatchExecs,
		Records: qs.Records, Evicted: qs.Evicted, Bytes: qs.Bytes}
	cs := a.collect.status()
	st.Agent.EventsSeen, st.Agent.EventsLost = cs.stats.seen, cs.stats.lost
	st.Agent.EventsMissed, st.Agent.EventsUnidentified = cs.stats.missed, cs.stats.unidentified
	if v.Collecting {
		st.Agent.ExecSource = cs.source
		why := cs.reasons
		if err := a.queue.CommitError(); err != nil {
			why = append(why, fmt.Sprintf("statistics cannot be written to the state folder (%v): they are kept in memory until it can", err))
		}
		if qs.Evicted > 0 {
			why = append(why, fmt.Sprintf("the statistics queue was full and dropped %d records", qs.Evicted))
		}
		st.Agent.Limited, st.Agent.LimitedReason = len(why) > 0, strings.Join(why, "; ")
	}
	return st
}

// enrollSecret reads the enrollment secret from the file the policy
// names, or returns "" when it names none.
func (a *Agent) enrollSecret() (string, error) {
	f := a.consent.View().EnrollSecretFile
	if f == "" {
		return "", nil
	}
	return ReadEnrollSecret(f)
}

// ReadEnrollSecret reads an enrollment secret file: its contents without
// surrounding white space, 1 to wire.MaxEnrollSecret bytes.
func ReadEnrollSecret(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read the policy's enroll_secret_file: %w", err)
	}
	s := strings.TrimSpace(string(b))
	if s == "" || len(s) > wire.MaxEnrollSecret {
		return "", fmt.Errorf("read the policy's enroll_secret_file %s: want 1 to %d characters, it holds %d", path, wire.MaxEnrollSecret, len(s))
	}
	return s, nil
}

// server returns the Security Network's URL: the policy's, else the flag's.
func (a *Agent) server() string {
	if s := a.consent.View().Server; s != "" {
		return s
	}
	return a.cfg.Server
}

// SetParticipation implements localapi.Backend.
func (a *Agent) SetParticipation(req api.ParticipationRequest, uid int) (api.Status, error) {
	via, err := consent.ParseVia(req.Via)
	if err != nil {
		return api.Status{}, &localapi.HTTPError{Code: http.StatusBadRequest, Msg: err.Error(),
			Hint: `send "via": "cli", "tray" or "install"`}
	}
	if _, err := a.consent.Set(req.Participate, req.StatementVersion, via, uid); err != nil {
		return api.Status{}, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	a.collect.settled(ctx)
	return a.Status(), nil
}

// QueuePreview implements localapi.Backend: it streams every record
// waiting to be sent to emit, the batch waiting for the cloud first, and
// returns the totals. It reads the queue a page at a time and holds no
// lock while emit runs. Paths are anonymised again with what the agent
// knows now, as the upload does.
func (a *Agent) QueuePreview(ctx context.Context, emit func(api.QueueRecord) error) (api.QueuePreview, error) {
	p := api.QueuePreview{StatementVersion: a.statementVersion()}
	t := &p.Totals
	inBatch := make(map[string]bool)
	const page = 64
	recs := make([]wire.Record, 0, page)
	batch := make([]bool, 0, page)
	flush := func() error {
		for i, r := range a.anon.Records(recs) {
			if err := emit(api.QueueRecord{Record: r, InBatch: batch[i]}); err != nil {
				return err
			}
		}
		recs, batch = recs[:0], batch[:0]
		return nil
	}
	id, err := a.queue.Preview(func(r wire.Record, b bool) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		t.Records++
		t.Executions += r.ExecCount
		if b {
			t.BatchRecords++
			t.BatchExecutions += r.ExecCount
			inBatch[r.SHA256] = true
		}
		if b || !inBatch[r.SHA256] {
			t.Programs++
		}
		recs, batch = append(recs, r), append(batch, b)
		if len(recs) == page {
			return flush()
		}
		return nil
	})
	if err == nil {
		err = flush()
	}
	p.BatchID = id
	return p, err
}

// Upload implements localapi.Backend: it sends pending statistics now;
// without force, only when no retry after a failure is pending.
func (a *Agent) Upload(ctx context.Context, force bool) (api.UploadResult, error) {
	res, err := a.upload.Send(ctx, force)
	var be *upload.BackoffError
	if errors.As(err, &be) {
		return res, &localapi.HTTPError{Code: http.StatusTooManyRequests, Msg: err.Error(),
			Hint: "the statistics stay queued and are sent then; an administrator can send at once with `sudo cloudprotect send`"}
	}
	var ee *cloud.EndpointError
	switch {
	case errors.Is(err, cloud.ErrNoServer):
		return res, &localapi.HTTPError{Code: http.StatusConflict, Msg: err.Error(), Hint: cloud.NoServerHint}
	case errors.As(err, &ee):
		return res, &localapi.HTTPError{Code: http.StatusConflict, Msg: err.Error(), Hint: ee.Hint}
	}
	if errors.Is(err, cloud.ErrNotParticipating) {
		return res, &localapi.HTTPError{Code: http.StatusConflict,
			Msg:  "not participating in the Security Network: nothing is collected or sent",
			Hint: "run `cloudprotect participate` to take part"}
	}
	if err != nil {
		return res, &localapi.HTTPError{Code: http.StatusBadGateway, Msg: "send statistics: " + err.Error(),
			Hint: "the statistics stay queued and are sent later; `cloudprotect status` shows the next attempt", Upload: &res}
	}
	return res, nil
}

// Events implements localapi.Backend.
func (a *Agent) Events() *localapi.Hub { return a.hub }
