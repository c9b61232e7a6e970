package agent

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
)

// prepareStateDir creates the state folder, or checks the one there: it
// must be a folder (not a link to one) of the agent's own user, and only
// that user may enter it (mode 0700, repaired when it is wider). A folder
// of another user is refused: someone else could read or replace what
// the agent keeps there.
func prepareStateDir(dir string, log *slog.Logger) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create state folder: %w", err)
	}
	var st syscall.Stat_t
	if err := syscall.Lstat(dir, &st); err != nil {
		return fmt.Errorf("check state folder: %w", err)
	}
	switch {
	case st.Mode&syscall.S_IFMT != syscall.S_IFDIR:
		return fmt.Errorf("state folder %s is not a folder (a symbolic link?)", dir)
	case int(st.Uid) != os.Geteuid():
		return fmt.Errorf("state folder %s belongs to uid %d, not to this agent's user %d", dir, st.Uid, os.Geteuid())
	}
	if perm := st.Mode & 0o7777; perm != 0o700 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("repair the mode of the state folder: %w", err)
		}
		log.Warn("state folder could be entered by others: mode repaired", "dir", dir, "was", fmt.Sprintf("%04o", perm), "now", "0700")
	}
	return nil
}

// removeStaleTemps removes the temporary files that a write cut short
// (the agent killed mid-write) left in the state folder: they may hold a
// consent record or statistics. Only the agent that holds the socket
// calls it, so no write of another agent is under way.
func removeStaleTemps(dir string, log *slog.Logger) {
	stale, _ := filepath.Glob(filepath.Join(dir, ".*.tmp-*"))
	for _, p := range stale {
		if err := os.Remove(p); err != nil {
			log.Warn("remove a stale temporary file", "path", p, "err", err)
			continue
		}
		log.Info("removed a stale temporary file", "path", p)
	}
}

// setAside lists the files the agent's stores moved aside as damaged that
// may hold statistics or alerts: they go whenever the person does not
// participate, like the data they were set aside from.
func (a *Agent) setAside() []string {
	var out []string
	for _, name := range []string{queueFile, "alerts.json"} {
		m, _ := filepath.Glob(filepath.Join(a.cfg.StateDir, name+".corrupt-*"))
		out = append(out, m...)
	}
	return out
}
