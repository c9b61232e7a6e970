// Package consent owns the person's decision about the Security Network:
// the states (undecided, participating, declined), the versioned statement
// they agreed to, the administrator's policy that may lock the decision,
// and the atomic persistence of the consent record. Everything that
// collects or sends data asks this package first.
package consent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/internal/atomicfile"
)

// State is a person's decision.
type State string

// The states of consent.
const (
	Undecided     State = "undecided"
	Participating State = "participating"
	Declined      State = "declined"
)

// Via says through which path a decision was made.
type Via string

// The paths to a decision.
const (
	ViaInstall Via = "install"
	ViaCLI     Via = "cli"
	ViaTray    Via = "tray"
	ViaPolicy  Via = "policy"
)

// ParseVia checks a path named by a client. Only an administrator's policy
// file may decide "policy", so clients cannot name it.
func ParseVia(s string) (Via, error) {
	switch v := Via(s); v {
	case ViaInstall, ViaCLI, ViaTray:
		return v, nil
	case "":
		return "", errors.New("via is missing: say how the decision was made (install, cli or tray)")
	default:
		return "", fmt.Errorf("unknown via %q: use install, cli or tray", s)
	}
}

// Record is the consent record kept on disk.
//
// On disk it is one JSON object in consent.json, replaced atomically (write
// to a temporary file, fsync, rename, fsync the folder), so a reader sees
// either the old record or the new one. A torn or foreign file cannot be
// trusted to say "participating": Load moves it aside and reports
// Undecided, which collects nothing.
type Record struct {
	FormatVersion int `json:"format_version"`
	// State is the person's decision.
	State State `json:"state"`
	// AcceptedVersion is the statement version accepted with
	// Participating; 0 otherwise.
	AcceptedVersion int `json:"accepted_version"`
	// Time is when the decision was made.
	Time time.Time `json:"time"`
	// Via is the path through which it was made.
	Via Via `json:"via"`
	// UID is the user who made it.
	UID int `json:"uid"`
}

const recordFormat = 1

func (r Record) validate() error {
	if r.FormatVersion != recordFormat {
		return fmt.Errorf("unknown format version %d", r.FormatVersion)
	}
	switch r.State {
	case Undecided, Declined:
		if r.AcceptedVersion != 0 {
			return fmt.Errorf("state %s with accepted version %d", r.State, r.AcceptedVersion)
		}
	case Participating:
		if r.AcceptedVersion < 1 {
			return fmt.Errorf("participating without an accepted statement version")
		}
	default:
		return fmt.Errorf("unknown state %q", r.State)
	}
	switch r.Via {
	case ViaInstall, ViaCLI, ViaTray, "":
	default:
		return fmt.Errorf("unknown via %q", r.Via)
	}
	return nil
}

// Store keeps the consent record in a file.
type Store struct {
	path  string
	write func(path string, data []byte, perm fs.FileMode) error // atomicfile.Write; tests fail it
	log   *slog.Logger
	now   func() time.Time
}

// NewStore returns a store for the record at path. A nil logger discards.
func NewStore(path string, log *slog.Logger, now func() time.Time) *Store {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if now == nil {
		now = time.Now
	}
	return &Store{path: path, log: log, now: now, write: atomicfile.Write}
}

// Path returns the record's file.
func (s *Store) Path() string { return s.path }

// Load reads the record. A missing file is an Undecided record. A file that
// cannot be read or trusted is moved aside (to consent.json.corrupt-TIME),
// logged, and reported as Undecided with a notice for the person; Load
// only fails when the state folder itself is unusable.
func (s *Store) Load() (rec Record, notice string, err error) {
	undecided := Record{FormatVersion: recordFormat, State: Undecided}
	b, err := os.ReadFile(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		return undecided, "", nil
	}
	var why error
	if err != nil {
		why = err
	} else if err := json.Unmarshal(b, &rec); err != nil {
		why = fmt.Errorf("decode: %w", err)
	} else if err := rec.validate(); err != nil {
		why = err
	}
	if why == nil {
		return rec, "", nil
	}
	aside := fmt.Sprintf("%s.corrupt-%s", s.path, s.now().UTC().Format("20060102T150405Z"))
	if err := os.Rename(s.path, aside); err != nil {
		s.log.Error("consent record unusable and could not be moved aside", "path", s.path, "why", why, "err", err)
		aside = s.path
	} else {
		s.log.Warn("consent record unusable; moved aside, not participating", "path", s.path, "moved_to", aside, "why", why)
	}
	notice = fmt.Sprintf("The saved participation choice could not be read (%v) and was set aside as %s. "+
		"Nothing is collected until you decide again.", why, aside)
	return undecided, notice, nil
}

// Remove deletes the record, so that it reads back as Undecided. It
// needs no free space, so it works when Save cannot.
func (s *Store) Remove() error {
	if err := os.Remove(s.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove consent record: %w", err)
	}
	if d, err := os.Open(filepath.Dir(s.path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// Save replaces the record atomically.
func (s *Store) Save(rec Record) error {
	rec.FormatVersion = recordFormat
	if err := rec.validate(); err != nil {
		return fmt.Errorf("save consent: %w", err)
	}
	b, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return err
	}
	return s.write(s.path, append(b, '\n'), 0o644)
}
