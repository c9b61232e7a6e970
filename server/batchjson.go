package server

import (
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/cloudprotect/cloudprotect/wire"
)

// parseBatch decodes a statistics batch from JSON. It accepts a subset of
// what encoding/json would accept into wire.Batch with unknown fields
// disallowed, and decodes it to the same values (FuzzParseBatchAgrees
// holds it to that): member names must match exactly and appear once,
// strings must be valid UTF-8 without lone surrogates, numbers must be
// whole. It is the server's own work on every batch, so it reads the text
// once, without reflection. At most maxRecords records are decoded; more
// is an errTooManyRecords.
func parseBatch(data []byte, maxRecords int) (*wire.Batch, error) {
	p := &jsonParser{data: data, rec: -1}
	var b wire.Batch
	err := p.object("", func(key string) error {
		switch key {
		case "batch_id":
			return p.str(&b.BatchID)
		case "statement_version":
			return p.int(&b.StatementVersion)
		case "records":
			return p.records(&b.Records, maxRecords)
		}
		return p.unknown(key)
	})
	if err != nil {
		return nil, err
	}
	p.space()
	if p.i != len(p.data) {
		return nil, errTrailing
	}
	return &b, nil
}

// errTooManyRecords is returned by parseBatch for a batch beyond its
// record limit.
type errTooManyRecords struct{}

func (errTooManyRecords) Error() string { return "too many records" }

// jsonError is a syntax or type error at a place in the batch. A content
// error is well-formed JSON whose text is unusable (invalid UTF-8, a lone
// surrogate): like a field out of range, it is the record's fault.
type jsonError struct {
	path    string // "records[3].size", or "" for the top level
	msg     string
	content bool
}

func (e *jsonError) Error() string {
	if e.path == "" {
		return e.msg
	}
	return e.path + ": " + e.msg
}

var errTrailing = &jsonError{msg: "data after the JSON object"}

type jsonParser struct {
	data []byte
	i    int
	// Where values are being read, for errors: the record's index (-1
	// outside records), the object within it ("" or "elf") and the member.
	rec      int
	sub, key string
}

// where names the place being read: "records[3].elf.machine".
func (p *jsonParser) where() string {
	var parts []string
	if p.rec >= 0 {
		parts = append(parts, fmt.Sprintf("records[%d]", p.rec))
	}
	if p.sub != "" {
		parts = append(parts, p.sub)
	}
	if p.key != "" {
		parts = append(parts, p.key)
	}
	return strings.Join(parts, ".")
}

func (p *jsonParser) fail(format string, args ...any) error {
	return &jsonError{path: p.where(), msg: fmt.Sprintf(format, args...)}
}

func (p *jsonParser) failContent(msg string) error {
	return &jsonError{path: p.where(), msg: msg, content: true}
}

func (p *jsonParser) space() {
	for p.i < len(p.data) {
		switch p.data[p.i] {
		case ' ', '\t', '\n', '\r':
			p.i++
		default:
			return
		}
	}
}

// peek returns the next byte after white space, or 0 at the end.
func (p *jsonParser) peek() byte {
	p.space()
	if p.i >= len(p.data) {
		return 0
	}
	return p.data[p.i]
}

// null consumes a null if one comes next.
func (p *jsonParser) null() (bool, error) {
	if p.peek() != 'n' {
		return false, nil
	}
	if len(p.data)-p.i < 4 || string(p.data[p.i:p.i+4]) != "null" {
		return false, p.fail("invalid JSON value")
	}
	p.i += 4
	return true, nil
}

// object reads an object, calling member for each member's name with the
// reader at its value. sub names the object within a record, for errors.
func (p *jsonParser) object(sub string, member func(key string) error) error {
	p.sub, p.key = sub, ""
	if p.peek() != '{' {
		return p.fail("want a JSON object")
	}
	p.i++
	var (
		seen [16]string // the names read so far; objects here have fewer members
		n    int
	)
	if p.peek() == '}' {
		p.i++
		return nil
	}
	for {
		p.sub, p.key = sub, ""
		if p.peek() != '"' {
			return p.fail("want a member name")
		}
		key, err := p.rawString()
		if err != nil {
			return err
		}
		for _, k := range seen[:n] {
			if k == key {
				return p.fail("member %q appears twice", key)
			}
		}
		if n == len(seen) {
			return p.fail("too many members")
		}
		seen[n] = key
		n++
		if p.peek() != ':' {
			return p.fail("want ':' after %q", key)
		}
		p.i++
		p.key = key
		if err := member(key); err != nil {
			return err
		}
		p.sub, p.key = sub, ""
		switch p.peek() {
		case ',':
			p.i++
		case '}':
			p.i++
			return nil
		default:
			return p.fail("want ',' or '}' in an object")
		}
	}
}

func (p *jsonParser) unknown(key string) error {
	p.key = ""
	return p.fail("unknown field %q", key)
}

func (p *jsonParser) records(out *[]wire.Record, maxRecords int) error {
	if ok, err := p.null(); ok || err != nil {
		*out = nil
		return err
	}
	if p.peek() != '[' {
		return p.fail("want an array of records")
	}
	p.i++
	recs := make([]wire.Record, 0, min(maxRecords, 1024))
	if p.peek() == ']' {
		p.i++
		*out = recs
		return nil
	}
	for {
		if len(recs) == maxRecords {
			return errTooManyRecords{}
		}
		recs = append(recs, wire.Record{})
		p.rec = len(recs) - 1
		if err := p.record(&recs[p.rec]); err != nil {
			return err
		}
		p.rec, p.sub, p.key = -1, "", "records"
		switch p.peek() {
		case ',':
			p.i++
		case ']':
			p.i++
			*out = recs
			return nil
		default:
			return p.fail("want ',' or ']' in an array")
		}
	}
}

func (p *jsonParser) record(r *wire.Record) error {
	return p.object("", func(key string) error {
		switch key {
		case "sha256":
			return p.str(&r.SHA256)
		case "size":
			return p.int64(&r.Size)
		case "path":
			return p.str(&r.Path)
		case "kind":
			return p.str(&r.Kind)
		case "elf":
			if ok, err := p.null(); ok || err != nil {
				r.ELF = nil
				return err
			}
			r.ELF = &wire.ELF{}
			if err := p.elf(r.ELF); err != nil {
				return err
			}
			p.sub = ""
			return nil
		case "interpreter":
			return p.str(&r.Interpreter)
		case "package_managed":
			return p.bool(&r.PackageManaged)
		case "exec_count":
			return p.uint64(&r.ExecCount)
		case "loaded":
			return p.bool(&r.Loaded)
		case "first_seen":
			return p.time(&r.FirstSeen)
		case "last_seen":
			return p.time(&r.LastSeen)
		}
		return p.unknown(key)
	})
}

func (p *jsonParser) elf(e *wire.ELF) error {
	return p.object("elf", func(key string) error {
		switch key {
		case "machine":
			return p.str(&e.Machine)
		case "type":
			return p.str(&e.Type)
		case "static":
			return p.bool(&e.Static)
		case "pie":
			return p.bool(&e.PIE)
		case "interpreter":
			return p.str(&e.Interpreter)
		case "build_id":
			return p.str(&e.BuildID)
		case "malformed":
			return p.str(&e.Malformed)
		}
		return p.unknown(key)
	})
}

// str reads a string, or a null (which leaves it as it was, as
// encoding/json does).
func (p *jsonParser) str(s *string) error {
	if ok, err := p.null(); ok || err != nil {
		return err
	}
	if p.peek() != '"' {
		return p.fail("want a string")
	}
	v, err := p.rawString()
	if err != nil {
		return err
	}
	*s = v
	return nil
}

// rawString reads a string at p.i (a '"').
func (p *jsonParser) rawString() (string, error) {
	p.i++ // the opening quote
	start := p.i
	// Fast path: no escapes.
	for p.i < len(p.data) {
		c := p.data[p.i]
		switch {
		case c == '"':
			s := p.data[start:p.i]
			p.i++
			if !utf8.Valid(s) {
				return "", p.failContent("not valid UTF-8")
			}
			return intern(s), nil
		case c == '\\':
			return p.escapedString(start)
		case c < 0x20:
			return "", p.fail("a control character in a string")
		}
		p.i++
	}
	return "", p.fail("an unterminated string")
}

func (p *jsonParser) escapedString(start int) (string, error) {
	buf := append([]byte(nil), p.data[start:p.i]...)
	for p.i < len(p.data) {
		c := p.data[p.i]
		switch {
		case c == '"':
			p.i++
			if !utf8.Valid(buf) {
				return "", p.failContent("not valid UTF-8")
			}
			return string(buf), nil
		case c < 0x20:
			return "", p.fail("a control character in a string")
		case c != '\\':
			buf = append(buf, c)
			p.i++
			continue
		}
		if p.i+1 >= len(p.data) {
			break
		}
		esc := p.data[p.i+1]
		p.i += 2
		switch esc {
		case '"', '\\', '/':
			buf = append(buf, esc)
		case 'b':
			buf = append(buf, '\b')
		case 'f':
			buf = append(buf, '\f')
		case 'n':
			buf = append(buf, '\n')
		case 'r':
			buf = append(buf, '\r')
		case 't':
			buf = append(buf, '\t')
		case 'u':
			r, ok := p.hex4()
			if !ok {
				return "", p.fail("a bad \\u escape in a string")
			}
			if utf16.IsSurrogate(r) {
				if p.i+1 >= len(p.data) || p.data[p.i] != '\\' || p.data[p.i+1] != 'u' {
					return "", p.failContent("a lone surrogate in a string")
				}
				p.i += 2
				r2, ok := p.hex4()
				if !ok {
					return "", p.fail("a bad \\u escape in a string")
				}
				if r = utf16.DecodeRune(r, r2); r == utf8.RuneError {
					return "", p.failContent("a lone surrogate in a string")
				}
			}
			buf = utf8.AppendRune(buf, r)
		default:
			return "", p.fail("a bad escape in a string")
		}
	}
	return "", p.fail("an unterminated string")
}

func (p *jsonParser) hex4() (rune, bool) {
	if len(p.data)-p.i < 4 {
		return 0, false
	}
	var r rune
	for _, c := range p.data[p.i : p.i+4] {
		r <<= 4
		switch {
		case c >= '0' && c <= '9':
			r |= rune(c - '0')
		case c >= 'a' && c <= 'f':
			r |= rune(c - 'a' + 10)
		case c >= 'A' && c <= 'F':
			r |= rune(c - 'A' + 10)
		default:
			return 0, false
		}
	}
	p.i += 4
	return r, true
}

// number returns the text of a whole number: an optional minus and digits
// without leading zeros. Fractions and exponents are refused.
func (p *jsonParser) number() (string, error) {
	p.space()
	start := p.i
	if p.i < len(p.data) && p.data[p.i] == '-' {
		p.i++
	}
	digits := p.i
	for p.i < len(p.data) && p.data[p.i] >= '0' && p.data[p.i] <= '9' {
		p.i++
	}
	n := p.i - digits
	if n == 0 || (n > 1 && p.data[digits] == '0') {
		return "", p.fail("want a whole number")
	}
	if p.i < len(p.data) {
		switch p.data[p.i] {
		case '.', 'e', 'E':
			return "", p.fail("want a whole number")
		}
	}
	return string(p.data[start:p.i]), nil
}

func (p *jsonParser) int64(v *int64) error {
	if ok, err := p.null(); ok || err != nil {
		return err
	}
	s, err := p.number()
	if err != nil {
		return err
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return p.fail("number %s out of range", s)
	}
	*v = n
	return nil
}

func (p *jsonParser) int(v *int) error {
	n := int64(*v)
	if err := p.int64(&n); err != nil {
		return err
	}
	if int64(int(n)) != n {
		return p.fail("number %d out of range", n)
	}
	*v = int(n)
	return nil
}

func (p *jsonParser) uint64(v *uint64) error {
	if ok, err := p.null(); ok || err != nil {
		return err
	}
	s, err := p.number()
	if err != nil {
		return err
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return p.fail("number %s out of range", s)
	}
	*v = n
	return nil
}

func (p *jsonParser) bool(v *bool) error {
	if ok, err := p.null(); ok || err != nil {
		return err
	}
	rest := p.data[p.i:]
	switch {
	case len(rest) >= 4 && string(rest[:4]) == "true":
		*v = true
		p.i += 4
	case len(rest) >= 5 && string(rest[:5]) == "false":
		*v = false
		p.i += 5
	default:
		return p.fail("want true or false")
	}
	return nil
}

// time reads a time as encoding/json does: time.Time.UnmarshalJSON on
// the quoted text (RFC 3339), which knows no escapes.
func (p *jsonParser) time(t *time.Time) error {
	if ok, err := p.null(); ok || err != nil {
		return err
	}
	if p.peek() != '"' {
		return p.fail("want a time as an RFC 3339 string")
	}
	start := p.i
	p.i++
	for p.i < len(p.data) && p.data[p.i] != '"' {
		if c := p.data[p.i]; c == '\\' || c < 0x20 {
			return p.fail("want a time as an RFC 3339 string")
		}
		p.i++
	}
	if p.i >= len(p.data) {
		return p.fail("an unterminated string")
	}
	p.i++
	if err := t.UnmarshalJSON(p.data[start:p.i]); err != nil {
		return p.fail("want a time as an RFC 3339 string")
	}
	return nil
}

// intern returns the common short strings of a batch (member names,
// kinds, machines) without allocating.
func intern(b []byte) string {
	switch string(b) {
	case "sha256":
		return "sha256"
	case "size":
		return "size"
	case "path":
		return "path"
	case "kind":
		return "kind"
	case "elf":
		return "elf"
	case "interpreter":
		return "interpreter"
	case "package_managed":
		return "package_managed"
	case "exec_count":
		return "exec_count"
	case "loaded":
		return "loaded"
	case "first_seen":
		return "first_seen"
	case "last_seen":
		return "last_seen"
	case "machine":
		return "machine"
	case "type":
		return "type"
	case "static":
		return "static"
	case "pie":
		return "pie"
	case "build_id":
		return "build_id"
	case "malformed":
		return "malformed"
	case "script", "other":
		return string(b)
	case "x86_64":
		return "x86_64"
	case "aarch64":
		return "aarch64"
	case "dyn":
		return "dyn"
	case "exec":
		return "exec"
	case "":
		return ""
	case "/lib64/ld-linux-x86-64.so.2":
		return "/lib64/ld-linux-x86-64.so.2"
	}
	return string(b)
}
