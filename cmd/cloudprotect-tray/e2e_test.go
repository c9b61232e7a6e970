package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"image/color"
	"image/png"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/agent/testenv"
	"github.com/cloudprotect/cloudprotect/icons"
	"github.com/cloudprotect/cloudprotect/tray"
	dt "github.com/cloudprotect/cloudprotect/tray/desktoptest"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// binaries builds the tray, the agent and the CLI once per test binary.
func binaries(tb testing.TB) string {
	tb.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "cloudprotect-tray-e2e-")
		if buildErr != nil {
			return
		}
		for _, c := range []string{"cloudprotect-tray", "cloudprotectd", "cloudprotect", "cloudprotect-server"} {
			cmd := exec.Command("go", "build", "-o", filepath.Join(binDir, c), "github.com/cloudprotect/cloudprotect/cmd/"+c)
			if out, err := cmd.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("build %s: %v\n%s", c, err, out)
				return
			}
		}
	})
	if buildErr != nil {
		tb.Fatal(buildErr)
	}
	return binDir
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// session is a desktop session with a real agent in user mode.
type session struct {
	tb     testing.TB
	bin    string
	dir    string
	bus    *dt.Bus
	socket string
	agent  *localapi.Client
	// agentStop stops the running agent and waits for it.
	agentStop func()
	// env is added to the tray's environment.
	env []string
	// cloud is the Security Network's address; "" means none answers.
	cloud string
	// agentArgs are added to the agent's command line.
	agentArgs []string
}

func (s *session) server() string {
	if s.cloud == "" {
		return "http://127.0.0.1:1"
	}
	return "http://" + s.cloud
}

func newSession(tb testing.TB) *session {
	tb.Helper()
	s := &session{tb: tb, bin: binaries(tb), dir: tb.TempDir()}
	s.bus = dt.StartBus(tb)
	s.socket = filepath.Join(s.dir, "run", "agent.sock")
	return s
}

func (s *session) startAgent() {
	s.tb.Helper()
	cmd := exec.Command(filepath.Join(s.bin, "cloudprotectd"), "--user",
		"--state-dir", filepath.Join(s.dir, "agent-state"),
		"--socket", s.socket,
		"--policy", filepath.Join(s.dir, "no-policy.json"),
		"--server", s.server())
	cmd.Args = append(cmd.Args, s.agentArgs...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + filepath.Join(s.dir, "home"), "XDG_RUNTIME_DIR=" + filepath.Join(s.dir, "run")}
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		s.tb.Fatalf("start agent: %v", err)
	}
	var once sync.Once
	s.agentStop = func() {
		once.Do(func() {
			cmd.Process.Signal(syscall.SIGTERM)
			cmd.Wait()
		})
	}
	s.tb.Cleanup(func() {
		s.agentStop()
		if s.tb.Failed() {
			s.tb.Logf("agent log:\n%s", logs.String())
		}
	})
	s.agent = localapi.NewClient(s.socket)
	s.tb.Cleanup(s.agent.Close)
	waitFor(s.tb, "the agent to answer", func() error {
		_, err := s.agent.Status(context.Background())
		return err
	})
}

// tray starts the tray binary with only the session's environment.
type trayProc struct {
	cmd  *exec.Cmd
	logs *lockedBuffer
	done chan error
}

func (s *session) startTray() *trayProc {
	s.tb.Helper()
	cmd := exec.Command(filepath.Join(s.bin, "cloudprotect-tray"), "--socket", s.socket, "--debug")
	cmd.Env = s.trayEnv()
	p := &trayProc{cmd: cmd, logs: &lockedBuffer{}, done: make(chan error, 1)}
	cmd.Stdout, cmd.Stderr = p.logs, p.logs
	if err := cmd.Start(); err != nil {
		s.tb.Fatalf("start tray: %v", err)
	}
	go func() { p.done <- cmd.Wait() }()
	s.tb.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-p.done
		}
		if s.tb.Failed() {
			s.tb.Logf("tray log:\n%s", p.logs.String())
		}
	})
	return p
}

func (s *session) trayEnv() []string {
	return append([]string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + filepath.Join(s.dir, "home"),
		"DBUS_SESSION_BUS_ADDRESS=" + s.bus.Addr,
		"XDG_CONFIG_HOME=" + s.configHome(),
		"XDG_CONFIG_DIRS=" + filepath.Join(s.dir, "xdg"),
		"XDG_STATE_HOME=" + filepath.Join(s.dir, "state"),
		"XDG_CACHE_HOME=" + filepath.Join(s.dir, "cache"),
	}, s.env...)
}

func (s *session) configHome() string { return filepath.Join(s.dir, "config") }

type lockedBuffer struct {
	mu sync.Mutex // protects b
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func waitFor(tb testing.TB, what string, f func() error) {
	tb.Helper()
	deadline := time.Now().Add(15 * time.Second)
	var err error
	for time.Now().Before(deadline) {
		if err = f(); err == nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	tb.Fatalf("timed out waiting for %s: %v", what, err)
}

func waitRegistered(tb testing.TB, w *dt.Watcher) dt.Registration {
	tb.Helper()
	select {
	case r := <-w.Registered:
		return r
	case <-time.After(15 * time.Second):
		tb.Fatal("the tray did not register with the panel")
	}
	return dt.Registration{}
}

// pixels returns a PNG as non-premultiplied ARGB32, the way a
// StatusNotifierItem pixmap carries it, and how many of its pixels are
// semi-transparent.
func pixels(tb testing.TB, b []byte) (dt.Pixmap, int) {
	img, err := png.Decode(bytes.NewReader(b))
	if err != nil {
		tb.Fatal(err)
	}
	r := img.Bounds()
	px := dt.Pixmap{W: int32(r.Dx()), H: int32(r.Dy())}
	semi := 0
	for y := r.Min.Y; y < r.Max.Y; y++ {
		for x := r.Min.X; x < r.Max.X; x++ {
			c := color.NRGBAModel.Convert(img.At(x, y)).(color.NRGBA)
			if c.A != 0 && c.A != 0xff {
				semi++
			}
			px.Pix = append(px.Pix, c.A, c.R, c.G, c.B)
		}
	}
	return px, semi
}

// samePixmap reports whether two pixmaps match within one step per
// channel; colour does not matter where a pixel is fully transparent.
func samePixmap(a, b dt.Pixmap) bool {
	if a.W != b.W || a.H != b.H || len(a.Pix) != len(b.Pix) {
		return false
	}
	for i := 0; i < len(a.Pix); i += 4 {
		if a.Pix[i] == 0 && b.Pix[i] == 0 {
			continue
		}
		for j := i; j < i+4; j++ {
			if d := int(a.Pix[j]) - int(b.Pix[j]); d < -1 || d > 1 {
				return false
			}
		}
	}
	return true
}

// iconState says which committed icon the panel received, comparing the
// IconPixmap read over D-Bus with the PNG, ±1 per channel.
func iconState(tb testing.TB, it *dt.Item) (icons.State, error) {
	got, err := it.Icon()
	if err != nil {
		return "", err
	}
	for _, st := range icons.States {
		want, _ := pixels(tb, icons.PNG(st, tray.PanelIconSize))
		if samePixmap(got, want) {
			return st, nil
		}
	}
	return "", fmt.Errorf("icon %d×%d is none of the state icons as drawn", got.W, got.H)
}

func waitIcon(tb testing.TB, it *dt.Item, want ...icons.State) {
	tb.Helper()
	waitFor(tb, fmt.Sprintf("icon %v", want), func() error {
		st, err := iconState(tb, it)
		if err != nil {
			return err
		}
		for _, w := range want {
			if st == w {
				return nil
			}
		}
		return fmt.Errorf("icon is %s", st)
	})
}

func entry(tb testing.TB, it *dt.Item, prefix string) dt.MenuEntry {
	tb.Helper()
	m, err := it.Menu()
	if err != nil {
		tb.Fatal(err)
	}
	e, ok := dt.Find(m, prefix)
	if !ok {
		tb.Fatalf("no menu item %q in %+v", prefix, m)
	}
	return e
}

func waitEntry(tb testing.TB, it *dt.Item, prefix string, ok func(dt.MenuEntry) bool) dt.MenuEntry {
	tb.Helper()
	var e dt.MenuEntry
	waitFor(tb, "menu item "+prefix, func() error {
		m, err := it.Menu()
		if err != nil {
			return err
		}
		var found bool
		e, found = dt.Find(m, prefix)
		if !found || !ok(e) {
			return fmt.Errorf("item %q is %+v", prefix, e)
		}
		return nil
	})
	return e
}

func participation(tb testing.TB, s *session) string {
	tb.Helper()
	st, err := s.agent.Status(context.Background())
	if err != nil {
		tb.Fatal(err)
	}
	return string(st.Participation.State)
}

// TestDesktopSession runs the real tray against a real agent in user mode
// on a private session bus, playing the panel and the notification server.
func TestDesktopSession(t *testing.T) {
	s := newSession(t)
	notes := dt.StartNotifications(t, s.bus, true)
	s.startAgent()
	if got := participation(t, s); got != "undecided" {
		t.Fatalf("a new agent is %s, want undecided", got)
	}

	// The tray starts before any panel: it keeps running and registers
	// when one appears.
	p := s.startTray()
	time.Sleep(300 * time.Millisecond)
	select {
	case err := <-p.done:
		t.Fatalf("the tray exited without a panel: %v", err)
	default:
	}
	watcher := dt.StartWatcher(t, s.bus)
	reg := waitRegistered(t, watcher)
	panel := s.bus.Conn(t)
	it := dt.NewItem(panel, reg)

	// Undecided: icon, title and tooltip, and the menu.
	waitIcon(t, it, icons.Undecided)
	if title, err := it.Title(); err != nil || title != tray.Title {
		t.Errorf("title %q (%v), want %q", title, err, tray.Title)
	}
	tip, err := it.Tooltip()
	if err != nil || tip != "Cloud protection: off · waiting for your answer" {
		t.Errorf("tooltip %q (%v)", tip, err)
	}
	menu, err := it.Menu()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Cloud protection is off: waiting for your answer", string(tray.LabelJoin), string(tray.LabelStatement),
		"Statistics: 0 pending · never sent", string(tray.LabelSendNow), string(tray.LabelAutostart), string(tray.LabelQuit)} {
		if _, ok := dt.Find(menu, want); !ok {
			t.Errorf("menu lacks %q: %+v", want, menu)
		}
	}
	join := entry(t, it, string(tray.LabelJoin))
	if !join.Enabled || join.ToggleType != "checkmark" || join.ToggleState != 0 {
		t.Errorf("participate item %+v, want enabled and unchecked", join)
	}

	// First start while undecided: one invitation.
	notes.Wait(t, "Help improve cloud protection", 10*time.Second)

	// Participate, then No: nothing changes.
	if err := it.Click(join.ID); err != nil {
		t.Fatal(err)
	}
	q := notes.Wait(t, "Participate in Security Network?", 10*time.Second)
	if !q.HasAction("yes") || !q.HasAction("no") {
		t.Fatalf("question without Yes/No actions: %+v", q)
	}
	if q.Sender == reg.Service {
		t.Error("the question was sent on systray's shared connection; it must use a private one")
	}
	if err := notes.Invoke(q, "no"); err != nil {
		t.Fatal(err)
	}
	waitEntry(t, it, string(tray.LabelJoin), func(e dt.MenuEntry) bool { return e.Enabled })
	time.Sleep(200 * time.Millisecond)
	if got := participation(t, s); got != "undecided" {
		t.Fatalf("after No the agent is %s, want undecided", got)
	}

	// Participate, then Yes: the agent participates and a notification
	// confirms it.
	if err := it.Click(join.ID); err != nil {
		t.Fatal(err)
	}
	q = notes.Wait(t, "Participate in Security Network?", 10*time.Second)
	if err := notes.Invoke(q, "yes"); err != nil {
		t.Fatal(err)
	}
	notes.Wait(t, "You participate in Security Network", 10*time.Second)
	if got := participation(t, s); got != "participating" {
		t.Fatalf("after Yes the agent is %s, want participating", got)
	}
	st, _ := s.agent.Status(context.Background())
	if st.Participation.Via != "tray" || st.Participation.AcceptedVersion != st.Participation.StatementVersion {
		t.Errorf("consent record %+v, want via tray with the statement version shown", st.Participation)
	}
	waitEntry(t, it, string(tray.LabelJoined), func(e dt.MenuEntry) bool { return e.ToggleState == 1 })
	waitIcon(t, it, icons.Participating, icons.Limited)

	// The CLI leaves: the menu and icon follow.
	cli := exec.Command(filepath.Join(s.bin, "cloudprotect"), "--socket", s.socket, "leave", "--yes")
	cli.Env = s.trayEnv()
	if out, err := cli.CombinedOutput(); err != nil {
		t.Fatalf("cloudprotect leave --yes: %v\n%s", err, out)
	}
	waitEntry(t, it, string(tray.LabelJoin), func(e dt.MenuEntry) bool { return e.ToggleState == 0 })
	waitIcon(t, it, icons.Declined)

	// The panel restarts after notifications expired (the server sent
	// NotificationClosed to the tray's shared connection): the item
	// registers again.
	watcher.Stop()
	time.Sleep(100 * time.Millisecond)
	watcher = dt.StartWatcher(t, s.bus)
	reg2 := waitRegistered(t, watcher)
	if reg2.Service != reg.Service || reg2.Path != reg.Path {
		t.Errorf("re-registered as %+v, was %+v", reg2, reg)
	}

	// Start at login toggles the autostart entry.
	file := filepath.Join(s.configHome(), "autostart", tray.AutostartName)
	auto := entry(t, it, string(tray.LabelAutostart))
	if auto.ToggleState != 0 {
		t.Fatalf("start at login checked without an entry: %+v", auto)
	}
	if err := it.Click(auto.ID); err != nil {
		t.Fatal(err)
	}
	waitEntry(t, it, string(tray.LabelAutostart), func(e dt.MenuEntry) bool { return e.ToggleState == 1 })
	b, err := os.ReadFile(file)
	if err != nil || !strings.Contains(string(b), "Exec=") || !strings.Contains(string(b), " --socket "+s.socket+"\n") {
		t.Fatalf("autostart entry %s: %v\n%s", file, err, b)
	}
	if err := it.Click(auto.ID); err != nil {
		t.Fatal(err)
	}
	waitEntry(t, it, string(tray.LabelAutostart), func(e dt.MenuEntry) bool { return e.ToggleState == 0 })
	if _, err := os.Stat(file); err == nil {
		t.Fatal("autostart entry left behind after unchecking")
	}

	// Quit ends the tray cleanly.
	if err := it.Click(entry(t, it, string(tray.LabelQuit)).ID); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-p.done:
		if err != nil {
			t.Errorf("tray exit after Quit: %v", err)
		}
		p.done <- nil
	case <-time.After(10 * time.Second):
		t.Fatal("the tray did not quit")
	}
	if strings.Contains(p.logs.String(), "panic") {
		t.Errorf("tray log mentions a panic:\n%s", p.logs.String())
	}
}

// TestAgentLostAndBack checks the unreachable icon, the notifications on
// loss and return, and that an agent starting later is found.
func TestAgentLostAndBack(t *testing.T) {
	s := newSession(t)
	notes := dt.StartNotifications(t, s.bus, true)
	watcher := dt.StartWatcher(t, s.bus)
	s.startAgent()
	s.startTray()
	it := dt.NewItem(s.bus.Conn(t), waitRegistered(t, watcher))
	waitIcon(t, it, icons.Undecided)
	notes.Wait(t, "Help improve cloud protection", 10*time.Second)

	// Stop the agent: its socket goes away.
	stopAgent(t, s)
	waitIcon(t, it, icons.Unreachable)
	notes.Wait(t, "agent is not running", 10*time.Second)
	if tip, _ := it.Tooltip(); tip != "Cloud protection: agent not running" {
		t.Errorf("tooltip %q", tip)
	}
	if e := entry(t, it, string(tray.LabelJoin)); e.Enabled {
		t.Error("participate enabled while the agent is unreachable")
	}
	s.startAgent()
	waitIcon(t, it, icons.Undecided)
	notes.Wait(t, "agent is back", 10*time.Second)
}

func stopAgent(t *testing.T, s *session) {
	t.Helper()
	s.agentStop()
	if _, err := s.agent.Status(context.Background()); err == nil {
		t.Fatal("the agent still answers after it stopped")
	}
}

// TestNoSessionBus: a clear error and a hint, a non-zero exit, no panic.
func TestNoSessionBus(t *testing.T) {
	bin := binaries(t)
	cmd := exec.Command(filepath.Join(bin, "cloudprotect-tray"), "--socket", filepath.Join(t.TempDir(), "none.sock"))
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir()}
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("the tray ran without a session bus:\n%s", out)
	}
	got := string(out)
	if !strings.HasPrefix(got, "cloudprotect-tray: error: ") || !strings.Contains(got, "\ncloudprotect-tray: hint: ") || strings.Contains(got, "panic") {
		t.Errorf("output:\n%s", got)
	}
}

// The panel receives exactly the committed icons, semi-transparent edges
// included: IconPixmap read over D-Bus equals the PNG, ±1 per channel.
func TestIconPixmapAsDrawn(t *testing.T) {
	s := newSession(t)
	dt.StartNotifications(t, s.bus, true)
	watcher := dt.StartWatcher(t, s.bus)
	s.startAgent()
	s.startTray()
	it := dt.NewItem(s.bus.Conn(t), waitRegistered(t, watcher))
	waitIcon(t, it, icons.Undecided)
	got, err := it.Icon()
	if err != nil {
		t.Fatal(err)
	}
	want, semi := pixels(t, icons.PNG(icons.Undecided, tray.PanelIconSize))
	if semi == 0 {
		t.Fatal("the icon has no semi-transparent pixel: the comparison proves nothing")
	}
	if !samePixmap(got, want) {
		t.Fatalf("IconPixmap differs from the committed PNG")
	}
}

// One tray per session: a second start exits at once, saying so, and the
// panel shows one icon.
func TestOneTrayPerSession(t *testing.T) {
	s := newSession(t)
	dt.StartNotifications(t, s.bus, true)
	watcher := dt.StartWatcher(t, s.bus)
	s.startAgent()
	first := s.startTray()
	waitRegistered(t, watcher)

	cmd := exec.Command(filepath.Join(s.bin, "cloudprotect-tray"), "--socket", s.socket)
	cmd.Env = s.trayEnv()
	done := make(chan struct{})
	var out []byte
	var err error
	go func() { out, err = cmd.CombinedOutput(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("a second tray kept running:\n%s", out)
	}
	if err != nil || !strings.Contains(string(out), "already running in this session (process ") {
		t.Errorf("second tray: %v\n%s", err, out)
	}
	select {
	case r := <-watcher.Registered:
		t.Errorf("a second item registered: %+v", r)
	case <-time.After(300 * time.Millisecond):
	}
	select {
	case err := <-first.done:
		t.Fatalf("the first tray exited: %v", err)
	default:
	}
}

// A question closes as soon as it is answered, and is withdrawn when the
// command line changes participation while it is shown.
func TestQuestionClosedWhenAnswered(t *testing.T) {
	s := newSession(t)
	notes := dt.StartNotifications(t, s.bus, true)
	watcher := dt.StartWatcher(t, s.bus)
	s.startAgent()
	s.startTray()
	it := dt.NewItem(s.bus.Conn(t), waitRegistered(t, watcher))
	join := waitEntry(t, it, string(tray.LabelJoin), func(e dt.MenuEntry) bool { return e.Enabled })

	if err := it.Click(join.ID); err != nil {
		t.Fatal(err)
	}
	q := notes.Wait(t, "Participate in Security Network?", 10*time.Second)
	if n := strings.Count(q.Body, "You can stop at any time"); n != 1 {
		t.Errorf("the question says it can be stopped %d times:\n%s", n, q.Body)
	}
	if err := notes.Invoke(q, "no"); err != nil {
		t.Fatal(err)
	}
	waitClosed(t, notes, q.ID)

	waitEntry(t, it, string(tray.LabelJoin), func(e dt.MenuEntry) bool { return e.Enabled })
	if err := it.Click(join.ID); err != nil {
		t.Fatal(err)
	}
	q = notes.Wait(t, "Participate in Security Network?", 10*time.Second)
	cli := exec.Command(filepath.Join(s.bin, "cloudprotect"), "--socket", s.socket, "participate", "--yes")
	cli.Env = s.trayEnv()
	if out, err := cli.CombinedOutput(); err != nil {
		t.Fatalf("cloudprotect participate --yes: %v\n%s", err, out)
	}
	waitClosed(t, notes, q.ID)
	waitEntry(t, it, string(tray.LabelJoined), func(e dt.MenuEntry) bool { return e.Enabled && e.ToggleState == 1 })
}

func waitClosed(t *testing.T, notes *dt.Notifications, id uint32) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case got := <-notes.Closed:
			if got == id {
				return
			}
		case <-deadline:
			t.Fatalf("notification %d was not closed", id)
		}
	}
}

// Without a panel the tray says so once, in a notification, and shows its
// icon when a panel starts.
func TestNoPanelNotice(t *testing.T) {
	s := newSession(t)
	notes := dt.StartNotifications(t, s.bus, true)
	s.startAgent()
	p := s.startTray()
	n := notes.Wait(t, "icon cannot be shown", 20*time.Second)
	if !strings.Contains(n.Body, "cloudprotect status") {
		t.Errorf("no-panel notice %q does not name the command line", n.Body)
	}
	watcher := dt.StartWatcher(t, s.bus)
	waitRegistered(t, watcher)
	if strings.Contains(p.logs.String(), "failed to register") && strings.Contains(p.logs.String(), "level=ERROR") {
		t.Errorf("a missing panel is logged as an error:\n%s", p.logs.String())
	}
}

// The tray speaks the session's language.
func TestTrayInGerman(t *testing.T) {
	s := newSession(t)
	dt.StartNotifications(t, s.bus, true)
	watcher := dt.StartWatcher(t, s.bus)
	s.startAgent()
	s.env = append(s.env, "LANG=de_DE.UTF-8")
	s.startTray()
	it := dt.NewItem(s.bus.Conn(t), waitRegistered(t, watcher))
	waitEntry(t, it, "Am Security Network teilnehmen…", func(e dt.MenuEntry) bool { return e.Enabled })
	for _, want := range []string{"Cloud-Schutz ist aus: Ihre Antwort fehlt noch", "Erklärung zum Security Network lesen", "Beenden"} {
		entry(t, it, want)
	}
	if tip, err := it.Tooltip(); err != nil || tip != "Cloud-Schutz: aus · Ihre Antwort fehlt noch" {
		t.Errorf("tooltip %q (%v)", tip, err)
	}
}

// fakeAgent serves the local API on a unix socket with an alert the test
// chooses: the agent itself builds alerts only from the cloud's verdicts,
// and what matters here is what the tray does with any name a file can
// have.
type fakeAgent struct {
	socket string
	alerts chan api.Alert
}

func startFakeAgent(t *testing.T, dir string) *fakeAgent {
	t.Helper()
	f := &fakeAgent{socket: filepath.Join(dir, "fake-agent.sock"), alerts: make(chan api.Alert, 4)}
	ln, err := net.Listen("unix", f.socket)
	if err != nil {
		t.Fatal(err)
	}
	status := api.Status{
		Participation: api.Participation{State: api.StateParticipating, StatementVersion: 1, AcceptedVersion: 1, Collecting: true},
		Agent:         api.AgentInfo{Mode: "system", ExecSource: "fanotify", Version: "test"},
		CanChange:     true,
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/status", func(w http.ResponseWriter, r *http.Request) { json.NewEncoder(w).Encode(status) })
	mux.HandleFunc("/v1/alerts", func(w http.ResponseWriter, r *http.Request) { json.NewEncoder(w).Encode(api.AlertList{}) })
	mux.HandleFunc("/v1/events", func(w http.ResponseWriter, r *http.Request) {
		enc := json.NewEncoder(w)
		enc.Encode(api.Event{Type: api.EventStatus, Status: &status})
		w.(http.Flusher).Flush()
		for {
			select {
			case a := <-f.alerts:
				enc.Encode(api.Event{Type: api.EventAlert, Alert: &a})
				w.(http.Flusher).Flush()
			case <-r.Context().Done():
				return
			}
		}
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return f
}

// A hostile file name never reaches a notification's title; in the body
// it arrives escaped for markup, with its bidirectional override and line
// breaks neutralised. The alert stays (critical, no expiry), the icon
// shows the threat and the menu lists it until the person dismisses it.
func TestHostileAlert(t *testing.T) {
	s := newSession(t)
	notes := dt.StartNotifications(t, s.bus, true)
	watcher := dt.StartWatcher(t, s.bus)
	fake := startFakeAgent(t, s.dir)
	s.socket = fake.socket
	s.startTray()
	it := dt.NewItem(s.bus.Conn(t), waitRegistered(t, watcher))
	waitIcon(t, it, icons.Participating)

	name := "<b>Urgent</b> IT support & billing\u202Egpj.exe\nCall 555-0100 to restore access"
	fake.alerts <- api.Alert{ID: 7, Time: time.Now(), SHA256: strings.Repeat("c", 64), Program: name,
		Path: "~/Downloads/" + name, Verdict: "malicious", Source: "feed", Action: api.AlertActionBlocked}
	n := notes.Wait(t, "Dangerous program", 10*time.Second)
	if n.Summary != "Dangerous program blocked" {
		t.Errorf("title %q: the title must be fixed text", n.Summary)
	}
	for _, bad := range []string{"<b>", "</b>", "\u202E", "555-0100 to restore access\n", " & "} {
		if strings.Contains(n.Body, bad) {
			t.Errorf("body carries %q unescaped:\n%s", bad, n.Body)
		}
	}
	for _, want := range []string{"&lt;b&gt;Urgent&lt;/b&gt; IT support &amp; billing?gpj.exe?Call 555-0100", "~/Downloads/&lt;b&gt;"} {
		if !strings.Contains(n.Body, want) {
			t.Errorf("body lacks %q:\n%s", want, n.Body)
		}
	}
	if n.Urgency != 2 || n.Timeout != 0 {
		t.Errorf("alert urgency %d, timeout %d: want critical and no expiry", n.Urgency, n.Timeout)
	}
	waitIcon(t, it, icons.Threat)
	e := waitEntry(t, it, "● Blocked ", func(e dt.MenuEntry) bool { return e.Enabled && e.Visible })
	if strings.ContainsAny(e.Label, "\u202E\n") {
		t.Errorf("menu entry %q carries the name's controls", e.Label)
	}
	if tip, _ := it.Tooltip(); !strings.HasPrefix(tip, "1 new detection · ") {
		t.Errorf("tooltip %q", tip)
	}

	// Dismissed by the person: seen.
	if err := notes.Close(n, 2); err != nil {
		t.Fatal(err)
	}
	waitIcon(t, it, icons.Participating)
	waitEntry(t, it, "Blocked ", func(e dt.MenuEntry) bool { return e.Visible })
}

// Every program explains itself when asked, on stdout with exit 0, and
// says its version; a mistake goes to stderr with exit 2.
func TestHelpAndVersion(t *testing.T) {
	bin := binaries(t)
	run := func(prog string, args ...string) (stdout, stderr string, code int) {
		t.Helper()
		cmd := exec.Command(filepath.Join(bin, prog), args...)
		cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir()}
		var o, e bytes.Buffer
		cmd.Stdout, cmd.Stderr = &o, &e
		err := cmd.Run()
		code = 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return o.String(), e.String(), code
	}
	for _, prog := range []string{"cloudprotectd", "cloudprotect-tray", "cloudprotect"} {
		for _, args := range [][]string{{"--help"}, {"-h"}, {"help"}} {
			out, errOut, code := run(prog, args...)
			if code != 0 || !strings.HasPrefix(out, "usage: "+prog) || errOut != "" {
				t.Errorf("%s %v: exit %d\nstdout:\n%s\nstderr:\n%s", prog, args, code, out, errOut)
			}
		}
		for _, args := range [][]string{{"--version"}, {"version"}} {
			out, _, code := run(prog, args...)
			if code != 0 || !strings.HasPrefix(out, prog+" ") {
				t.Errorf("%s %v: exit %d, %q", prog, args, code, out)
			}
		}
		out, errOut, code := run(prog, "--no-such-flag")
		if code != 2 || out != "" || !strings.HasPrefix(errOut, prog+": error: ") {
			t.Errorf("%s --no-such-flag: exit %d\nstdout:\n%s\nstderr:\n%s", prog, code, out, errOut)
		}
	}
}

// A program the Security Network knows to be malicious, run from the
// download folder with the real agent and the real cloud: it is blocked,
// the notification stays (critical, no expiry), the icon and the menu show
// the detection until the person dismisses it, and `cloudprotect alerts`
// lists it.
func TestRealBlockAlert(t *testing.T) {
	testenv.NeedRoot(t)
	s := newSession(t)
	notes := dt.StartNotifications(t, s.bus, true)
	watcher := dt.StartWatcher(t, s.bus)

	// The download folder is a tmpfs of its own, and the agent checks
	// programs before they run there only: programs other tests run on
	// this machine meanwhile are not held.
	downloads := filepath.Join(s.dir, "home", "Downloads")
	if err := os.MkdirAll(downloads, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", downloads, "tmpfs", syscall.MS_NOSUID|syscall.MS_NODEV, "size=16m,mode=0755"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("mount a tmpfs: %v", err)
		}
		t.Skipf("cannot mount a tmpfs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(downloads, syscall.MNT_DETACH) })
	s.agentArgs = []string{"--protect-only", downloads}
	prog := filepath.Join(s.dir, "invoice-viewer")
	b, err := os.ReadFile("/bin/true")
	if err != nil {
		t.Fatal(err)
	}
	b = append(b, []byte(fmt.Sprintf("test %d %d", os.Getpid(), time.Now().UnixNano()))...)
	if err := os.WriteFile(prog, b, 0o755); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	list := filepath.Join(s.dir, "malicious.txt")
	os.WriteFile(list, []byte(hex.EncodeToString(sum[:])+"\n"), 0o644)
	db := "sqlite:" + filepath.Join(s.dir, "server.db")
	if out, err := exec.Command(filepath.Join(s.bin, "cloudprotect-server"), "import", "--db", db, "--malicious", list, "--feed", "test").CombinedOutput(); err != nil {
		t.Fatalf("import: %v\n%s", err, out)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.cloud = ln.Addr().String()
	ln.Close()
	srv := exec.Command(filepath.Join(s.bin, "cloudprotect-server"), "serve", "--listen", s.cloud, "--db", db)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Signal(syscall.SIGTERM); srv.Wait() })

	s.startAgent()
	cli := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(filepath.Join(s.bin, "cloudprotect"), append([]string{"--socket", s.socket}, args...)...)
		cmd.Env = s.trayEnv()
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("cloudprotect %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	cli("participate", "--yes")
	s.startTray()
	it := dt.NewItem(s.bus.Conn(t), waitRegistered(t, watcher))
	waitIcon(t, it, icons.Participating, icons.Limited)

	// Downloaded, then run: blocked before it runs.
	dl := filepath.Join(downloads, "invoice-viewer")
	if err := os.WriteFile(dl, b, 0o755); err != nil {
		t.Fatal(err)
	}
	var runErr error
	waitFor(t, "the program to be blocked", func() error {
		runErr = exec.Command(dl).Run()
		if runErr == nil {
			return fmt.Errorf("it ran")
		}
		return nil
	})
	if !errors.Is(runErr, syscall.EPERM) {
		t.Errorf("run: %v, want EPERM", runErr)
	}
	n := notes.Wait(t, "Dangerous program blocked", 15*time.Second)
	if n.Urgency != 2 || n.Timeout != 0 || !strings.Contains(n.Body, "invoice-viewer") {
		t.Errorf("block notification %+v: want critical, no expiry, naming the program", n)
	}
	waitIcon(t, it, icons.Threat)
	waitEntry(t, it, "● Blocked invoice-viewer", func(e dt.MenuEntry) bool { return e.Visible })
	if out := cli("alerts"); !strings.Contains(out, "blocked") || !strings.Contains(out, "invoice-viewer") {
		t.Errorf("cloudprotect alerts:\n%s", out)
	}

	if err := notes.Close(n, 2); err != nil {
		t.Fatal(err)
	}
	waitIcon(t, it, icons.Participating, icons.Limited)
	waitEntry(t, it, "Blocked invoice-viewer", func(e dt.MenuEntry) bool { return e.Visible })
}
