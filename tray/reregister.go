package tray

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/godbus/dbus/v5"
)

const (
	watcherName  = "org.kde.StatusNotifierWatcher"
	watcherPath  = "/StatusNotifierWatcher"
	itemPath     = "/StatusNotifierItem"
	registerItem = watcherName + ".RegisterStatusNotifierItem"
)

// Reregister registers the tray's item with every new
// StatusNotifierWatcher (a panel starting or restarting) until ctx is done.
//
// systray re-registers on its own only until any signal with fewer than
// three arguments reaches its shared connection, which a notification
// server's NotificationClosed does; so the tray watches NameOwnerChanged on
// a private connection (watch) and registers the same way systray does: by
// object path from the connection that exports the item (item).
func Reregister(ctx context.Context, watch, item *dbus.Conn, log *slog.Logger) error {
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
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
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
				log.Info("panel gone: no status notifier watcher")
				continue
			}
			call := item.Object(watcherName, watcherPath).CallWithContext(ctx, registerItem, 0, itemPath)
			if call.Err != nil {
				log.Warn("register tray item with the new panel", "err", call.Err)
				continue
			}
			log.Info("tray item registered with a new panel")
		}
	}
}
