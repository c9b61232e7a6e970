package wire

import (
	"fmt"
	"strings"
	"time"
	"unicode/utf8"
)

// Field limits a valid batch respects. The server rejects a batch that
// breaks one with 422 naming the record and the field; the agent can run
// the same checks before it queues a record.
const (
	// MaxExecCount bounds the executions one record may report: far more
	// than a program can be run between two uploads, small enough that
	// sums never overflow.
	MaxExecCount = 1_000_000_000
	// MaxFileSize bounds a reported file size (1 TiB).
	MaxFileSize = 1 << 40
	// MaxPathLen bounds Path and Interpreter, in bytes (PATH_MAX).
	MaxPathLen = 4096
	// MaxBatchIDLen bounds BatchID, in bytes.
	MaxBatchIDLen = 128
	// MaxClockSkew is how far in the future a time may lie.
	MaxClockSkew = 24 * time.Hour
)

// Earliest is the earliest time a record may report: nothing the agent
// saw can be older than the Security Network.
var Earliest = time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)

// Kinds of executable a record may report.
const (
	KindELF    = "elf"
	KindScript = "script"
	KindOther  = "other"
)

// FieldError says which field of which record is invalid and why.
type FieldError struct {
	Index  int    // record index, or -1 for a batch-level field
	Field  string // JSON name, e.g. "sha256" or "elf.build_id"
	Reason string
}

func (e *FieldError) Error() string {
	if e.Index < 0 {
		return fmt.Sprintf("%s: %s", e.Field, e.Reason)
	}
	return fmt.Sprintf("records[%d].%s: %s", e.Index, e.Field, e.Reason)
}

// ValidSHA256 reports whether s is 64 lowercase hex digits.
func ValidSHA256(s string) bool {
	if len(s) != 64 {
		return false
	}
	return isLowerHex(s)
}

// ValidBatchID reports whether id can be a batch ID: 1 to MaxBatchIDLen
// characters from [A-Za-z0-9._:-].
func ValidBatchID(id string) bool {
	if id == "" || len(id) > MaxBatchIDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case c == '.', c == '_', c == ':', c == '-':
		default:
			return false
		}
	}
	return true
}

// Validate checks a batch field by field as of now. It returns a
// *FieldError for the first invalid field, or nil. It does not check the
// number of records against MaxBatchRecords: that is a size limit, which
// the decoder enforces.
func (b *Batch) Validate(now time.Time) error {
	if !ValidBatchID(b.BatchID) {
		return &FieldError{Index: -1, Field: "batch_id", Reason: "want 1 to 128 characters from [A-Za-z0-9._:-]"}
	}
	if b.StatementVersion < 1 {
		return &FieldError{Index: -1, Field: "statement_version", Reason: "want 1 or more"}
	}
	if len(b.Records) == 0 {
		return &FieldError{Index: -1, Field: "records", Reason: "empty: a batch holds at least one record"}
	}
	for i := range b.Records {
		if err := b.Records[i].validate(now); err != nil {
			err.Index = i
			return err
		}
	}
	return nil
}

func (r *Record) validate(now time.Time) *FieldError {
	bad := func(field, reason string) *FieldError {
		return &FieldError{Field: field, Reason: reason}
	}
	if !ValidSHA256(r.SHA256) {
		return bad("sha256", "want 64 lowercase hex digits")
	}
	if r.Size < 0 || r.Size > MaxFileSize {
		return bad("size", fmt.Sprintf("want 0 to %d bytes", int64(MaxFileSize)))
	}
	if reason := CheckPath(r.Path); reason != "" {
		return bad("path", reason)
	}
	switch r.Kind {
	case KindELF:
	case KindScript, KindOther:
		if r.ELF != nil {
			return bad("elf", "present although kind is not \"elf\"")
		}
	default:
		return bad("kind", `want "elf", "script" or "other"`)
	}
	if r.Interpreter != "" {
		if reason := CheckPath(r.Interpreter); reason != "" {
			return bad("interpreter", reason)
		}
	}
	if e := r.ELF; e != nil {
		if !isToken(e.Machine, 32) {
			return bad("elf.machine", "want at most 32 printable characters without spaces")
		}
		if !isToken(e.Type, 16) {
			return bad("elf.type", "want at most 16 printable characters without spaces")
		}
		if e.Interpreter != "" {
			if reason := CheckPath(e.Interpreter); reason != "" {
				return bad("elf.interpreter", reason)
			}
		}
		if len(e.BuildID) > 128 || len(e.BuildID)%2 != 0 || !isLowerHex(e.BuildID) {
			return bad("elf.build_id", "want an even number of lowercase hex digits, at most 128")
		}
		if len(e.Malformed) > 256 || !isPrintable(e.Malformed) {
			return bad("elf.malformed", "want at most 256 printable characters")
		}
	}
	if r.ExecCount > MaxExecCount {
		return bad("exec_count", fmt.Sprintf("want at most %d", MaxExecCount))
	}
	latest := now.Add(MaxClockSkew)
	if r.FirstSeen.Before(Earliest) || r.FirstSeen.After(latest) {
		return bad("first_seen", "want a time between 2020 and now")
	}
	if r.LastSeen.Before(Earliest) || r.LastSeen.After(latest) {
		return bad("last_seen", "want a time between 2020 and now")
	}
	if r.LastSeen.Before(r.FirstSeen) {
		return bad("last_seen", "before first_seen")
	}
	return nil
}

// CheckPath returns why p is not an acceptable anonymised path, or "".
// The agent's anonymiser never produces a path it refuses.
func CheckPath(p string) string {
	switch {
	case p == "":
		return "empty"
	case len(p) > MaxPathLen:
		return fmt.Sprintf("longer than %d bytes", MaxPathLen)
	case !utf8.ValidString(p) || !isPrintable(p):
		return "not printable UTF-8"
	case p[0] != '/' && p[0] != '~':
		return `want an absolute path or one starting with "~"`
	case strings.Contains(p, "/home/") || strings.Contains(p, "/root/") || p == "/root" || p == "/home":
		return `holds a user's home directory: anonymise it as "~/"`
	}
	return ""
}

func isLowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// isPrintable reports whether s holds no control characters.
func isPrintable(s string) bool {
	for _, c := range s {
		if c < 0x20 || c == 0x7f || (c >= 0x80 && c < 0xa0) || c == utf8.RuneError {
			return false
		}
	}
	return true
}

// isToken reports whether s is at most max printable ASCII characters
// without spaces.
func isToken(s string, max int) bool {
	if len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] >= 0x7f {
			return false
		}
	}
	return true
}

// UnknownPath stands for a path that could not be learned or kept.
const UnknownPath = "/(unknown)"

// SanitizePath turns an anonymised path into one CheckPath accepts:
// control characters and invalid UTF-8 become "?", and it is cut to
// MaxPathLen. A path that is empty or relative gives "": it cannot be
// made into a path, and a caller must not send it as one.
func SanitizePath(p string) string {
	if p == "" || (p[0] != '/' && p[0] != '~') {
		return ""
	}
	if isPrintable(p) && len(p) <= MaxPathLen && utf8.ValidString(p) {
		return p
	}
	var b strings.Builder
	for _, c := range p {
		if c < 0x20 || c == 0x7f || (c >= 0x80 && c < 0xa0) || c == utf8.RuneError {
			c = '?'
		}
		if b.Len()+utf8.RuneLen(c) > MaxPathLen {
			break
		}
		b.WriteRune(c)
	}
	return b.String()
}
