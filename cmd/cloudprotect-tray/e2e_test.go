package main

import (
	"bytes"
	"context"
	"fmt"
	"image/png"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/localapi"
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
		for _, c := range []string{"cloudprotect-tray", "cloudprotectd", "cloudprotect"} {
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
		"--server", "http://127.0.0.1:1")
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
	return []string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + filepath.Join(s.dir, "home"),
		"DBUS_SESSION_BUS_ADDRESS=" + s.bus.Addr,
		"XDG_CONFIG_HOME=" + s.configHome(),
		"XDG_CONFIG_DIRS=" + filepath.Join(s.dir, "xdg"),
		"XDG_STATE_HOME=" + filepath.Join(s.dir, "state"),
		"XDG_CACHE_HOME=" + filepath.Join(s.dir, "cache"),
	}
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

// argb is the pixmap systray sends for a PNG.
func argb(tb testing.TB, b []byte) dt.Pixmap {
	img, err := png.Decode(bytes.NewReader(b))
	if err != nil {
		tb.Fatal(err)
	}
	r := img.Bounds()
	px := dt.Pixmap{W: int32(r.Dx()), H: int32(r.Dy())}
	for y := r.Min.Y; y < r.Max.Y; y++ {
		for x := r.Min.X; x < r.Max.X; x++ {
			cr, cg, cb, ca := img.At(x, y).RGBA()
			px.Pix = append(px.Pix, byte(ca), byte(cr), byte(cg), byte(cb))
		}
	}
	return px
}

func iconState(tb testing.TB, it *dt.Item) (icons.State, error) {
	got, err := it.Icon()
	if err != nil {
		return "", err
	}
	for _, st := range icons.States {
		want := argb(tb, icons.PNG(st, tray.PanelIconSize))
		if got.W == want.W && got.H == want.H && bytes.Equal(got.Pix, want.Pix) {
			return st, nil
		}
	}
	return "", fmt.Errorf("icon %d×%d is none of the state icons", got.W, got.H)
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
	for _, want := range []string{"Access to Security Network is disabled", tray.LabelJoin, tray.LabelStatement,
		"Statistics: 0 pending · never sent", tray.LabelSendNow, tray.LabelAutostart, tray.LabelQuit} {
		if _, ok := dt.Find(menu, want); !ok {
			t.Errorf("menu lacks %q: %+v", want, menu)
		}
	}
	join := entry(t, it, tray.LabelJoin)
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
	waitEntry(t, it, tray.LabelJoin, func(e dt.MenuEntry) bool { return e.Enabled })
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
	waitEntry(t, it, tray.LabelJoined, func(e dt.MenuEntry) bool { return e.ToggleState == 1 })
	waitIcon(t, it, icons.Participating, icons.Limited)

	// The CLI leaves: the menu and icon follow.
	cli := exec.Command(filepath.Join(s.bin, "cloudprotect"), "--socket", s.socket, "leave", "--yes")
	cli.Env = s.trayEnv()
	if out, err := cli.CombinedOutput(); err != nil {
		t.Fatalf("cloudprotect leave --yes: %v\n%s", err, out)
	}
	waitEntry(t, it, tray.LabelJoin, func(e dt.MenuEntry) bool { return e.ToggleState == 0 })
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
	auto := entry(t, it, tray.LabelAutostart)
	if auto.ToggleState != 0 {
		t.Fatalf("start at login checked without an entry: %+v", auto)
	}
	if err := it.Click(auto.ID); err != nil {
		t.Fatal(err)
	}
	waitEntry(t, it, tray.LabelAutostart, func(e dt.MenuEntry) bool { return e.ToggleState == 1 })
	b, err := os.ReadFile(file)
	if err != nil || !strings.Contains(string(b), "Exec=") {
		t.Fatalf("autostart entry %s: %v\n%s", file, err, b)
	}
	if err := it.Click(auto.ID); err != nil {
		t.Fatal(err)
	}
	waitEntry(t, it, tray.LabelAutostart, func(e dt.MenuEntry) bool { return e.ToggleState == 0 })
	if _, err := os.Stat(file); err == nil {
		t.Fatal("autostart entry left behind after unchecking")
	}

	// Quit ends the tray cleanly.
	if err := it.Click(entry(t, it, tray.LabelQuit).ID); err != nil {
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
	if e := entry(t, it, tray.LabelJoin); e.Enabled {
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
