package tray

import (
	"bytes"
	"io"
	"log/slog"
	"strings"
)

// LibraryLog returns a writer for the log package's output that puts the
// systray library's lines into the tray's log at the right level: its
// "failed to register" only means no panel is there yet, which the tray
// reports itself.
func LibraryLog(log *slog.Logger) io.Writer { return libLog{log} }

type libLog struct{ log *slog.Logger }

func (l libLog) Write(p []byte) (int, error) {
	for _, line := range bytes.Split(bytes.TrimRight(p, "\n"), []byte("\n")) {
		msg := string(line)
		switch {
		case strings.HasPrefix(msg, "systray error: failed to register:"):
			l.log.Debug("no status notifier watcher to register with yet", "detail", strings.TrimPrefix(msg, "systray error: "))
		case strings.HasPrefix(msg, "systray error: "):
			l.log.Warn("systray: " + strings.TrimPrefix(msg, "systray error: "))
		case msg != "":
			l.log.Info(msg)
		}
	}
	return len(p), nil
}
