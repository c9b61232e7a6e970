package tray

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"image"
	"image/draw"
	"image/png"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"

	"github.com/esiqveland/notify"
	"github.com/gen2brain/beeep"
	"github.com/godbus/dbus/v5"

	"github.com/cloudprotect/cloudprotect/agent/safetext"
	"github.com/cloudprotect/cloudprotect/icons"
)

// BeeepNotifier shows simple notifications with beeep, which falls back
// from D-Bus to notify-send and kdialog. The tray uses it only where it
// has no session bus of its own (DBusNotifier needs one).
type BeeepNotifier struct{}

// Notify shows n.
func (BeeepNotifier) Notify(n Note) error {
	beeep.AppName = Title
	if err := beeep.Notify(n.Title, safetext.Line(n.Body), icons.PNG(n.Icon, 64)); err != nil {
		return fmt.Errorf("show notification: %w", err)
	}
	return nil
}

// DBusNotifier shows notifications through org.freedesktop.Notifications
// on a private connection of its own: apart from systray's, so the
// server's signals cannot disturb the tray item, and able to learn when
// the person dismisses a notification.
//
// Bodies are escaped for the server's markup when it reads markup
// ("body-markup"), and stripped of control and bidirectional characters
// either way.
type DBusNotifier struct {
	conn *dbus.Conn
	n    notify.Notifier
	caps []string

	mu        sync.Mutex // protects dismissed
	dismissed map[uint32]func()
}

// NewDBusNotifier connects a notifier on conn, which it owns and closes.
func NewDBusNotifier(conn *dbus.Conn) (*DBusNotifier, error) {
	d := &DBusNotifier{conn: conn, dismissed: map[uint32]func(){}}
	caps, err := notify.GetCapabilities(conn)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("no notification server: %w", err)
	}
	d.caps = caps
	d.n, err = notify.New(conn,
		notify.WithLogger(discardPrintf{}),
		notify.WithOnAction(func(s *notify.ActionInvokedSignal) { d.closed(s.ID, true) }),
		notify.WithOnClosed(func(s *notify.NotificationClosedSignal) {
			d.closed(s.ID, s.Reason == notify.ReasonDismissedByUser)
		}),
	)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("listen for notifications: %w", err)
	}
	return d, nil
}

func (d *DBusNotifier) closed(id uint32, byPerson bool) {
	d.mu.Lock()
	f := d.dismissed[id]
	delete(d.dismissed, id)
	d.mu.Unlock()
	if f != nil && byPerson {
		f()
	}
}

// Close ends the notifier and its connection.
func (d *DBusNotifier) Close() error {
	d.n.Close()
	return d.conn.Close()
}

// Notify implements Notifier.
func (d *DBusNotifier) Notify(n Note) error {
	note := notify.Notification{
		AppName:       Title,
		Summary:       safetext.Line(n.Title),
		Body:          d.body(n.Body),
		ExpireTimeout: notify.ExpireTimeoutSetByNotificationServer,
	}
	note.SetUrgency(notify.UrgencyNormal)
	if n.Critical {
		// Critical notifications stay until dismissed; a default action
		// lets a click on the bubble count as having seen it.
		note.SetUrgency(notify.UrgencyCritical)
		note.ExpireTimeout = notify.ExpireTimeoutNever
		if slices.Contains(d.caps, "actions") {
			note.Actions = []notify.Action{{Key: "default", Label: ""}}
		}
	}
	if img := rgba(icons.PNG(n.Icon, 64)); img != nil {
		note.AddHint(notify.HintImageDataRGBA(img))
	}
	id, err := d.n.SendNotification(note)
	if err != nil {
		return fmt.Errorf("show notification: %w", err)
	}
	if n.Dismissed != nil {
		d.mu.Lock()
		d.dismissed[id] = n.Dismissed
		d.mu.Unlock()
	}
	return nil
}

// body makes text safe for the server: one line per line, escaped when
// the server reads markup.
func (d *DBusNotifier) body(text string) string {
	lines := strings.Split(text, "\n")
	escape := slices.Contains(d.caps, "body-markup")
	for i, l := range lines {
		if escape {
			lines[i] = markup(l)
		} else {
			lines[i] = safetext.Line(l)
		}
	}
	return strings.Join(lines, "\n")
}

// DBusConfirmer asks Yes/No with a notification carrying two actions, on a
// private bus connection of its own, when the notification server supports
// actions. Otherwise it returns ErrCannotAsk. The question is closed as
// soon as it is answered, or withdrawn.
type DBusConfirmer struct {
	// Connect opens a private, authenticated session bus connection;
	// nil means the session bus of the environment.
	Connect func() (*dbus.Conn, error)
}

// Confirm implements Confirmer.
func (c DBusConfirmer) Confirm(ctx context.Context, q Question) (bool, error) {
	connect := c.Connect
	if connect == nil {
		connect = PrivateSessionBus
	}
	conn, err := connect()
	if err != nil {
		return false, fmt.Errorf("%w: %v", ErrCannotAsk, err)
	}
	defer conn.Close()
	caps, err := notify.GetCapabilities(conn)
	if err != nil {
		return false, fmt.Errorf("%w: no notification server: %v", ErrCannotAsk, err)
	}
	if !slices.Contains(caps, "actions") {
		return false, fmt.Errorf("%w: the notification server shows no actions", ErrCannotAsk)
	}

	type answer struct {
		id  uint32
		key string // "" when closed without an action
	}
	answers := make(chan answer, 8)
	n, err := notify.New(conn,
		notify.WithLogger(discardPrintf{}),
		notify.WithOnAction(func(s *notify.ActionInvokedSignal) {
			select {
			case answers <- answer{s.ID, s.ActionKey}:
			default:
			}
		}),
		notify.WithOnClosed(func(s *notify.NotificationClosedSignal) {
			select {
			case answers <- answer{id: s.ID}:
			default:
			}
		}),
	)
	if err != nil {
		return false, fmt.Errorf("ask %q: %w", q.Title, err)
	}
	defer n.Close()

	body := q.Body
	if slices.Contains(caps, "body-markup") {
		body = markup(body)
	}
	note := notify.Notification{
		AppName:       Title,
		Summary:       q.Title,
		Body:          body,
		Actions:       []notify.Action{{Key: "yes", Label: q.Yes}, {Key: "no", Label: q.No}},
		ExpireTimeout: notify.ExpireTimeoutNever,
	}
	note.SetUrgency(notify.UrgencyNormal)
	if img := rgba(icons.PNG(q.Icon, 64)); img != nil {
		note.AddHint(notify.HintImageDataRGBA(img))
	}
	id, err := n.SendNotification(note)
	if err != nil {
		return false, fmt.Errorf("ask %q: %w", q.Title, err)
	}
	for {
		select {
		case a := <-answers:
			if a.id != id {
				continue // another program's notification
			}
			// Answered: the question goes away at once, whatever the
			// server does with answered notifications.
			n.CloseNotification(id)
			return a.key == "yes", nil
		case <-ctx.Done():
			n.CloseNotification(id)
			return false, ctx.Err()
		}
	}
}

// PrivateSessionBus opens a session bus connection of its own, apart from
// the shared one systray uses.
func PrivateSessionBus() (*dbus.Conn, error) {
	conn, err := dbus.SessionBusPrivate()
	if err != nil {
		return nil, err
	}
	if err := conn.Auth(nil); err != nil {
		conn.Close()
		return nil, err
	}
	if err := conn.Hello(); err != nil {
		conn.Close()
		return nil, err
	}
	return conn, nil
}

type discardPrintf struct{}

func (discardPrintf) Printf(string, ...any) {}

func rgba(b []byte) *image.RGBA {
	img, err := png.Decode(bytes.NewReader(b))
	if err != nil {
		return nil
	}
	out := image.NewRGBA(img.Bounds())
	draw.Draw(out, out.Bounds(), img, img.Bounds().Min, draw.Src)
	return out
}

// DialogConfirmer asks Yes/No with zenity or kdialog, whichever is
// installed, when a display is available.
type DialogConfirmer struct {
	// LookPath finds a program; nil means exec.LookPath.
	LookPath func(string) (string, error)
}

// Confirm implements Confirmer.
func (c DialogConfirmer) Confirm(ctx context.Context, q Question) (bool, error) {
	if os.Getenv("DISPLAY") == "" && os.Getenv("WAYLAND_DISPLAY") == "" {
		return false, fmt.Errorf("%w: no display", ErrCannotAsk)
	}
	look := c.LookPath
	if look == nil {
		look = exec.LookPath
	}
	var cmd *exec.Cmd
	if p, err := look("zenity"); err == nil {
		cmd = exec.CommandContext(ctx, p, "--question", "--title", q.Title, "--text", q.Body,
			"--ok-label", q.Yes, "--cancel-label", q.No, "--width", "420", "--no-markup")
	} else if p, err := look("kdialog"); err == nil {
		cmd = exec.CommandContext(ctx, p, "--title", q.Title, "--yes-label", q.Yes, "--no-label", q.No, "--yesno", q.Body)
	} else {
		return false, fmt.Errorf("%w: neither zenity nor kdialog is installed", ErrCannotAsk)
	}
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return true, nil
	case errors.As(err, &exit) && exit.ExitCode() == 1 && ctx.Err() == nil:
		return false, nil // No, or the dialog was closed
	default:
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		return false, fmt.Errorf("ask %q with %s: %w", q.Title, cmd.Path, err)
	}
}

// Confirmers tries each Confirmer in turn, moving on when one cannot ask.
type Confirmers []Confirmer

// Confirm implements Confirmer.
func (cs Confirmers) Confirm(ctx context.Context, q Question) (bool, error) {
	for _, c := range cs {
		yes, err := c.Confirm(ctx, q)
		if errors.Is(err, ErrCannotAsk) {
			continue
		}
		return yes, err
	}
	return false, ErrCannotAsk
}
