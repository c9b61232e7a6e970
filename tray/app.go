package tray

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/agent/safetext"
	"github.com/cloudprotect/cloudprotect/icons"
	"github.com/cloudprotect/cloudprotect/tray/i18n"
)

// Agent is what the tray needs from the agent's local API; *localapi.Client
// provides it.
type Agent interface {
	Status(ctx context.Context) (api.Status, error)
	StatementIn(ctx context.Context, lang string) (api.Statement, error)
	SetParticipation(ctx context.Context, req api.ParticipationRequest) (api.Status, error)
	Upload(ctx context.Context) (api.UploadResult, error)
	Alerts(ctx context.Context) (api.AlertList, error)
	Events(ctx context.Context, fn func(api.Event) error) error
}

var _ Agent = (*localapi.Client)(nil)

// ItemID names a clickable menu item.
type ItemID int

// Clickable menu items. The detections are ItemAlert, ItemAlert+1, … up
// to MaxAlerts.
const (
	ItemParticipate ItemID = iota + 1
	ItemStatement
	ItemSendNow
	ItemAutostart
	ItemQuit
	ItemMarkSeen
	ItemAlert ItemID = 100
)

// UI shows menus and reports clicks: the systray layer, or a test's fake.
type UI interface {
	// Apply shows m. It is called from one goroutine at a time.
	Apply(m Menu)
	// Clicks delivers clicks on menu items.
	Clicks() <-chan ItemID
}

// Note is a desktop notification. Title is always fixed text of the
// tray's; anything that comes from a file (a program's name or path) goes
// in Body only, and the Notifier escapes Body for the server's markup.
type Note struct {
	Title, Body string
	Icon        icons.State
	// Critical notes have critical urgency and stay until the person
	// dismisses them.
	Critical bool
	// Dismissed, when set, is called once the person closes or clicks
	// the note (not when it expires). It may be called from any goroutine.
	Dismissed func()
}

// Notifier shows desktop notifications.
type Notifier interface {
	Notify(n Note) error
}

// Question is a Yes/No question about participation.
type Question struct {
	Title, Body string
	Yes, No     string // labels of the two answers
	Icon        icons.State
}

// ErrCannotAsk is returned by a Confirmer that has no way to ask on this
// desktop.
var ErrCannotAsk = errors.New("no way to ask a question on this desktop")

// Confirmer asks the person a Yes/No question. It returns true for Yes and
// false for No or a dismissed question. When ctx ends first it withdraws
// the question (closes the notification or dialog) and returns ctx.Err().
type Confirmer interface {
	Confirm(ctx context.Context, q Question) (bool, error)
}

// Clock tells the time and waits; tests pass a fake one.
type Clock interface {
	Now() time.Time
	After(d time.Duration) <-chan time.Time
}

type realClock struct{}

func (realClock) Now() time.Time                         { return time.Now() }
func (realClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// Config wires an App.
type Config struct {
	Agent     Agent
	UI        UI
	Notifier  Notifier
	Confirmer Confirmer
	// Printer speaks the person's language; nil means English.
	Printer *i18n.Printer
	// AgentHint says how to start the agent, shown while none answers.
	AgentHint string
	// Open opens a file with the desktop's handler; nil means xdg-open.
	Open func(ctx context.Context, path string) error
	// Autostart is the tray's autostart entry.
	Autostart Autostart
	// StateDir keeps what the tray remembers (that it invited the person
	// once, which detections were seen); CacheDir receives the statement
	// for the desktop's handler.
	StateDir, CacheDir string
	Clock              Clock        // nil means the real clock
	Logger             *slog.Logger // nil means discard
	// Backoff is the first wait before reconnecting to the agent; it doubles
	// up to MaxBackoff. Zero means 250 ms and 30 s.
	Backoff, MaxBackoff time.Duration
	// LossGrace is how many failed attempts pass before an agent that was
	// never reached is reported lost (an agent that was reached and went
	// away is reported at once). Zero means 4.
	LossGrace int
	// AskTimeout bounds how long a question waits for an answer. Zero means
	// two minutes.
	AskTimeout time.Duration
}

// App is the tray's loop: it follows the agent's events, keeps the menu up
// to date and turns clicks into agent calls. Everything slow (agent calls,
// questions, notifications) runs off the loop, so clicks are taken at once.
type App struct {
	cfg Config
	p   *i18n.Printer
	log *slog.Logger

	events  chan agentMsg
	results chan func()
	notes   chan Note
	jobs    sync.WaitGroup

	// Set by Run before anything else starts.
	ctx context.Context

	// Owned by the loop goroutine only.
	view         View
	menu         Menu
	applied      bool
	connected    bool
	lossNotified bool
	invited      bool
	alerts       []api.Alert // recent detections, newest first
	seen         *seenStore
	// askCancel withdraws the question being asked; askFor is the
	// participation it was asked about.
	askCancel context.CancelFunc
	askFor    api.Participation
}

// maxKeptAlerts bounds the detections the tray keeps in memory.
const maxKeptAlerts = 20

// agentMsg is what the event follower tells the loop.
type agentMsg struct {
	status  *api.Status
	alert   *api.Alert
	lost    bool
	attempt int
	err     error
}

// NewApp returns an App for cfg.
func NewApp(cfg Config) *App {
	if cfg.Clock == nil {
		cfg.Clock = realClock{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if cfg.Printer == nil {
		cfg.Printer = i18n.English()
	}
	if cfg.Backoff <= 0 {
		cfg.Backoff = 250 * time.Millisecond
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 30 * time.Second
	}
	if cfg.LossGrace <= 0 {
		cfg.LossGrace = 4
	}
	if cfg.AskTimeout <= 0 {
		cfg.AskTimeout = 2 * time.Minute
	}
	if cfg.Open == nil {
		cfg.Open = xdgOpen
	}
	a := &App{
		cfg:     cfg,
		p:       cfg.Printer,
		log:     cfg.Logger,
		events:  make(chan agentMsg),
		results: make(chan func()),
		notes:   make(chan Note, 32),
		ctx:     context.Background(),
	}
	a.seen = loadSeen(cfg.StateDir, a.log)
	a.view.AgentHint = cfg.AgentHint
	return a
}

// Initial returns the menu to show before the loop runs: from status when
// the agent answered, else the unreachable menu.
func (a *App) Initial(status *api.Status) Menu {
	a.view.Status = status
	a.refreshAutostart()
	a.view.Now = a.cfg.Clock.Now()
	return Build(a.view, a.p)
}

// Run runs the loop until ctx is done or the person clicks Quit, and waits
// for the work it started.
func (a *App) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	a.ctx = ctx
	defer func() {
		cancel()
		a.jobs.Wait()
	}()
	a.jobs.Add(2)
	go func() { defer a.jobs.Done(); a.follow(ctx) }()
	go func() { defer a.jobs.Done(); a.deliver(ctx) }()

	a.refreshAutostart()
	a.apply()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case id := <-a.cfg.UI.Clicks():
			if id == ItemQuit {
				a.log.Info("quit from the menu")
				return nil
			}
			a.click(ctx, id)
		case m := <-a.events:
			a.agentChanged(ctx, m)
		case f := <-a.results:
			f()
		}
		a.apply()
	}
}

func (a *App) apply() {
	a.view.Now = a.cfg.Clock.Now()
	a.view.Alerts = a.view.Alerts[:0]
	for _, al := range a.alerts {
		a.view.Alerts = append(a.view.Alerts, SeenAlert{Alert: al, Seen: a.seen.has(alertKey(al))})
	}
	m := Build(a.view, a.p)
	if a.applied && m == a.menu {
		return
	}
	a.menu, a.applied = m, true
	a.cfg.UI.Apply(m)
}

func (a *App) refreshAutostart() {
	a.view.Autostart, a.view.AutostartErr = a.cfg.Autostart.Enabled()
	if a.view.AutostartErr != nil {
		a.log.Warn("read autostart entry", "err", a.view.AutostartErr)
	}
}

// follow reads the agent's event stream and reconnects with backoff when it
// ends. It never polls: a change reaches the tray as an event.
func (a *App) follow(ctx context.Context) {
	attempt := 0
	for {
		err := a.cfg.Agent.Events(ctx, func(ev api.Event) error {
			switch ev.Type {
			case api.EventStatus:
				if ev.Status == nil {
					return nil
				}
				attempt = 0
				return a.send(ctx, agentMsg{status: ev.Status})
			case api.EventAlert:
				if ev.Alert == nil {
					return nil
				}
				return a.send(ctx, agentMsg{alert: ev.Alert})
			}
			return nil
		})
		if ctx.Err() != nil {
			return
		}
		attempt++
		if a.send(ctx, agentMsg{lost: true, attempt: attempt, err: err}) != nil {
			return
		}
		wait := a.cfg.Backoff
		for i := 1; i < attempt && wait < a.cfg.MaxBackoff; i++ {
			wait *= 2
		}
		wait = min(wait, a.cfg.MaxBackoff)
		a.log.Debug("agent event stream ended", "err", err, "attempt", attempt, "retry_in", wait)
		select {
		case <-ctx.Done():
			return
		case <-a.cfg.Clock.After(wait):
		}
	}
}

func (a *App) send(ctx context.Context, m agentMsg) error {
	select {
	case a.events <- m:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// post runs f on the loop; jobs use it to report back.
func (a *App) post(ctx context.Context, f func()) {
	select {
	case a.results <- f:
	case <-ctx.Done():
	}
}

func (a *App) agentChanged(ctx context.Context, m agentMsg) {
	switch {
	case m.alert != nil:
		a.log.Warn("reputation alert", "id", m.alert.ID, "verdict", m.alert.Verdict, "action", m.alert.Action, "path", safetext.Line(m.alert.Path))
		a.addAlerts([]api.Alert{*m.alert})
	case m.status != nil:
		old := a.view.Status
		if !a.connected {
			a.connected = true
			a.log.Info("agent reached", "state", m.status.Participation.State)
			if a.lossNotified {
				a.lossNotified = false
				a.notify(Note{Title: a.p.Sprintf("Cloud protection agent is back"), Body: a.p.Sprintf("The tray shows its status again."), Icon: stateIcon(m.status)})
			}
			a.fetchAlerts(ctx)
		} else if old != nil && m.status.Alerts != old.Alerts {
			a.fetchAlerts(ctx)
		}
		a.view.Status = m.status
		a.withdrawStaleQuestion(m.status.Participation)
		a.maybeInvite(m.status)
	case m.lost:
		if a.connected {
			a.log.Warn("agent lost", "err", m.err)
		}
		if (a.connected || m.attempt >= a.cfg.LossGrace) && !a.lossNotified {
			a.lossNotified = true
			body := a.p.Sprintf("Cloud protection status is unknown. The tray reconnects when the agent is back.")
			if a.cfg.AgentHint != "" {
				body += " " + a.cfg.AgentHint
			}
			a.notify(Note{Title: i18n.AgentDown(a.p), Body: body, Icon: icons.Unreachable})
		}
		a.connected = false
		a.view.Status = nil
		a.withdrawStaleQuestion(api.Participation{})
	}
}

// withdrawStaleQuestion closes a question about participation once the
// answer no longer applies: the participation changed elsewhere (the
// command line, the policy) or the agent went away.
func (a *App) withdrawStaleQuestion(now api.Participation) {
	if a.askCancel == nil {
		return
	}
	was := a.askFor
	if now.State == was.State && now.Locked == was.Locked && now.Paused == was.Paused && now.StatementVersion == was.StatementVersion {
		return
	}
	a.log.Info("question withdrawn: participation changed elsewhere", "was", was.State, "now", now.State)
	a.askCancel()
	a.askCancel = nil
}

func stateIcon(s *api.Status) icons.State {
	return Build(View{Status: s}, i18n.English()).Icon
}

// fetchAlerts asks the agent for its recent alerts, off the loop.
func (a *App) fetchAlerts(ctx context.Context) {
	a.start(ctx, func(ctx context.Context) {
		l, err := a.cfg.Agent.Alerts(ctx)
		var ae *localapi.APIError
		switch {
		case errors.As(err, &ae) && ae.StatusCode == http.StatusNotFound:
			a.log.Debug("the agent keeps no alert history")
			return
		case err != nil:
			a.log.Warn("read recent alerts", "err", err)
			return
		}
		a.post(ctx, func() { a.addAlerts(l.Alerts) })
	})
}

// addAlerts merges alerts into the recent detections and tells the person
// about those not told yet: each in a notification that stays, or one
// notification for many.
func (a *App) addAlerts(list []api.Alert) {
	var fresh []api.Alert
	for _, al := range list {
		k := alertKey(al)
		if !slices.ContainsFunc(a.alerts, func(b api.Alert) bool { return alertKey(b) == k }) {
			a.alerts = append(a.alerts, al)
		}
		if !a.seen.has(k) && !a.seen.notified(k) {
			fresh = append(fresh, al)
		}
	}
	slices.SortStableFunc(a.alerts, func(x, y api.Alert) int {
		if c := y.Time.Compare(x.Time); c != 0 {
			return c
		}
		return int(int64(y.ID) - int64(x.ID))
	})
	if len(a.alerts) > maxKeptAlerts {
		a.alerts = a.alerts[:maxKeptAlerts]
	}
	for _, al := range fresh {
		a.seen.markNotified(alertKey(al))
	}
	switch {
	case len(fresh) > 3:
		keys := make([]string, len(fresh))
		for i, al := range fresh {
			keys[i] = alertKey(al)
		}
		a.notify(Note{
			Title:     a.p.Sprintf("Dangerous programs detected"),
			Body:      a.p.Sprintf("The Security Network reported %d programs on this computer as dangerous. Open the cloud icon's menu to see them.", len(fresh)),
			Icon:      icons.Threat,
			Critical:  true,
			Dismissed: a.dismissed(keys...),
		})
	default:
		for _, al := range fresh {
			a.notify(a.alertNote(al, true))
		}
	}
	a.seen.save()
}

// alertNote is the notification for one alert. Its title is fixed text;
// the program's name and path, which anyone who can name a file chooses,
// appear in the body only, made safe to show.
func (a *App) alertNote(al api.Alert, critical bool) Note {
	program := short(al.Program, 80)
	path := short(al.Path, 240)
	verdict := a.p.Sprintf("malicious")
	if al.Verdict == "untrusted" {
		verdict = a.p.Sprintf("untrusted")
	}
	n := Note{Icon: icons.Threat, Critical: critical}
	if al.Action == api.AlertActionBlocked {
		n.Title = a.p.Sprintf("Dangerous program blocked")
		n.Body = a.p.Sprintf("%s was stopped before it ran: the Security Network knows it as %s.\n%s", program, verdict, path)
	} else {
		n.Title = a.p.Sprintf("Dangerous program detected")
		n.Body = a.p.Sprintf("The Security Network knows %s as %s. Do not run it again, and remove it if you did not expect it.\n%s", program, verdict, path)
	}
	if critical {
		n.Dismissed = a.dismissed(alertKey(al))
	}
	return n
}

// dismissed returns a callback that marks the alerts seen, on the loop.
func (a *App) dismissed(keys ...string) func() {
	ctx := a.ctx
	return func() {
		a.post(ctx, func() { a.markSeen(keys...) })
	}
}

func (a *App) markSeen(keys ...string) {
	for _, k := range keys {
		a.seen.markSeen(k)
	}
	a.seen.save()
}

// inviteFile remembers that the person was invited to decide once.
const inviteFile = "tray-invited"

// maybeInvite shows one notification inviting the person to decide, the
// first time the tray sees consent undecided on this account.
func (a *App) maybeInvite(s *api.Status) {
	if a.invited || s.Participation.State != api.StateUndecided || !s.CanChange || s.Participation.Locked {
		return
	}
	a.invited = true
	if a.cfg.StateDir == "" {
		return
	}
	path := filepath.Join(a.cfg.StateDir, inviteFile)
	if _, err := os.Stat(path); err == nil {
		return
	}
	a.notify(Note{
		Title: a.p.Sprintf("Help improve cloud protection"),
		Body: a.p.Sprintf("Participate in Security Network to get up-to-date reputation for the programs you run. "+
			"Open the cloud icon's menu and choose %s to read what is shared and decide.", a.p.Sprintf(LabelJoin)),
		Icon: icons.Undecided,
	})
	if err := os.MkdirAll(a.cfg.StateDir, 0o700); err == nil {
		err = writeAtomic(path, []byte("shown "+a.cfg.Clock.Now().UTC().Format(time.RFC3339)+"\n"))
		if err != nil {
			a.log.Warn("remember invitation", "err", err)
		}
	} else {
		a.log.Warn("remember invitation", "err", err)
	}
}

// PanelMissing tells the person, once, that no panel shows the icon and
// that the command line works without it.
func (a *App) PanelMissing() {
	a.notify(Note{
		Title: a.p.Sprintf("The cloud protection icon cannot be shown"),
		Body: a.p.Sprintf("This desktop shows no status icons (on GNOME, the AppIndicator extension adds them). " +
			"Cloud protection works without the icon; in a terminal, `cloudprotect status` shows it. " +
			"The icon appears as soon as a panel can show it."),
		Icon: icons.Undecided,
	})
}

// notify queues a notification; it never blocks. Any goroutine may call it.
func (a *App) notify(n Note) {
	select {
	case a.notes <- n:
	default:
		a.log.Warn("notification dropped: too many waiting", "title", n.Title)
	}
}

// deliver sends queued notifications one at a time.
func (a *App) deliver(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case n := <-a.notes:
			if a.cfg.Notifier == nil {
				continue
			}
			if err := a.cfg.Notifier.Notify(n); err != nil {
				a.log.Warn("send notification", "title", n.Title, "err", err)
			}
		}
	}
}

func (a *App) click(ctx context.Context, id ItemID) {
	a.log.Debug("click", "item", id)
	switch {
	case id == ItemParticipate:
		action := a.menu.ParticipateAction
		if action == NoAction || a.view.Asking || a.view.Status == nil {
			return
		}
		a.view.Asking = true
		askCtx, cancel := context.WithCancel(ctx)
		a.askCancel, a.askFor = cancel, a.view.Status.Participation
		a.start(ctx, func(ctx context.Context) {
			defer a.post(ctx, func() {
				a.view.Asking = false
				if a.askCancel != nil {
					a.askCancel()
					a.askCancel = nil
				}
			})
			a.participate(ctx, askCtx, action)
		})
	case id == ItemStatement:
		a.start(ctx, a.showStatement)
	case id == ItemSendNow:
		a.start(ctx, a.sendNow)
	case id == ItemMarkSeen:
		var keys []string
		for _, al := range a.alerts {
			keys = append(keys, alertKey(al))
		}
		a.markSeen(keys...)
	case id >= ItemAlert && id < ItemAlert+MaxAlerts:
		i := int(id - ItemAlert)
		if i >= len(a.alerts) {
			return
		}
		al := a.alerts[i]
		a.markSeen(alertKey(al))
		a.notify(a.alertNote(al, false))
	case id == ItemAutostart:
		want := !a.view.Autostart
		if err := a.cfg.Autostart.Set(want); err != nil {
			a.log.Error("change start at login", "err", err)
			a.notify(Note{Title: a.p.Sprintf("Start at login was not changed"), Body: err.Error(), Icon: a.menu.Icon})
		} else {
			a.log.Info("start at login changed", "on", want, "file", a.cfg.Autostart.UserFile())
		}
		a.refreshAutostart()
	}
}

// start runs f off the loop.
func (a *App) start(ctx context.Context, f func(ctx context.Context)) {
	a.jobs.Add(1)
	go func() {
		defer a.jobs.Done()
		f(ctx)
	}()
}

// participate asks the question, withdrawn when askCtx ends, and applies
// the answer under ctx.
func (a *App) participate(ctx, askCtx context.Context, action Action) {
	st, err := a.cfg.Agent.StatementIn(ctx, a.p.Lang())
	if err != nil {
		a.log.Error("read statement", "err", err)
		a.notify(Note{Title: a.p.Sprintf("Participation was not changed"), Body: a.errText(err), Icon: icons.Limited})
		return
	}
	var q Question
	var req api.ParticipationRequest
	var done Note
	if action == Join {
		q = Question{
			Title: a.p.Sprintf("Participate in Security Network?"),
			Body:  st.Summary + "\n\n" + a.p.Sprintf("This is version %d of the Security Network Statement.", st.Version),
			Yes:   a.p.Sprintf("Participate"),
			No:    a.p.Sprintf("Not now"),
			Icon:  icons.Undecided,
		}
		req = api.ParticipationRequest{Participate: true, StatementVersion: st.Version, Via: "tray"}
		done = Note{Title: a.p.Sprintf("You participate in Security Network"), Body: a.p.Sprintf("Cloud protection is on. Thank you for helping protect everyone."), Icon: icons.Participating}
	} else {
		q = Question{
			Title: a.p.Sprintf("Stop participating in Security Network?"),
			Body: a.p.Sprintf("Cloud protection turns off. Statistics not yet sent are deleted, and the Security Network " +
				"is asked to delete what it received from this computer."),
			Yes:  a.p.Sprintf("Stop participating"),
			No:   a.p.Sprintf("Keep participating"),
			Icon: icons.Declined,
		}
		req = api.ParticipationRequest{Participate: false, StatementVersion: st.Version, Via: "tray"}
		done = Note{Title: a.p.Sprintf("You no longer participate in Security Network"), Body: a.p.Sprintf("Nothing more is collected or sent. A deletion request goes to the Security Network."), Icon: icons.Declined}
	}

	askCtx, cancel := context.WithTimeout(askCtx, a.cfg.AskTimeout)
	yes, err := a.confirm(askCtx, q)
	cancel()
	switch {
	case errors.Is(err, ErrCannotAsk):
		a.log.Info("no way to ask here; opening the statement instead")
		cmd := "cloudprotect participate"
		if action == Leave {
			cmd = "cloudprotect leave"
		}
		body := a.p.Sprintf("To decide, run: %s", cmd)
		if path, err := a.writeStatement(st); err == nil {
			if err := a.cfg.Open(ctx, path); err != nil {
				body = a.p.Sprintf("The statement is in %s. To decide, run: %s", path, cmd)
			}
		}
		a.notify(Note{Title: a.p.Sprintf(LabelStatement), Body: body, Icon: icons.Undecided})
		return
	case err != nil:
		if askCtx.Err() == nil {
			a.log.Error("ask about participation", "err", err)
		}
		return
	case !yes:
		a.log.Info("participation unchanged: the person said no", "action", action)
		return
	}
	if _, err := a.cfg.Agent.SetParticipation(ctx, req); err != nil {
		a.log.Error("change participation", "err", err)
		a.notify(Note{Title: a.p.Sprintf("Participation was not changed"), Body: a.errText(err), Icon: icons.Limited})
		return
	}
	a.log.Info("participation changed from the tray", "participate", req.Participate, "statement_version", req.StatementVersion)
	a.notify(done)
}

func (a *App) confirm(ctx context.Context, q Question) (bool, error) {
	if a.cfg.Confirmer == nil {
		return false, ErrCannotAsk
	}
	return a.cfg.Confirmer.Confirm(ctx, q)
}

func (a *App) showStatement(ctx context.Context) {
	st, err := a.cfg.Agent.StatementIn(ctx, a.p.Lang())
	if err != nil {
		a.log.Error("read statement", "err", err)
		a.notify(Note{Title: a.p.Sprintf("Cannot show the Security Network Statement"), Body: a.errText(err), Icon: icons.Limited})
		return
	}
	path, err := a.writeStatement(st)
	if err != nil {
		a.log.Error("write statement", "err", err)
		a.notify(Note{Title: a.p.Sprintf("Cannot show the Security Network Statement"), Body: err.Error(), Icon: icons.Limited})
		return
	}
	if err := a.cfg.Open(ctx, path); err != nil {
		a.log.Warn("open statement", "path", path, "err", err)
		a.notify(Note{Title: a.p.Sprintf(LabelStatement), Body: a.p.Sprintf("Read it in %s or run: cloudprotect statement", path), Icon: icons.Limited})
	}
}

// writeStatement writes the statement as a web page the desktop's browser
// shows, and returns the file's path.
func (a *App) writeStatement(st api.Statement) (string, error) {
	dir := a.cfg.CacheDir
	if dir == "" {
		dir = os.TempDir()
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", a.p.Wrap(err, "write statement: %s", err.Error())
	}
	lang := st.Lang
	if lang == "" {
		lang = "en"
	}
	path := filepath.Join(dir, "security-network-statement-v"+itoa(st.Version)+"."+lang+".html")
	page, err := StatementHTML(st, a.p.Sprintf("Version %d", st.Version))
	if err != nil {
		return "", err
	}
	if err := writeAtomic(path, page); err != nil {
		return "", a.p.Wrap(err, "write statement: %s", err.Error())
	}
	return path, nil
}

func (a *App) sendNow(ctx context.Context) {
	r, err := a.cfg.Agent.Upload(ctx)
	if err != nil {
		a.log.Error("send statistics", "err", err)
		a.notify(Note{Title: a.p.Sprintf("Statistics were not sent"), Body: a.errText(err), Icon: icons.Limited})
		return
	}
	body := a.p.Sprintf("Sent: %d. Still waiting: %d.\n", r.Sent, r.Pending)
	if r.Refused > 0 {
		body += a.p.Sprintf("Refused by the server and dropped: %d.\n", r.Refused)
	}
	a.notify(Note{Title: a.p.Sprintf("Statistics sent"), Body: body, Icon: icons.Participating})
}

// errText is an agent error as a person reads it: the message and, when the
// agent gave one, the hint.
func (a *App) errText(err error) string {
	var ae *localapi.APIError
	if errors.As(err, &ae) {
		if ae.Hint != "" {
			return safetext.Line(ae.Message) + ". " + safetext.Line(ae.Hint)
		}
		return safetext.Line(ae.Message)
	}
	if errors.Is(err, localapi.ErrUnreachable) {
		return i18n.AgentDown(a.p) + "."
	}
	return err.Error()
}

func xdgOpen(ctx context.Context, path string) error {
	cmd := exec.CommandContext(ctx, "xdg-open", path)
	if out, err := cmd.CombinedOutput(); err != nil {
		return errors.New("xdg-open " + path + ": " + err.Error() + ": " + string(out))
	}
	return nil
}
