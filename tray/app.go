package tray

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/icons"
)

// Agent is what the tray needs from the agent's local API; *localapi.Client
// provides it.
type Agent interface {
	Status(ctx context.Context) (api.Status, error)
	Statement(ctx context.Context) (api.Statement, error)
	SetParticipation(ctx context.Context, req api.ParticipationRequest) (api.Status, error)
	Upload(ctx context.Context) (api.UploadResult, error)
	Events(ctx context.Context, fn func(api.Event) error) error
}

var _ Agent = (*localapi.Client)(nil)

// ItemID names a clickable menu item.
type ItemID int

// Clickable menu items.
const (
	ItemParticipate ItemID = iota + 1
	ItemStatement
	ItemSendNow
	ItemAutostart
	ItemQuit
)

// UI shows menus and reports clicks: the systray layer, or a test's fake.
type UI interface {
	// Apply shows m. It is called from one goroutine at a time.
	Apply(m Menu)
	// Clicks delivers clicks on menu items.
	Clicks() <-chan ItemID
}

// Note is a desktop notification.
type Note struct {
	Title, Body string
	Icon        icons.State
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
// false for No or a dismissed question.
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
	// Open opens a file with the desktop's handler; nil means xdg-open.
	Open func(ctx context.Context, path string) error
	// Autostart is the tray's autostart entry.
	Autostart Autostart
	// StateDir keeps what the tray remembers (that it invited the person
	// once); CacheDir receives the statement for the desktop's handler.
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
	log *slog.Logger

	events  chan agentMsg
	results chan func()
	notes   chan Note
	jobs    sync.WaitGroup

	// Owned by the loop goroutine only.
	view         View
	menu         Menu
	applied      bool
	connected    bool
	lossNotified bool
	invited      bool
}

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
	return &App{
		cfg:     cfg,
		log:     cfg.Logger,
		events:  make(chan agentMsg),
		results: make(chan func()),
		notes:   make(chan Note, 32),
	}
}

// Initial returns the menu to show before the loop runs: from status when
// the agent answered, else the unreachable menu.
func (a *App) Initial(status *api.Status) Menu {
	a.view.Status = status
	a.refreshAutostart()
	a.view.Now = a.cfg.Clock.Now()
	return Build(a.view)
}

// Run runs the loop until ctx is done or the person clicks Quit, and waits
// for the work it started.
func (a *App) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
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
			a.agentChanged(m)
		case f := <-a.results:
			f()
		}
		a.apply()
	}
}

func (a *App) apply() {
	a.view.Now = a.cfg.Clock.Now()
	m := Build(a.view)
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

func (a *App) agentChanged(m agentMsg) {
	switch {
	case m.alert != nil:
		a.log.Warn("reputation alert", "program", m.alert.Program, "verdict", m.alert.Verdict, "path", m.alert.Path)
		a.notify(Note{
			Title: fmt.Sprintf("%s is %s", m.alert.Program, m.alert.Verdict),
			Body:  fmt.Sprintf("The Security Network reports %s as %s. Do not run it, and remove it if you did not expect it.", m.alert.Path, m.alert.Verdict),
			Icon:  icons.Limited,
		})
	case m.status != nil:
		if !a.connected {
			a.connected = true
			a.log.Info("agent reached", "state", m.status.Participation.State)
			if a.lossNotified {
				a.lossNotified = false
				a.notify(Note{Title: "Cloud protection agent is back", Body: "The tray shows its status again.", Icon: stateIcon(m.status)})
			}
		}
		a.view.Status = m.status
		a.maybeInvite(m.status)
	case m.lost:
		if a.connected {
			a.log.Warn("agent lost", "err", m.err)
		}
		if (a.connected || m.attempt >= a.cfg.LossGrace) && !a.lossNotified {
			a.lossNotified = true
			a.notify(Note{
				Title: "Cloud protection agent is not running",
				Body:  "Cloud protection status is unknown. The tray reconnects when the agent is back.",
				Icon:  icons.Unreachable,
			})
		}
		a.connected = false
		a.view.Status = nil
	}
}

func stateIcon(s *api.Status) icons.State {
	return Build(View{Status: s}).Icon
}

// inviteFile remembers that the person was invited to decide once.
const inviteFile = "tray-invited"

// maybeInvite shows one notification inviting the person to decide, the
// first time the tray sees consent undecided on this account.
func (a *App) maybeInvite(s *api.Status) {
	if a.invited || s.Participation.State != "undecided" || !s.CanChange || s.Participation.Locked {
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
		Title: "Help improve cloud protection",
		Body:  "Participate in Security Network to get up-to-date reputation for the programs you run. Open the cloud icon's menu and choose Participate in Security Network… to read what is shared and decide.",
		Icon:  icons.Undecided,
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

// notify queues a notification; it never blocks the loop.
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
	switch id {
	case ItemParticipate:
		action := a.menu.ParticipateAction
		if action == NoAction || a.view.Asking || a.view.Status == nil {
			return
		}
		a.view.Asking = true
		a.start(ctx, func(ctx context.Context) {
			defer a.post(ctx, func() { a.view.Asking = false })
			a.participate(ctx, action)
		})
	case ItemStatement:
		a.start(ctx, a.showStatement)
	case ItemSendNow:
		a.start(ctx, a.sendNow)
	case ItemAutostart:
		want := !a.view.Autostart
		if err := a.cfg.Autostart.Set(want); err != nil {
			a.log.Error("change start at login", "err", err)
			a.notify(Note{Title: "Start at login was not changed", Body: err.Error(), Icon: a.menu.Icon})
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

func (a *App) participate(ctx context.Context, action Action) {
	st, err := a.cfg.Agent.Statement(ctx)
	if err != nil {
		a.log.Error("read statement", "err", err)
		a.notify(Note{Title: "Participation was not changed", Body: errText(err), Icon: icons.Limited})
		return
	}
	var q Question
	var req api.ParticipationRequest
	var done Note
	if action == Join {
		q = Question{
			Title: "Participate in Security Network?",
			Body: st.Summary + "\n\n" + fmt.Sprintf("This is version %d of the Security Network Statement. ", st.Version) +
				"You can stop at any time from this menu.",
			Yes:  "Participate",
			No:   "Not now",
			Icon: icons.Undecided,
		}
		req = api.ParticipationRequest{Participate: true, StatementVersion: st.Version, Via: "tray"}
		done = Note{Title: "You participate in Security Network", Body: "Cloud protection is on. Thank you for helping protect everyone.", Icon: icons.Participating}
	} else {
		q = Question{
			Title: "Stop participating in Security Network?",
			Body: "Cloud protection turns off. Statistics not yet sent are deleted, and the Security Network " +
				"is asked to delete what it received from this computer.",
			Yes:  "Stop participating",
			No:   "Keep participating",
			Icon: icons.Declined,
		}
		req = api.ParticipationRequest{Participate: false, StatementVersion: st.Version, Via: "tray"}
		done = Note{Title: "You no longer participate in Security Network", Body: "Nothing more is collected or sent. A deletion request goes to the Security Network.", Icon: icons.Declined}
	}

	askCtx, cancel := context.WithTimeout(ctx, a.cfg.AskTimeout)
	yes, err := a.confirm(askCtx, q)
	cancel()
	switch {
	case errors.Is(err, ErrCannotAsk):
		a.log.Info("no way to ask here; opening the statement instead")
		cmd := "cloudprotect participate"
		if action == Leave {
			cmd = "cloudprotect leave"
		}
		body := "To decide, run: " + cmd
		if path, err := a.writeStatement(st); err == nil {
			if err := a.cfg.Open(ctx, path); err != nil {
				body = fmt.Sprintf("The statement is in %s. To decide, run: %s", path, cmd)
			}
		}
		a.notify(Note{Title: "Read the Security Network Statement", Body: body, Icon: icons.Undecided})
		return
	case err != nil:
		if ctx.Err() == nil {
			a.log.Error("ask about participation", "err", err)
		}
		return
	case !yes:
		a.log.Info("participation unchanged: the person said no", "action", action)
		return
	}
	if _, err := a.cfg.Agent.SetParticipation(ctx, req); err != nil {
		a.log.Error("change participation", "err", err)
		a.notify(Note{Title: "Participation was not changed", Body: errText(err), Icon: icons.Limited})
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
	st, err := a.cfg.Agent.Statement(ctx)
	if err != nil {
		a.log.Error("read statement", "err", err)
		a.notify(Note{Title: "Cannot show the Security Network Statement", Body: errText(err), Icon: icons.Limited})
		return
	}
	path, err := a.writeStatement(st)
	if err != nil {
		a.log.Error("write statement", "err", err)
		a.notify(Note{Title: "Cannot show the Security Network Statement", Body: err.Error(), Icon: icons.Limited})
		return
	}
	if err := a.cfg.Open(ctx, path); err != nil {
		a.log.Warn("open statement", "path", path, "err", err)
		a.notify(Note{Title: "Security Network Statement", Body: "Read it in " + path + " or run: cloudprotect statement", Icon: icons.Limited})
	}
}

// writeStatement writes the statement where the desktop's handler can open
// it, and returns the file's path.
func (a *App) writeStatement(st api.Statement) (string, error) {
	dir := a.cfg.CacheDir
	if dir == "" {
		dir = os.TempDir()
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("write statement: %w", err)
	}
	path := filepath.Join(dir, fmt.Sprintf("security-network-statement-v%d.txt", st.Version))
	text := fmt.Sprintf("%s\n\nVersion %d\n\n%s\n", st.Title, st.Version, st.Text)
	if err := writeAtomic(path, []byte(text)); err != nil {
		return "", fmt.Errorf("write statement: %w", err)
	}
	return path, nil
}

func (a *App) sendNow(ctx context.Context) {
	r, err := a.cfg.Agent.Upload(ctx)
	if err != nil {
		a.log.Error("send statistics", "err", err)
		a.notify(Note{Title: "Statistics were not sent", Body: errText(err), Icon: icons.Limited})
		return
	}
	body := r.Message
	if body == "" {
		body = fmt.Sprintf("%d sent, %d pending.", r.Sent, r.Pending)
	}
	a.notify(Note{Title: "Statistics sent", Body: body, Icon: icons.Participating})
}

// errText is an agent error as a person reads it: the message and, when the
// agent gave one, the hint.
func errText(err error) string {
	var ae *localapi.APIError
	if errors.As(err, &ae) {
		if ae.Hint != "" {
			return ae.Message + ". " + ae.Hint
		}
		return ae.Message
	}
	if errors.Is(err, localapi.ErrUnreachable) {
		return "The cloud protection agent is not running."
	}
	return err.Error()
}

func xdgOpen(ctx context.Context, path string) error {
	cmd := exec.CommandContext(ctx, "xdg-open", path)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("xdg-open %s: %w: %s", path, err, out)
	}
	return nil
}
