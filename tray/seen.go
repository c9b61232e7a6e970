package tray

import (
	"encoding/json"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"

	"github.com/cloudprotect/cloudprotect/agent/api"
)

// seenFile remembers which detections the person has seen and which the
// tray has told them about, so that neither the threat icon nor a
// notification comes back after a restart.
//
// On disk: JSON {"seen": [KEY…], "notified": [KEY…]}, oldest first, each
// list at most maxRemembered long; written whole to a temporary file and
// renamed. A missing or unreadable file reads as nothing seen: at worst a
// detection is shown again.
const seenFile = "alerts-seen.json"

const maxRemembered = 256

// seenStore is the loop's record of seen and notified detections; only
// the loop goroutine uses it.
type seenStore struct {
	path string
	log  *slog.Logger
	data seenData
	set  map[string]bool // "s:" + key for seen, "n:" + key for notified
}

type seenData struct {
	Seen     []string `json:"seen"`
	Notified []string `json:"notified"`
}

// alertKey names an alert across restarts of the tray and of the agent.
func alertKey(a api.Alert) string {
	return strconv.FormatUint(a.ID, 10) + "-" + a.SHA256[:min(16, len(a.SHA256))] + "-" + strconv.FormatInt(a.Time.Unix(), 10)
}

func loadSeen(dir string, log *slog.Logger) *seenStore {
	s := &seenStore{log: log, set: map[string]bool{}}
	if dir == "" {
		return s
	}
	s.path = filepath.Join(dir, seenFile)
	b, err := os.ReadFile(s.path)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			log.Warn("read seen detections", "err", err)
		}
		return s
	}
	if err := json.Unmarshal(b, &s.data); err != nil {
		log.Warn("seen detections unreadable: starting afresh", "file", s.path, "err", err)
		s.data = seenData{}
	}
	for _, k := range s.data.Seen {
		s.set["s:"+k] = true
	}
	for _, k := range s.data.Notified {
		s.set["n:"+k] = true
	}
	return s
}

func (s *seenStore) has(key string) bool      { return s.set["s:"+key] }
func (s *seenStore) notified(key string) bool { return s.set["n:"+key] }

func (s *seenStore) markSeen(key string) {
	if !s.has(key) {
		s.set["s:"+key] = true
		s.data.Seen = bounded(append(s.data.Seen, key), "s:", s.set)
	}
}

func (s *seenStore) markNotified(key string) {
	if !s.notified(key) {
		s.set["n:"+key] = true
		s.data.Notified = bounded(append(s.data.Notified, key), "n:", s.set)
	}
}

func bounded(list []string, prefix string, set map[string]bool) []string {
	for len(list) > maxRemembered {
		delete(set, prefix+list[0])
		list = list[1:]
	}
	return list
}

func (s *seenStore) save() {
	if s.path == "" {
		return
	}
	b, err := json.Marshal(s.data)
	if err == nil {
		if err = os.MkdirAll(filepath.Dir(s.path), 0o700); err == nil {
			err = writeAtomic(s.path, b)
		}
	}
	if err != nil {
		s.log.Warn("remember seen detections", "err", err)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }
