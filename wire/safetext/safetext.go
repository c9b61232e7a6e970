// Package safetext makes strings that come from files and other people
// safe to show a person: file names and paths in alerts, the status, the
// queue. A hostile file name must not be able to break a line, reorder
// what is shown with bidirectional controls (a right-to-left override
// turns "evil‮fdp.exe" into "evilexe.pdf"), hide text with invisible
// characters, or inject markup into a desktop notification.
//
// The command line and the tray both show such strings through this
// package.
package safetext

import (
	"strings"
	"unicode"
	"unicode/utf8"
)

// Replacement stands in for every character Line neutralises.
const Replacement = '?'

// Line returns s as one line that shows what it is: control characters
// (newlines and tabs included), line and paragraph separators, format
// characters (bidirectional overrides, embeddings and isolates,
// zero-width characters, the byte order mark) and invalid UTF-8 each
// become Replacement.
func Line(s string) string {
	if clean(s) {
		return s
	}
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		if (r == utf8.RuneError && n == 1) || neutralised(r) {
			b.WriteRune(Replacement)
		} else {
			b.WriteString(s[i : i+n])
		}
		i += n
	}
	return b.String()
}

func clean(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x20 || c >= 0x7f {
			return false
		}
	}
	return true
}

func neutralised(r rune) bool {
	return unicode.IsControl(r) || unicode.In(r, unicode.Cf, unicode.Zl, unicode.Zp)
}

// Short is Line cut to at most max characters, ending in "…" when cut.
func Short(s string, max int) string {
	s = Line(s)
	if max < 1 || utf8.RuneCountInString(s) <= max {
		return s
	}
	rs := []rune(s)
	return string(rs[:max-1]) + "…"
}

var markup = strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;")

// Markup is Line escaped for the body of a desktop notification, which
// servers that advertise "body-markup" read as a subset of HTML.
func Markup(s string) string { return markup.Replace(Line(s)) }
