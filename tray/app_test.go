package tray

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/icons"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// fakeAgent serves event streams the test pushes: each call to Events takes
// the next stream; a nil stream means the agent is unreachable.
type fakeAgent struct {
	streams chan chan api.Event

	mu     sync.Mutex // protects the fields below
	set    []api.ParticipationRequest
	st     api.Statement
	alerts []api.Alert
}

func newFakeAgent() *fakeAgent {
	return &fakeAgent{
		streams: make(chan chan api.Event, 16),
		st:      api.Statement{Version: 3, Title: "Security Network Statement", Summary: "We collect hashes.", Text: "Full text."},
	}
}

func (f *fakeAgent) Status(context.Context) (api.Status, error) {
	return api.Status{}, localapi.ErrUnreachable
}
func (f *fakeAgent) StatementIn(context.Context, string) (api.Statement, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.st, nil
}
func (f *fakeAgent) Alerts(context.Context) (api.AlertList, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return api.AlertList{Alerts: append([]api.Alert(nil), f.alerts...)}, nil
}
func (f *fakeAgent) SetParticipation(_ context.Context, r api.ParticipationRequest) (api.Status, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.set = append(f.set, r)
	return api.Status{}, nil
}
func (f *fakeAgent) Upload(context.Context) (api.UploadResult, error) {
	return api.UploadResult{Sent: 2, Message: "2 records sent"}, nil
}
func (f *fakeAgent) Events(ctx context.Context, fn func(api.Event) error) error {
	var s chan api.Event
	select {
	case s = <-f.streams:
	case <-ctx.Done():
		return ctx.Err()
	}
	if s == nil {
		return fmt.Errorf("%w: connection refused", localapi.ErrUnreachable)
	}
	for {
		select {
		case ev, ok := <-s:
			if !ok {
				return fmt.Errorf("%w: event stream closed", localapi.ErrUnreachable)
			}
			if err := fn(ev); err != nil {
				return err
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
func (f *fakeAgent) requests() []api.ParticipationRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]api.ParticipationRequest(nil), f.set...)
}

type fakeUI struct {
	clicks chan ItemID
	menus  chan Menu
}

func (u *fakeUI) Apply(m Menu)          { u.menus <- m }
func (u *fakeUI) Clicks() <-chan ItemID { return u.clicks }

type fakeNotifier struct{ notes chan Note }

func (n *fakeNotifier) Notify(note Note) error { n.notes <- note; return nil }

type fakeConfirmer struct {
	questions chan Question
	answers   chan error // nil means yes; errNo means no
}

var errNo = errors.New("no")

func (c *fakeConfirmer) Confirm(ctx context.Context, q Question) (bool, error) {
	c.questions <- q
	select {
	case err := <-c.answers:
		if err == errNo {
			return false, nil
		}
		return err == nil, err
	case <-ctx.Done():
		return false, ctx.Err()
	}
}

// fakeClock fires After at once, recording the waits asked for.
type fakeClock struct {
	waits chan time.Duration
}

func (c *fakeClock) Now() time.Time { return testNow }
func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.waits <- d
	ch := make(chan time.Time, 1)
	ch <- testNow
	return ch
}

type harness struct {
	t      *testing.T
	agent  *fakeAgent
	ui     *fakeUI
	notes  chan Note
	conf   *fakeConfirmer
	clock  *fakeClock
	opened chan string
	app    *App
	cancel context.CancelFunc
	done   chan error
	dir    string
	once   sync.Once
}

func start(t *testing.T, stateDir string, opts ...func(*Config)) *harness {
	t.Helper()
	dir := t.TempDir()
	if stateDir == "" {
		stateDir = filepath.Join(dir, "state")
	}
	h := &harness{
		t:      t,
		agent:  newFakeAgent(),
		ui:     &fakeUI{clicks: make(chan ItemID), menus: make(chan Menu, 64)},
		notes:  make(chan Note, 16),
		conf:   &fakeConfirmer{questions: make(chan Question, 4), answers: make(chan error, 4)},
		clock:  &fakeClock{waits: make(chan time.Duration, 64)},
		opened: make(chan string, 4),
		done:   make(chan error, 1),
		dir:    dir,
	}
	cfg := Config{
		Agent:     h.agent,
		UI:        h.ui,
		Notifier:  &fakeNotifier{notes: h.notes},
		Confirmer: h.conf,
		Open: func(_ context.Context, path string) error {
			h.opened <- path
			return nil
		},
		Autostart: Autostart{ConfigHome: filepath.Join(dir, "config"), ConfigDirs: []string{filepath.Join(dir, "xdg")}, Exec: "cloudprotect-tray"},
		StateDir:  stateDir,
		CacheDir:  filepath.Join(dir, "cache"),
		Clock:     h.clock,
	}
	for _, o := range opts {
		o(&cfg)
	}
	h.app = NewApp(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	go func() { h.done <- h.app.Run(ctx) }()
	t.Cleanup(h.stop)
	return h
}

func (h *harness) stop() {
	h.once.Do(func() {
		h.cancel()
		select {
		case <-h.done:
		case <-time.After(10 * time.Second):
			h.t.Fatal("App.Run did not return")
		}
	})
}

// waitMenu waits for a menu satisfying ok.
func (h *harness) waitMenu(what string, ok func(Menu) bool) Menu {
	h.t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case m := <-h.ui.menus:
			if ok(m) {
				return m
			}
		case <-deadline:
			h.t.Fatalf("no menu with %s", what)
		}
	}
}

func (h *harness) waitNote(title string) Note {
	h.t.Helper()
	select {
	case n := <-h.notes:
		if !strings.Contains(n.Title, title) {
			h.t.Fatalf("notification %q, want one titled %q", n.Title, title)
		}
		return n
	case <-time.After(10 * time.Second):
		h.t.Fatalf("no notification titled %q", title)
	}
	return Note{}
}

func (h *harness) noNote() {
	h.t.Helper()
	select {
	case n := <-h.notes:
		h.t.Fatalf("unexpected notification %+v", n)
	case <-time.After(50 * time.Millisecond):
	}
}

func (h *harness) click(id ItemID) {
	h.t.Helper()
	select {
	case h.ui.clicks <- id:
	case <-time.After(10 * time.Second):
		h.t.Fatal("the loop did not take the click")
	}
}

// connect opens a stream and sends the first status on it.
func (h *harness) connect(s *api.Status) chan api.Event {
	stream := make(chan api.Event, 8)
	stream <- api.Event{Type: api.EventStatus, Status: s}
	h.agent.streams <- stream
	return stream
}

func iconIs(s icons.State) func(Menu) bool { return func(m Menu) bool { return m.Icon == s } }

func TestAppUnreachableThenBack(t *testing.T) {
	t.Parallel()
	h := start(t, "")
	h.waitMenu("unreachable icon", iconIs(icons.Unreachable))
	for range 3 {
		h.agent.streams <- nil
	}
	h.noNote() // three failures: within the grace for an agent never reached
	h.agent.streams <- nil
	h.waitNote("agent is not running")
	h.agent.streams <- nil
	h.agent.streams <- nil
	h.noNote() // only once
	stream := h.connect(status("declined"))
	h.waitMenu("declined icon", iconIs(icons.Declined))
	h.waitNote("agent is back")

	// The backoff doubled up to the connection.
	var waits []time.Duration
	for range 6 {
		waits = append(waits, <-h.clock.waits)
	}
	want := []time.Duration{250 * time.Millisecond, 500 * time.Millisecond, time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second}
	if fmt.Sprint(waits) != fmt.Sprint(want) {
		t.Errorf("waits %v, want %v", waits, want)
	}

	// A reached agent going away is reported at once, and reconnection
	// starts again from the shortest wait.
	close(stream)
	h.waitMenu("unreachable icon", iconIs(icons.Unreachable))
	h.waitNote("agent is not running")
	if w := <-h.clock.waits; w != 250*time.Millisecond {
		t.Errorf("first wait after a loss %v, want 250ms", w)
	}
	h.connect(status("participating"))
	h.waitMenu("participating icon", iconIs(icons.Participating))
	h.waitNote("agent is back")
}

func TestAppLiveChanges(t *testing.T) {
	t.Parallel()
	h := start(t, "")
	stream := h.connect(status("declined"))
	h.waitMenu("declined icon", iconIs(icons.Declined))
	stream <- api.Event{Type: api.EventStatus, Status: status("participating", pending(5))}
	m := h.waitMenu("participating icon", iconIs(icons.Participating))
	if !m.Participate.Checked || !m.SendNow.Enabled {
		t.Errorf("menu after joining: %+v", m)
	}
	stream <- api.Event{Type: api.EventStatus, Status: status("participating", locked)}
	m = h.waitMenu("locked", func(m Menu) bool {
		return m.Status.Label == "Cloud protection is on (managed by your organisation)"
	})
	if m.Participate.Enabled {
		t.Error("participation can be changed while the policy locks it")
	}
}

func TestAppInvitesOnce(t *testing.T) {
	t.Parallel()
	stateDir := filepath.Join(t.TempDir(), "state")
	h := start(t, stateDir)
	stream := h.connect(status("undecided"))
	h.waitMenu("undecided icon", iconIs(icons.Undecided))
	h.waitNote("Help improve cloud protection")
	// The same state again, and a reconnection, do not nag.
	stream <- api.Event{Type: api.EventStatus, Status: status("undecided", pending(0))}
	close(stream)
	h.connect(status("undecided"))
	h.waitNote("agent is not running")
	h.waitNote("agent is back")
	h.noNote()
	h.stop()
	if _, err := os.Stat(filepath.Join(stateDir, inviteFile)); err != nil {
		t.Fatalf("invitation not remembered: %v", err)
	}

	// A new tray on the same account does not invite again.
	h2 := start(t, stateDir)
	h2.connect(status("undecided"))
	h2.waitMenu("undecided icon", iconIs(icons.Undecided))
	h2.noNote()
}

func TestAppParticipate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		state    string
		answer   error
		wantSet  []api.ParticipationRequest
		wantNote string
	}{
		{"join yes", "declined", nil, []api.ParticipationRequest{{Participate: true, StatementVersion: 3, Via: "tray"}}, "You participate"},
		{"join no", "declined", errNo, nil, ""},
		{"leave yes", "participating", nil, []api.ParticipationRequest{{Participate: false, StatementVersion: 3, Via: "tray"}}, "You no longer participate"},
		{"leave no", "participating", errNo, nil, ""},
		{"join, question failed", "declined", errors.New("bus gone"), nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			h := start(t, "")
			h.connect(status(tt.state))
			h.waitMenu("state", func(m Menu) bool { return m.Participate.Enabled })
			h.click(ItemParticipate)
			q := <-h.conf.questions
			if tt.state == "declined" && !strings.Contains(q.Body, "We collect hashes.") {
				t.Errorf("question %q does not show the statement summary", q.Body)
			}
			h.waitMenu("asking", func(m Menu) bool { return !m.Participate.Enabled })
			h.click(ItemParticipate) // ignored while asking
			h.conf.answers <- tt.answer
			h.waitMenu("answered", func(m Menu) bool { return m.Participate.Enabled })
			if tt.wantNote != "" {
				h.waitNote(tt.wantNote)
			} else {
				h.noNote()
			}
			if got := h.agent.requests(); fmt.Sprint(got) != fmt.Sprint(tt.wantSet) {
				t.Errorf("agent asked %+v, want %+v", got, tt.wantSet)
			}
			select {
			case q := <-h.conf.questions:
				t.Errorf("second question while the first was shown: %q", q.Title)
			default:
			}
		})
	}
}

type noConfirmer struct{}

func (noConfirmer) Confirm(context.Context, Question) (bool, error) { return false, ErrCannotAsk }

func TestAppNotAllowed(t *testing.T) {
	t.Parallel()
	h := start(t, "")
	h.connect(status("undecided", readOnly))
	h.waitMenu("state", iconIs(icons.Declined))
	h.click(ItemParticipate) // disabled in the menu; a stray click does nothing
	h.noNote()
	select {
	case q := <-h.conf.questions:
		t.Errorf("asked %q though the person may not change participation", q.Title)
	default:
	}
}

func TestAppFallbackOpensStatement(t *testing.T) {
	t.Parallel()
	h := start(t, "", func(c *Config) { c.Confirmer = noConfirmer{} })
	h.connect(status("declined"))
	h.waitMenu("state", iconIs(icons.Declined))
	h.click(ItemParticipate)
	path := <-h.opened
	b, err := os.ReadFile(path)
	if err != nil || !strings.Contains(string(b), "Full text.") {
		t.Fatalf("statement file %s: %v %q", path, err, b)
	}
	n := h.waitNote("Read the Security Network Statement")
	if !strings.Contains(n.Body, "cloudprotect participate") {
		t.Errorf("fallback note %q does not name the command", n.Body)
	}
	if len(h.agent.requests()) != 0 {
		t.Error("participation changed without a Yes")
	}
}

func TestAppMenuItems(t *testing.T) {
	t.Parallel()
	h := start(t, "")
	h.connect(status("participating", pending(2)))
	h.waitMenu("participating", iconIs(icons.Participating))

	h.click(ItemStatement)
	p := <-h.opened
	if !strings.HasSuffix(p, "security-network-statement-v3.en.html") {
		t.Errorf("opened %s", p)
	}
	if b, err := os.ReadFile(p); err != nil || !strings.Contains(string(b), "<p>Full text.</p>") || !strings.Contains(string(b), "<title>Security Network Statement</title>") {
		t.Errorf("statement page %s: %v\n%s", p, err, b)
	}
	h.click(ItemSendNow)
	h.waitNote("Statistics sent")

	h.click(ItemAutostart)
	h.waitMenu("autostart on", func(m Menu) bool { return m.Autostart.Checked })
	if _, err := os.Stat(h.app.cfg.Autostart.UserFile()); err != nil {
		t.Fatalf("autostart file: %v", err)
	}
	h.click(ItemAutostart)
	h.waitMenu("autostart off", func(m Menu) bool { return !m.Autostart.Checked })
	if _, err := os.Stat(h.app.cfg.Autostart.UserFile()); err == nil {
		t.Fatal("autostart file left behind")
	}

	h.click(ItemQuit)
	select {
	case err := <-h.done:
		if err != nil {
			t.Errorf("Run after Quit = %v", err)
		}
		h.once.Do(func() {})
	case <-time.After(10 * time.Second):
		t.Fatal("Quit did not end Run")
	}
}

// Alerts stay: critical notifications with the program in the body only,
// the threat icon and the menu's detections until the person has seen
// them, and nothing told twice, even after a restart.
func TestAppAlerts(t *testing.T) {
	t.Parallel()
	stateDir := filepath.Join(t.TempDir(), "state")
	h := start(t, stateDir)
	old := api.Alert{ID: 1, Time: testNow.Add(-time.Hour), SHA256: strings.Repeat("a", 64), Program: "old-miner",
		Path: "~/Downloads/old-miner", Verdict: "malicious", Action: api.AlertActionAlerted}
	h.agent.mu.Lock()
	h.agent.alerts = []api.Alert{old}
	h.agent.mu.Unlock()
	stream := h.connect(status("participating"))

	// An alert from before the tray started is fetched and told.
	n := h.waitNote("Dangerous program detected")
	if !n.Critical || n.Dismissed == nil || !strings.Contains(n.Body, "old-miner") || strings.Contains(n.Title, "miner") {
		t.Errorf("alert note %+v", n)
	}
	m := h.waitMenu("threat icon", iconIs(icons.Threat))
	if !m.AlertsHeader.Visible || !strings.Contains(m.Alerts[0].Label, "old-miner") || !m.MarkSeen.Visible {
		t.Errorf("menu %+v", m)
	}

	// A block arrives on the stream; a hostile name stays in the body,
	// made safe.
	hostile := "Call\u202e 555-0100 now\nIT support"
	blk := api.Alert{ID: 2, Time: testNow, SHA256: strings.Repeat("b", 64), Program: hostile,
		Path: "~/Downloads/" + hostile, Verdict: "malicious", Action: api.AlertActionBlocked}
	stream <- api.Event{Type: api.EventAlert, Alert: &blk}
	n = h.waitNote("Dangerous program blocked")
	if strings.Contains(n.Title, "555") || strings.ContainsRune(n.Body, '\u202e') || !strings.Contains(n.Body, "Call? 555-0100 now?IT support") {
		t.Errorf("block note %+v", n)
	}
	m = h.waitMenu("two detections", func(m Menu) bool { return m.Alerts[1].Visible })
	if !strings.Contains(m.Alerts[0].Label, "Blocked") || !strings.Contains(m.AlertsHeader.Label, "2 new") {
		t.Errorf("menu %q / %q", m.AlertsHeader.Label, m.Alerts[0].Label)
	}

	// Dismissing the block's notification counts as seen; the older one
	// keeps the threat icon until seen from the menu.
	n.Dismissed()
	m = h.waitMenu("one new", func(m Menu) bool { return strings.Contains(m.AlertsHeader.Label, "1 new") })
	if m.Icon != icons.Threat {
		t.Errorf("icon %s with an unseen detection", m.Icon)
	}
	h.click(ItemAlert + 1)
	h.waitNote("Dangerous program detected") // its details again
	m = h.waitMenu("all seen", iconIs(icons.Participating))
	if m.MarkSeen.Visible || !m.Alerts[0].Visible {
		t.Errorf("menu after seeing all: %+v", m)
	}
	h.noNote()
	h.stop()

	// A new tray remembers: nothing told again, nothing new.
	h2 := start(t, stateDir)
	h2.agent.mu.Lock()
	h2.agent.alerts = []api.Alert{blk, old}
	h2.agent.mu.Unlock()
	h2.connect(status("participating"))
	m = h2.waitMenu("detections listed", func(m Menu) bool { return m.Alerts[1].Visible })
	if m.Icon != icons.Participating {
		t.Errorf("icon %s after a restart with everything seen", m.Icon)
	}
	h2.noNote()
}

// A question whose answer no longer applies is withdrawn: the command
// line changed participation while the tray was asking.
func TestAppWithdrawsStaleQuestion(t *testing.T) {
	t.Parallel()
	h := start(t, "")
	stream := h.connect(status("declined"))
	h.waitMenu("state", func(m Menu) bool { return m.Participate.Enabled })
	h.click(ItemParticipate)
	<-h.conf.questions
	stream <- api.Event{Type: api.EventStatus, Status: status("participating")}
	h.waitMenu("answerable again", func(m Menu) bool { return m.Participate.Enabled && m.Participate.Checked })
	if len(h.agent.requests()) != 0 {
		t.Error("participation changed by a withdrawn question")
	}
}
