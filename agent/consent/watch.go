package consent

import (
	"github.com/cloudprotect/cloudprotect/agent/internal/dirs"

	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/fsnotify/fsnotify"
)

// policySettle is how long the policy's folder must be quiet before the
// file is read again, so an editor's several writes are read once.
const policySettle = 50 * time.Millisecond

// WatchPolicy follows the policy file and applies every change without a
// restart: edits in place, atomic replacement by editors, removal, and the
// folder appearing later. It watches the file's folder (or the nearest
// folder above it that exists) rather than the file, since a replaced
// file is a new inode. It returns ctx.Err() when ctx is cancelled.
func (m *Manager) WatchPolicy(ctx context.Context) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watch policy: %w", err)
	}
	defer w.Close()

	watched := ""
	rewatch := func() error {
		dir := dirs.Nearest(filepath.Dir(m.policyPath))
		if dir == watched {
			return nil
		}
		if watched != "" {
			w.Remove(watched)
		}
		if err := w.Add(dir); err != nil {
			return fmt.Errorf("watch policy folder %s: %w", dir, err)
		}
		watched = dir
		return nil
	}
	if err := rewatch(); err != nil {
		return err
	}
	// The file may have changed between Open and the watch being set.
	m.ReloadPolicy()

	settle := time.NewTimer(time.Hour)
	settle.Stop()
	defer settle.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case ev, ok := <-w.Events:
			if !ok {
				return errors.New("watch policy: watcher closed")
			}
			if watched == filepath.Dir(m.policyPath) && ev.Name != m.policyPath {
				continue
			}
			settle.Reset(policySettle)
		case err, ok := <-w.Errors:
			if !ok {
				return errors.New("watch policy: watcher closed")
			}
			// Lost inotify events: read the file again to be sure.
			m.log.Warn("policy watch error; reloading", "err", err)
			settle.Reset(policySettle)
		case <-settle.C:
			if err := rewatch(); err != nil {
				m.log.Warn("policy watch", "err", err)
			}
			m.ReloadPolicy()
		}
	}
}
