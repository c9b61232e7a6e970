// Package alerts keeps the agent's recent alerts: a bounded history,
// persisted in the agent's state folder so that it survives restarts, from
// which the local API answers GET /v1/alerts (each caller seeing what it
// may) and a client that connects later learns what it missed.
package alerts

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/internal/atomicfile"
)

// FileName is the history's file in the agent's state folder.
const FileName = "alerts.json"

// DefaultMax is how many alerts the history keeps; older ones are
// forgotten first.
const DefaultMax = 200

// maxFile bounds what is read of the file: DefaultMax alerts with paths
// of wire.MaxPathLen bytes fit in it.
const maxFile = 4 << 20

// saveGap spaces the writes of the file while alerts stream in.
const saveGap = time.Second

// Options configure a History.
type Options struct {
	// Max is DefaultMax when zero.
	Max int
	// Logger receives what happens; nil discards.
	Logger *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// History is the bounded list of recent alerts.
//
// # On disk
//
// One JSON object, mode 0600, replaced as a whole by atomicfile.Write:
//
//	version  1
//	next_id  the ID the next alert gets (IDs only grow, across restarts)
//	alerts   the alerts, oldest first, each an api.Alert with "users",
//	         the uids that may see it besides the administrators
//
// A torn write cannot happen (atomicfile). A file that cannot be read or
// has another version is renamed to "alerts.json.corrupt-<UTC time>" with
// an error in the log, and the history starts empty: losing the history
// of alerts loses no statistics and no decision. Writes are spaced by a
// second (Serve writes what changed); a crash loses at most the alerts of
// the last second from the history, never from the event stream.
type History struct {
	path string
	max  int
	log  *slog.Logger
	now  func() time.Time
	kick chan struct{} // one slot: something to save

	saveMu sync.Mutex // serialises writes of the file, so the last one is the newest

	mu    sync.Mutex // protects the fields below
	next  uint64
	list  []entry // oldest first
	dirty bool
}

type file struct {
	Version int     `json:"version"`
	NextID  uint64  `json:"next_id"`
	Alerts  []entry `json:"alerts"`
}

// entry is one alert and the users who may see it besides the
// administrators.
type entry struct {
	api.Alert
	Users []uint32 `json:"users,omitempty"`
}

// Open reads the history at path. A missing file is an empty history; a
// damaged one is set aside (see History).
func Open(path string, opts Options) (*History, error) {
	if opts.Max <= 0 {
		opts.Max = DefaultMax
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	h := &History{path: path, max: opts.Max, log: opts.Logger, now: opts.Now, kick: make(chan struct{}, 1), next: 1}
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return h, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open alert history: %w", err)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxFile+1))
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("read alert history: %w", err)
	}
	var got file
	if err := json.Unmarshal(b, &got); err != nil || got.Version != 1 || len(b) > maxFile {
		aside := fmt.Sprintf("%s.corrupt-%s", path, h.now().UTC().Format("20060102T150405Z"))
		if rerr := os.Rename(path, aside); rerr != nil {
			return nil, fmt.Errorf("move damaged alert history aside: %w", rerr)
		}
		h.log.Error("alert history was damaged: moved aside, starting empty", "aside", aside, "err", err)
		return h, nil
	}
	for _, e := range got.Alerts {
		h.list = append(h.list, e)
		h.next = max(h.next, e.ID+1)
	}
	h.next = max(h.next, got.NextID)
	if n := len(h.list) - h.max; n > 0 {
		h.list = slices.Delete(h.list, 0, n)
	}
	return h, nil
}

// Add keeps al, which the users may see besides the administrators,
// with the next ID and, if it has none, the current time, and returns it
// as kept. The oldest alert goes beyond the bound.
func (h *History) Add(al api.Alert, users []uint32) api.Alert {
	h.mu.Lock()
	al.ID = h.next
	h.next++
	if al.Time.IsZero() {
		al.Time = h.now().UTC()
	}
	h.list = append(h.list, entry{Alert: al, Users: slices.Clone(users)})
	if n := len(h.list) - h.max; n > 0 {
		h.list = slices.Delete(h.list, 0, n)
	}
	h.dirty = true
	h.mu.Unlock()
	h.wake()
	return al
}

// List returns the alerts, newest first.
func (h *History) List() []api.Alert { return h.For(0, true) }

// Visible reports whether the user uid may see an alert that users may
// see: administrators (all) see every alert, everyone else those of
// programs they ran.
func Visible(users []uint32, uid uint32, all bool) bool {
	return all || slices.Contains(users, uid)
}

// For returns the alerts uid may see (all: an administrator), newest
// first.
func (h *History) For(uid uint32, all bool) []api.Alert {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []api.Alert
	for i := len(h.list) - 1; i >= 0; i-- {
		if e := &h.list[i]; Visible(e.Users, uid, all) {
			out = append(out, e.Alert)
		}
	}
	return out
}

// Summary returns how many alerts uid may see (all: an administrator)
// and the newest of them that reports a blocked program, without copying
// the list.
func (h *History) Summary(uid uint32, all bool) (n int, lastBlock *api.Alert) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for i := len(h.list) - 1; i >= 0; i-- {
		e := &h.list[i]
		if !Visible(e.Users, uid, all) {
			continue
		}
		n++
		if lastBlock == nil && e.Action == api.AlertActionBlocked {
			b := e.Alert
			lastBlock = &b
		}
	}
	return n, lastBlock
}

// Clear forgets every alert (the person stopped participating: which
// programs ran is theirs to take back): the file's old content, and any
// history set aside as damaged, is overwritten with zeros before it is
// replaced or removed. IDs keep growing.
func (h *History) Clear() error {
	h.saveMu.Lock()
	defer h.saveMu.Unlock()
	h.mu.Lock()
	h.list = nil
	h.dirty = true
	h.mu.Unlock()
	if err := zero(h.path); err != nil {
		h.log.Warn("cannot overwrite the alert history", "err", err)
	}
	// Histories set aside as damaged go the same way.
	aside, _ := filepath.Glob(h.path + ".corrupt-*")
	for _, p := range aside {
		if err := zero(p); err != nil {
			h.log.Warn("cannot overwrite a damaged alert history", "path", p, "err", err)
		}
		if err := os.Remove(p); err != nil {
			h.log.Warn("cannot remove a damaged alert history", "path", p, "err", err)
		}
	}
	return h.saveLocked()
}

// zero overwrites the file at path with zeros and syncs it.
func zero(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(make([]byte, fi.Size()), 0); err != nil {
		return err
	}
	return f.Sync()
}

func (h *History) wake() {
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// Serve writes the history when it changed, at most once per second,
// until ctx is cancelled; then it writes what is left and returns
// ctx.Err().
func (h *History) Serve(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			h.save()
			return ctx.Err()
		case <-h.kick:
		}
		h.save()
		select {
		case <-ctx.Done():
			h.save()
			return ctx.Err()
		case <-time.After(saveGap):
		}
	}
}

// save writes the file if the history changed.
func (h *History) save() error {
	h.saveMu.Lock()
	defer h.saveMu.Unlock()
	return h.saveLocked()
}

func (h *History) saveLocked() error {
	h.mu.Lock()
	if !h.dirty {
		h.mu.Unlock()
		return nil
	}
	f := file{Version: 1, NextID: h.next, Alerts: slices.Clone(h.list)}
	h.dirty = false
	h.mu.Unlock()
	b, err := json.Marshal(f)
	if err == nil {
		err = atomicfile.Write(h.path, append(b, '\n'), 0o600)
	}
	if err != nil {
		h.mu.Lock()
		h.dirty = true
		h.mu.Unlock()
		h.log.Warn("cannot save the alert history: kept in memory", "err", err)
		return fmt.Errorf("save alert history: %w", err)
	}
	return nil
}
