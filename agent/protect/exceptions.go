package protect

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/internal/atomicfile"
	"github.com/cloudprotect/cloudprotect/wire"
)

// ExceptionsFile is the name of the exceptions file in the state folder.
const ExceptionsFile = "exceptions.json"

// Limits of exceptions.
const (
	MaxExceptions   = 10_000
	MaxReasonLength = 200 // characters
	maxFileSize     = 4 << 20
)

// Errors of Add and Remove; a message says what to do.
var (
	ErrBadHash   = errors.New("not a SHA-256: give 64 hexadecimal digits, as `cloudprotect blocked` shows them")
	ErrBadReason = fmt.Errorf("give a reason of 1 to %d printable characters", MaxReasonLength)
	ErrTooMany   = fmt.Errorf("there are already %d exceptions: remove some first", MaxExceptions)
	ErrNotFound  = errors.New("no exception for this SHA-256")
)

// Exceptions are the programs an administrator allowed on this machine
// whatever the Security Network says (`cloudprotect allow`), by SHA-256.
// Changes apply at once and are kept in the state folder.
//
// On disk, exceptions.json holds {"version": 1, "exceptions": [...]} (each
// an api.Exception), mode 0600. It is replaced atomically (temporary
// file, fsync, rename, fsync of the folder): a crash leaves the old list
// or the new one, never a mix. A change that cannot be written is not
// applied and the caller gets the error. A file that cannot be read as
// such a list is set aside as exceptions.json.corrupt-<UTC time>, nothing
// of it is lost, and no exception applies (the Security Network's verdicts
// do) until an administrator adds them again; Notice says so.
type Exceptions struct {
	path string

	mu     sync.RWMutex // protects byHash and notice
	byHash map[string]api.Exception
	notice string
}

type exceptionsFile struct {
	Version    int             `json:"version"`
	Exceptions []api.Exception `json:"exceptions"`
}

// OpenExceptions reads the exceptions at path; a missing file is none.
func OpenExceptions(path string) (*Exceptions, error) {
	x := &Exceptions{path: path, byHash: make(map[string]api.Exception)}
	b, err := readSmall(path)
	if errors.Is(err, fs.ErrNotExist) {
		return x, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read exceptions: %w", err)
	}
	list, perr := parseExceptions(b)
	if perr != nil {
		aside := path + ".corrupt-" + time.Now().UTC().Format("20060102T150405Z")
		if err := os.Rename(path, aside); err != nil {
			return nil, fmt.Errorf("set aside unreadable exceptions %s: %w", path, err)
		}
		x.notice = fmt.Sprintf("the local exceptions could not be read (%v) and were set aside as %s: "+
			"no exception applies until an administrator adds them again", perr, aside)
		return x, nil
	}
	for _, e := range list {
		x.byHash[e.SHA256] = e
	}
	return x, nil
}

func readSmall(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, maxFileSize+1))
}

// parseExceptions decodes and checks a file's content.
func parseExceptions(b []byte) ([]api.Exception, error) {
	if len(b) > maxFileSize {
		return nil, fmt.Errorf("larger than %d bytes", maxFileSize)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var f exceptionsFile
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("decode: %w", err)
	}
	if dec.More() {
		return nil, errors.New("extra data after the list")
	}
	if f.Version != 1 {
		return nil, fmt.Errorf("version %d, want 1", f.Version)
	}
	if len(f.Exceptions) > MaxExceptions {
		return nil, fmt.Errorf("%d exceptions, more than %d", len(f.Exceptions), MaxExceptions)
	}
	for _, e := range f.Exceptions {
		if !wire.ValidSHA256(e.SHA256) {
			return nil, fmt.Errorf("exception %q: %w", e.SHA256, ErrBadHash)
		}
		if !validReason(e.Reason) {
			return nil, fmt.Errorf("exception %s: %w", e.SHA256, ErrBadReason)
		}
	}
	return f.Exceptions, nil
}

// validReason accepts 1 to MaxReasonLength printable characters, none of
// them a control or bidirectional formatting character.
func validReason(s string) bool {
	n := utf8.RuneCountInString(s)
	if strings.TrimSpace(s) == "" || n > MaxReasonLength || !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if !unicode.IsPrint(r) && r != ' ' || unicode.Is(unicode.Bidi_Control, r) {
			return false
		}
	}
	return true
}

// NormalizeSHA256 lowercases and trims a hash typed by a person.
func NormalizeSHA256(s string) string { return strings.ToLower(strings.TrimSpace(s)) }

// Has reports whether the program with this SHA-256 is excepted. A nil
// *Exceptions has none.
func (x *Exceptions) Has(sha256 string) bool {
	if x == nil {
		return false
	}
	x.mu.RLock()
	defer x.mu.RUnlock()
	_, ok := x.byHash[sha256]
	return ok
}

// Len returns the number of exceptions.
func (x *Exceptions) Len() int {
	if x == nil {
		return 0
	}
	x.mu.RLock()
	defer x.mu.RUnlock()
	return len(x.byHash)
}

// Notice says what happened to an unreadable file, if one was set aside.
func (x *Exceptions) Notice() string {
	if x == nil {
		return ""
	}
	x.mu.RLock()
	defer x.mu.RUnlock()
	return x.notice
}

// List returns the exceptions, oldest first.
func (x *Exceptions) List() []api.Exception {
	if x == nil {
		return nil
	}
	x.mu.RLock()
	defer x.mu.RUnlock()
	return x.sortedLocked()
}

func (x *Exceptions) sortedLocked() []api.Exception {
	out := make([]api.Exception, 0, len(x.byHash))
	for _, e := range x.byHash {
		out = append(out, e)
	}
	slices.SortFunc(out, func(a, b api.Exception) int {
		if c := a.Added.Compare(b.Added); c != 0 {
			return c
		}
		return strings.Compare(a.SHA256, b.SHA256)
	})
	return out
}

// Add excepts the program with this SHA-256, for reason, on behalf of
// uid. Adding it again replaces the reason. The change is on disk when
// Add returns; if it cannot be written, nothing changes.
func (x *Exceptions) Add(sha256, reason string, uid int, now time.Time) (api.Exception, error) {
	sha256, reason = NormalizeSHA256(sha256), strings.TrimSpace(reason)
	if !wire.ValidSHA256(sha256) {
		return api.Exception{}, ErrBadHash
	}
	if !validReason(reason) {
		return api.Exception{}, ErrBadReason
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	old, had := x.byHash[sha256]
	if !had && len(x.byHash) >= MaxExceptions {
		return api.Exception{}, ErrTooMany
	}
	e := api.Exception{SHA256: sha256, Reason: reason, Added: now.UTC().Truncate(time.Second), UID: uid}
	x.byHash[sha256] = e
	if err := x.saveLocked(); err != nil {
		if had {
			x.byHash[sha256] = old
		} else {
			delete(x.byHash, sha256)
		}
		return api.Exception{}, err
	}
	return e, nil
}

// Remove deletes the exception for this SHA-256 (ErrNotFound if there is
// none). The change is on disk when Remove returns.
func (x *Exceptions) Remove(sha256 string) error {
	sha256 = NormalizeSHA256(sha256)
	if !wire.ValidSHA256(sha256) {
		return ErrBadHash
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	old, ok := x.byHash[sha256]
	if !ok {
		return ErrNotFound
	}
	delete(x.byHash, sha256)
	if err := x.saveLocked(); err != nil {
		x.byHash[sha256] = old
		return err
	}
	return nil
}

func (x *Exceptions) saveLocked() error {
	b, err := json.MarshalIndent(exceptionsFile{Version: 1, Exceptions: x.sortedLocked()}, "", "  ")
	if err != nil {
		return fmt.Errorf("save exceptions: %w", err)
	}
	if err := atomicfile.Write(x.path, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("save exceptions: %w", err)
	}
	return nil
}
