// Package desktoptest plays a desktop session for the tray's tests and
// benchmarks: a private D-Bus session bus (dbus-daemon), a panel (an
// org.kde.StatusNotifierWatcher) and a notification server
// (org.freedesktop.Notifications), plus a client that reads a tray item's
// properties and menu and clicks it, as a panel does.
package desktoptest

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/prop"
)

// Bus is a private session bus.
type Bus struct {
	Addr string
	cmd  *exec.Cmd
}

// StartBus starts dbus-daemon for the test. Without dbus-daemon the test is
// skipped, unless CI=true, where it fails.
func StartBus(tb testing.TB) *Bus {
	tb.Helper()
	path, err := exec.LookPath("dbus-daemon")
	if err != nil {
		if os.Getenv("CI") == "true" {
			tb.Fatalf("dbus-daemon is required under CI=true: %v (install Debian package dbus)", err)
		}
		tb.Skipf("dbus-daemon not installed (Debian package dbus); skipping the desktop session test")
	}
	cmd := exec.Command(path, "--session", "--nofork", "--print-address=1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatalf("start dbus-daemon: %v", err)
	}
	tb.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		tb.Fatalf("read dbus-daemon address: %v", err)
	}
	return &Bus{Addr: strings.TrimSpace(line), cmd: cmd}
}

// Conn opens a new connection to the bus, closed when the test ends.
func (b *Bus) Conn(tb testing.TB) *dbus.Conn {
	tb.Helper()
	c, err := dbus.Connect(b.Addr)
	if err != nil {
		tb.Fatalf("connect to the test bus: %v", err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

// Registration is one RegisterStatusNotifierItem call.
type Registration struct {
	Service string          // bus name of the item
	Path    dbus.ObjectPath // object path of the item
	At      time.Time
}

// Watcher is a panel: it owns org.kde.StatusNotifierWatcher.
type Watcher struct {
	conn       *dbus.Conn
	Registered chan Registration

	mu    sync.Mutex // protects items
	items []string
}

const (
	watcherName = "org.kde.StatusNotifierWatcher"
	watcherPath = "/StatusNotifierWatcher"
)

// StartWatcher starts a panel on b.
func StartWatcher(tb testing.TB, b *Bus) *Watcher {
	tb.Helper()
	w := &Watcher{conn: b.Conn(tb), Registered: make(chan Registration, 64)}
	if err := w.conn.Export(watcherMethods{w}, watcherPath, watcherName); err != nil {
		tb.Fatal(err)
	}
	_, err := prop.Export(w.conn, watcherPath, prop.Map{
		watcherName: {
			"RegisteredStatusNotifierItems":  {Value: []string{}, Emit: prop.EmitTrue},
			"IsStatusNotifierHostRegistered": {Value: true, Emit: prop.EmitTrue},
			"ProtocolVersion":                {Value: int32(0), Emit: prop.EmitTrue},
		},
	})
	if err != nil {
		tb.Fatal(err)
	}
	reply, err := w.conn.RequestName(watcherName, dbus.NameFlagDoNotQueue)
	if err != nil || reply != dbus.RequestNameReplyPrimaryOwner {
		tb.Fatalf("own %s: %v (reply %d)", watcherName, err, reply)
	}
	return w
}

// Stop ends the panel, releasing the watcher's name.
func (w *Watcher) Stop() { w.conn.Close() }

type watcherMethods struct{ w *Watcher }

func (m watcherMethods) RegisterStatusNotifierItem(sender dbus.Sender, service string) *dbus.Error {
	r := Registration{Service: service, Path: "/StatusNotifierItem", At: time.Now()}
	if strings.HasPrefix(service, "/") {
		r.Service, r.Path = string(sender), dbus.ObjectPath(service)
	}
	m.w.mu.Lock()
	m.w.items = append(m.w.items, r.Service+string(r.Path))
	m.w.mu.Unlock()
	select {
	case m.w.Registered <- r:
	default:
	}
	return nil
}

func (m watcherMethods) RegisterStatusNotifierHost(string) *dbus.Error { return nil }

// Notification is one Notify call the server received.
type Notification struct {
	ID      uint32
	Sender  string
	AppName string
	Summary string
	Body    string
	Actions []string
	Timeout int32
	// Urgency is the "urgency" hint: 0 low, 1 normal, 2 critical.
	Urgency byte
}

// HasAction reports whether n offers the action key.
func (n Notification) HasAction(key string) bool {
	for i := 0; i+1 < len(n.Actions); i += 2 {
		if n.Actions[i] == key {
			return true
		}
	}
	return false
}

// Notifications is a notification server. Notifications without actions
// that may expire expire at once: it sends NotificationClosed (reason 1,
// expired) to their sender, as a real server does when a notification
// times out. It reads body markup, as dunst does.
type Notifications struct {
	conn    *dbus.Conn
	actions bool
	Notes   chan Notification
	// Closed receives the id of each notification its sender closed
	// with CloseNotification.
	Closed chan uint32

	mu     sync.Mutex // protects next and sender
	next   uint32
	sender map[uint32]string
}

const (
	notifyName = "org.freedesktop.Notifications"
	notifyPath = "/org/freedesktop/Notifications"
)

// StartNotifications starts a notification server on b; actions says
// whether it advertises the "actions" capability.
func StartNotifications(tb testing.TB, b *Bus, actions bool) *Notifications {
	tb.Helper()
	n := &Notifications{conn: b.Conn(tb), actions: actions, Notes: make(chan Notification, 64),
		Closed: make(chan uint32, 64), sender: map[uint32]string{}}
	if err := n.conn.Export(notifyMethods{n}, notifyPath, notifyName); err != nil {
		tb.Fatal(err)
	}
	reply, err := n.conn.RequestName(notifyName, dbus.NameFlagDoNotQueue)
	if err != nil || reply != dbus.RequestNameReplyPrimaryOwner {
		tb.Fatalf("own %s: %v", notifyName, err)
	}
	return n
}

type notifyMethods struct{ n *Notifications }

func (m notifyMethods) Notify(sender dbus.Sender, app string, replaces uint32, icon, summary, body string,
	actions []string, hints map[string]dbus.Variant, timeout int32) (uint32, *dbus.Error) {
	m.n.mu.Lock()
	m.n.next++
	id := m.n.next
	m.n.sender[id] = string(sender)
	m.n.mu.Unlock()
	note := Notification{ID: id, Sender: string(sender), AppName: app, Summary: summary, Body: body, Actions: actions, Timeout: timeout}
	if u, ok := hints["urgency"]; ok {
		note.Urgency, _ = u.Value().(byte)
	}
	select {
	case m.n.Notes <- note:
	default:
	}
	if len(actions) == 0 && timeout != 0 {
		go func() {
			time.Sleep(10 * time.Millisecond)
			m.n.Close(note, 1)
		}()
	}
	return id, nil
}

func (m notifyMethods) GetCapabilities() ([]string, *dbus.Error) {
	caps := []string{"body", "body-markup", "icon-static"}
	if m.n.actions {
		caps = append(caps, "actions")
	}
	return caps, nil
}

func (m notifyMethods) GetServerInformation() (string, string, string, string, *dbus.Error) {
	return "desktoptest", "cloudprotect", "1", "1.2", nil
}

// CloseNotification closes a notification as a server does: it tells the
// sender with NotificationClosed, reason 3 (closed by a call).
func (m notifyMethods) CloseNotification(id uint32) *dbus.Error {
	m.n.mu.Lock()
	sender, ok := m.n.sender[id]
	m.n.mu.Unlock()
	if ok {
		select {
		case m.n.Closed <- id:
		default:
		}
		go m.n.Close(Notification{ID: id, Sender: sender}, 3)
	}
	return nil
}

// Invoke answers a notification as a person clicking the action key does:
// ActionInvoked, then NotificationClosed (dismissed by the user).
func (n *Notifications) Invoke(note Notification, key string) error {
	if err := n.signal(note.Sender, "ActionInvoked", note.ID, key); err != nil {
		return err
	}
	return n.Close(note, 2)
}

// Close sends NotificationClosed with reason to the notification's sender.
func (n *Notifications) Close(note Notification, reason uint32) error {
	return n.signal(note.Sender, "NotificationClosed", note.ID, reason)
}

// signal sends a signal to one connection, as notification servers do.
func (n *Notifications) signal(dest, member string, body ...any) error {
	msg := &dbus.Message{
		Type: dbus.TypeSignal,
		Headers: map[dbus.HeaderField]dbus.Variant{
			dbus.FieldPath:        dbus.MakeVariant(dbus.ObjectPath(notifyPath)),
			dbus.FieldInterface:   dbus.MakeVariant(notifyName),
			dbus.FieldMember:      dbus.MakeVariant(member),
			dbus.FieldDestination: dbus.MakeVariant(dest),
			dbus.FieldSignature:   dbus.MakeVariant(dbus.SignatureOf(body...)),
		},
		Body: body,
	}
	call := n.conn.Send(msg, nil)
	<-call.Done
	if call.Err != nil {
		return fmt.Errorf("send %s: %w", member, call.Err)
	}
	return nil
}

// Wait returns the next notification whose summary contains want.
// Notifications that do not match are passed over.
func (n *Notifications) Wait(tb testing.TB, want string, timeout time.Duration) Notification {
	tb.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case note := <-n.Notes:
			if strings.Contains(note.Summary, want) {
				return note
			}
		case <-deadline:
			tb.Fatalf("no notification %q within %v", want, timeout)
			return Notification{}
		}
	}
}
