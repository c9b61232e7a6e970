package tray

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/godbus/dbus/v5"
)

const (
	watcherName  = "org.kde.StatusNotifierWatcher"
	watcherPath  = "/StatusNotifierWatcher"
	itemPath     = "/StatusNotifierItem"
	registerItem = watcherName + ".RegisterStatusNotifierItem"
)

// Panels says what Reregister does while no panel is there.
type Panels struct {
	// Grace is how long to wait for a panel at start before calling
	// Missing; zero means never.
	Grace time.Duration
	// Missing is called once if no panel appeared within Grace.
	Missing func()
}

// Reregister registers the tray's item with every new
// StatusNotifierWatcher (a panel starting or restarting) until ctx is done.
// When no panel is there at start and none appears within panels.Grace, it
// calls panels.Missing once, and keeps waiting.
//
// systray re-registers on its own only until any signal with fewer than
// three arguments reaches its shared connection, which a notification
// server's NotificationClosed does; so the tray watches NameOwnerChanged on
// a private connection (watch) and registers the same way systray does: by
// object path from the connection that exports the item (item).
func Reregister(ctx context.Context, watch, item *dbus.Conn, log *slog.Logger, panels Panels) error {
	rule := []dbus.MatchOption{
		dbus.WithMatchObjectPath("/org/freedesktop/DBus"),
		dbus.WithMatchInterface("org.freedesktop.DBus"),
		dbus.WithMatchSender("org.freedesktop.DBus"),
		dbus.WithMatchMember("NameOwnerChanged"),
		dbus.WithMatchArg(0, watcherName),
	}
	if err := watch.AddMatchSignal(rule...); err != nil {
		return fmt.Errorf("watch for panels: %w", err)
	}
	sigs := make(chan *dbus.Signal, 16)
	watch.Signal(sigs)
	defer watch.RemoveSignal(sigs)

	var present bool
	if err := watch.BusObject().CallWithContext(ctx, "org.freedesktop.DBus.NameHasOwner", 0, watcherName).Store(&present); err != nil {
		log.Warn("look for a panel", "err", err)
	}
	var wait <-chan time.Time
	if !present {
		log.Info("no panel shows status icons yet; the icon appears when one starts")
		if panels.Grace > 0 && panels.Missing != nil {
			t := time.NewTimer(panels.Grace)
			defer t.Stop()
			wait = t.C
		}
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-wait:
			wait = nil
			if !present {
				log.Info("still no panel; told the person", "after", panels.Grace)
				panels.Missing()
			}
		case s, ok := <-sigs:
			if !ok {
				return fmt.Errorf("watch for panels: connection closed")
			}
			if s == nil || s.Name != "org.freedesktop.DBus.NameOwnerChanged" || len(s.Body) != 3 {
				continue
			}
			if name, _ := s.Body[0].(string); name != watcherName {
				continue
			}
			if owner, _ := s.Body[2].(string); owner == "" {
				present = false
				log.Info("panel gone: no status notifier watcher")
				continue
			}
			present = true
			call := item.Object(watcherName, watcherPath).CallWithContext(ctx, registerItem, 0, itemPath)
			if call.Err != nil {
				log.Warn("register tray item with the new panel", "err", call.Err)
				continue
			}
			log.Info("tray item registered with a new panel")
		}
	}
}
