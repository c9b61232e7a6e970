package tray

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	"fyne.io/systray"
	"github.com/godbus/dbus/v5"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/icons"
	"github.com/cloudprotect/cloudprotect/tray/i18n"
)

// PanelIconSize is the size of the one image the tray gives the panel,
// which scales it to its own size.
const PanelIconSize = 32

// Options configure Run.
type Options struct {
	// Socket is the agent's local API socket.
	Socket string
	// SocketGiven is true when the person chose Socket (--socket): the
	// autostart entry then starts the tray with it too.
	SocketGiven bool
	// Logger receives the tray's log; nil means discard.
	Logger *slog.Logger
	// Exec is the command line the autostart entry runs; empty means this
	// executable (with --socket when SocketGiven).
	Exec string
	// Printer speaks the person's language; nil means English.
	Printer *i18n.Printer
	// PanelGrace is how long the tray waits for a panel before it tells
	// the person none shows its icon; zero means 5 seconds.
	PanelGrace time.Duration
}

// StartError is a reason the tray cannot start, with a hint a person can
// act on.
type StartError struct {
	Err  error
	Hint string
}

func (e *StartError) Error() string { return e.Err.Error() }
func (e *StartError) Unwrap() error { return e.Err }

// BusName is the name the tray owns on the session bus, so that a session
// runs one tray.
const BusName = "org.cloudprotect.Tray"

// AlreadyRunningError says another tray runs in this session.
type AlreadyRunningError struct {
	// PID is the other tray's process, 0 if unknown.
	PID uint32
}

func (e *AlreadyRunningError) Error() string {
	return fmt.Sprintf("cloudprotect-tray already runs in this session (process %d)", e.PID)
}

// Run shows the tray icon until ctx is done or the person clicks Quit. It
// needs a D-Bus session bus; without one it returns a *StartError. When
// another tray runs in the session it returns an *AlreadyRunningError at
// once. Without a panel (no StatusNotifierWatcher yet) it keeps running,
// tells the person once, and the icon appears when a panel starts.
func Run(ctx context.Context, opts Options) error {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := opts.Printer
	if p == nil {
		p = i18n.English()
	}
	if err := checkSessionBus(p); err != nil {
		return err
	}
	watch, err := PrivateSessionBus()
	if err != nil {
		return &StartError{Err: p.Wrap(err, "connect to the session bus: %s", err.Error()), Hint: p.Sprintf("run cloudprotect-tray inside your desktop session")}
	}
	defer watch.Close()
	if err := claimName(watch); err != nil {
		return err
	}
	shared, err := dbus.SessionBus()
	if err != nil {
		return &StartError{Err: p.Wrap(err, "connect to the session bus: %s", err.Error()), Hint: p.Sprintf("run cloudprotect-tray inside your desktop session")}
	}

	execLine := opts.Exec
	if execLine == "" {
		execLine = selfExec()
		if opts.SocketGiven {
			execLine += " --socket " + desktopQuote(opts.Socket)
		}
	}
	auto, err := AutostartFromEnv(execLine)
	if err != nil {
		log.Warn("start at login unavailable", "err", err)
	}
	client := localapi.NewClient(opts.Socket)
	defer client.Close()

	var notifier Notifier = BeeepNotifier{}
	if nc, err := PrivateSessionBus(); err == nil {
		if dn, err := NewDBusNotifier(nc); err == nil {
			defer dn.Close()
			notifier = dn
		} else {
			log.Info("notifications through beeep", "why", err)
		}
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ui := newSystrayUI(ctx)
	app := NewApp(Config{
		Agent:     client,
		UI:        ui,
		Notifier:  notifier,
		Confirmer: Confirmers{DBusConfirmer{}, DialogConfirmer{}},
		Printer:   p,
		AgentHint: agentHint(p, opts.Socket),
		Autostart: auto,
		StateDir:  stateDir(),
		CacheDir:  cacheDir(),
		Logger:    log,
	})

	// The icon, title and tooltip are set before systray exports the item:
	// setting them afterwards races the export (see docs on the startup
	// race), so the first status is asked for here, briefly.
	var first *api.Status
	sctx, scancel := context.WithTimeout(ctx, 300*time.Millisecond)
	if st, err := client.Status(sctx); err == nil {
		first = &st
	} else {
		log.Info("agent not reached at start", "socket", opts.Socket, "err", err)
	}
	scancel()
	initial := app.Initial(first)
	systray.SetTitle(Title)
	systray.SetIcon(iconBytes(initial.Icon))
	systray.SetTooltip(initial.Tooltip)
	ui.build(initial)

	grace := opts.PanelGrace
	if grace <= 0 {
		grace = 5 * time.Second
	}
	var wg sync.WaitGroup
	var runErr error
	onReady := func() {
		wg.Add(2)
		go func() {
			defer wg.Done()
			runErr = app.Run(ctx)
			systray.Quit()
		}()
		go func() {
			defer wg.Done()
			err := Reregister(ctx, watch, shared, log, Panels{Grace: grace, Missing: app.PanelMissing})
			if err != nil && ctx.Err() == nil {
				log.Warn("re-registering with new panels stopped", "err", err)
			}
		}()
	}
	log.Info("tray starting", "socket", opts.Socket, "icon", initial.Icon, "lang", p.Lang())
	systray.Run(onReady, nil)
	cancel()
	wg.Wait()
	if errors.Is(runErr, context.Canceled) {
		return nil
	}
	return runErr
}

// claimName owns BusName for this tray, or reports the tray that does.
func claimName(conn *dbus.Conn) error {
	reply, err := conn.RequestName(BusName, dbus.NameFlagDoNotQueue)
	if err != nil {
		return fmt.Errorf("own %s on the session bus: %w", BusName, err)
	}
	if reply == dbus.RequestNameReplyPrimaryOwner {
		return nil
	}
	var owner string
	var pid uint32
	if conn.BusObject().Call("org.freedesktop.DBus.GetNameOwner", 0, BusName).Store(&owner) == nil {
		conn.BusObject().Call("org.freedesktop.DBus.GetConnectionUnixProcessID", 0, owner).Store(&pid)
	}
	return &AlreadyRunningError{PID: pid}
}

// agentHint says how to start the agent the tray talks to.
func agentHint(p *i18n.Printer, socket string) string {
	if socket == localapi.SystemSocket {
		return p.Sprintf("Start it: sudo systemctl start cloudprotectd")
	}
	return p.Sprintf("Start it: cloudprotectd --user --socket %s", socket)
}

// desktopQuote quotes an argument for an Exec line of a .desktop file.
func desktopQuote(s string) string {
	if s != "" && !strings.ContainsAny(s, " \t\n\"'\\><~|&;$*?#()`") {
		return s
	}
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "`", "\\`", `$`, `\$`)
	return `"` + r.Replace(s) + `"`
}

// checkSessionBus fails early, with a hint, when there is no session bus to
// connect to: systray carries on without one and panics on Quit.
func checkSessionBus(p *i18n.Printer) error {
	if os.Getenv("DBUS_SESSION_BUS_ADDRESS") != "" {
		return nil
	}
	if rt := os.Getenv("XDG_RUNTIME_DIR"); rt != "" {
		if fi, err := os.Stat(filepath.Join(rt, "bus")); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return nil
		}
	}
	return &StartError{
		Err:  p.Error("no D-Bus session bus: DBUS_SESSION_BUS_ADDRESS is not set and $XDG_RUNTIME_DIR/bus does not exist"),
		Hint: p.Sprintf("run cloudprotect-tray inside your desktop session, which provides the session bus the tray icon needs"),
	}
}

func iconBytes(s icons.State) []byte {
	if runtime.GOOS == "windows" {
		return icons.ICO(s)
	}
	return SystrayPNG(icons.PNG(s, PanelIconSize))
}

func selfExec() string {
	p, err := os.Executable()
	if err != nil {
		return "cloudprotect-tray"
	}
	if r, err := filepath.EvalSymlinks(p); err == nil {
		p = r
	}
	return fmt.Sprintf("%q", p)
}

func stateDir() string {
	if d := os.Getenv("XDG_STATE_HOME"); filepath.IsAbs(d) {
		return filepath.Join(d, "cloudprotect")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "state", "cloudprotect")
	}
	return ""
}

func cacheDir() string {
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "cloudprotect")
	}
	return ""
}

// systrayUI is the one layer over fyne.io/systray: it creates the menu
// items once, applies menus to them and forwards their clicks.
type systrayUI struct {
	ctx    context.Context
	clicks chan ItemID

	// Touched only by build and Apply, which the App calls from one
	// goroutine at a time.
	status, detail, participate, statement, protection *systray.MenuItem
	alertsHeader, markSeen                             *systray.MenuItem
	alerts                                             [MaxAlerts]*systray.MenuItem
	stats, sendNow, autostart, quit                    *systray.MenuItem
	last                                               Menu
}

func newSystrayUI(ctx context.Context) *systrayUI {
	return &systrayUI{ctx: ctx, clicks: make(chan ItemID, 16)}
}

func (u *systrayUI) Clicks() <-chan ItemID { return u.clicks }

// build creates the items, before systray.Run so the first menu a panel
// reads is complete.
func (u *systrayUI) build(m Menu) {
	u.status = systray.AddMenuItem(m.Status.Label, "")
	u.detail = systray.AddMenuItem(m.Detail.Label, "")
	u.protection = systray.AddMenuItem(m.Protection.Label, "")
	systray.AddSeparator()
	u.participate = systray.AddMenuItemCheckbox(m.Participate.Label, "", m.Participate.Checked)
	u.statement = systray.AddMenuItem(m.Statement.Label, "")
	systray.AddSeparator()
	u.alertsHeader = systray.AddMenuItem(m.AlertsHeader.Label, "")
	for i := range u.alerts {
		u.alerts[i] = systray.AddMenuItem(m.Alerts[i].Label, "")
	}
	u.markSeen = systray.AddMenuItem(m.MarkSeen.Label, "")
	systray.AddSeparator()
	u.stats = systray.AddMenuItem(m.Stats.Label, "")
	u.sendNow = systray.AddMenuItem(m.SendNow.Label, "")
	systray.AddSeparator()
	u.autostart = systray.AddMenuItemCheckbox(m.Autostart.Label, "", m.Autostart.Checked)
	u.quit = systray.AddMenuItem(m.Quit.Label, "")
	for _, p := range u.pairs(m) {
		applyItem(p.mi, p.item, Item{}, true)
	}
	u.last = m
	clickable := map[ItemID]*systray.MenuItem{
		ItemParticipate: u.participate, ItemStatement: u.statement, ItemSendNow: u.sendNow,
		ItemAutostart: u.autostart, ItemQuit: u.quit, ItemMarkSeen: u.markSeen,
	}
	for i, mi := range u.alerts {
		clickable[ItemAlert+ItemID(i)] = mi
	}
	for id, mi := range clickable {
		go u.forward(id, mi.ClickedCh)
	}
}

// forward takes every click at once: systray drops a click when nobody is
// receiving.
func (u *systrayUI) forward(id ItemID, ch <-chan struct{}) {
	for {
		select {
		case <-u.ctx.Done():
			return
		case _, ok := <-ch:
			if !ok {
				return
			}
			select {
			case u.clicks <- id:
			case <-u.ctx.Done():
				return
			}
		}
	}
}

type itemPair struct {
	mi   *systray.MenuItem
	item Item
	old  Item
}

func (u *systrayUI) pairs(m Menu) []itemPair {
	o := u.last
	out := []itemPair{
		{u.status, m.Status, o.Status},
		{u.detail, m.Detail, o.Detail},
		{u.protection, m.Protection, o.Protection},
		{u.participate, m.Participate, o.Participate},
		{u.statement, m.Statement, o.Statement},
		{u.alertsHeader, m.AlertsHeader, o.AlertsHeader},
	}
	for i := range u.alerts {
		out = append(out, itemPair{u.alerts[i], m.Alerts[i], o.Alerts[i]})
	}
	return append(out,
		itemPair{u.markSeen, m.MarkSeen, o.MarkSeen},
		itemPair{u.stats, m.Stats, o.Stats},
		itemPair{u.sendNow, m.SendNow, o.SendNow},
		itemPair{u.autostart, m.Autostart, o.Autostart},
		itemPair{u.quit, m.Quit, o.Quit},
	)
}

// Apply implements UI, changing only what differs from the last menu.
func (u *systrayUI) Apply(m Menu) {
	if m.Icon != u.last.Icon {
		systray.SetIcon(iconBytes(m.Icon))
	}
	if m.Tooltip != u.last.Tooltip {
		systray.SetTooltip(m.Tooltip)
	}
	for _, p := range u.pairs(m) {
		applyItem(p.mi, p.item, p.old, false)
	}
	u.last = m
}

func applyItem(mi *systray.MenuItem, it, old Item, all bool) {
	if all || it.Label != old.Label {
		mi.SetTitle(it.Label)
	}
	if all || it.Enabled != old.Enabled {
		if it.Enabled {
			mi.Enable()
		} else {
			mi.Disable()
		}
	}
	if all || it.Checked != old.Checked {
		if it.Checked {
			mi.Check()
		} else {
			mi.Uncheck()
		}
	}
	if all || it.Visible != old.Visible {
		if it.Visible {
			mi.Show()
		} else {
			mi.Hide()
		}
	}
}
