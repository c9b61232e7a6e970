// Package safetext makes text from untrusted places (file names, paths,
// anything a local user or a server could choose) safe to show to a
// person on a terminal, in the tray's menu or in a notification. The CLI,
// the tray and the agent's alerts all call it, so every surface shows the
// same, harmless text.
package safetext

import (
	"strings"
	"unicode"
	"unicode/utf8"
)

// Replacement is what a neutralised character is shown as.
const Replacement = '?'

// Line returns s as one line that reads as what it is: every character
// that changes how the text around it is shown is replaced by "?":
// control characters (line breaks, escape sequences for terminals),
// bidirectional controls (U+202A–U+202E, U+2066–U+2069, U+200E, U+200F,
// U+061C: a file named "txt.exe" written backwards to look like
// "exe.txt"), other invisible format characters (zero-width spaces and
// joiners, soft hyphens), line and paragraph separators, and invalid
// UTF-8. Printable text, in any script, is left as it is.
func Line(s string) string {
	if clean(s) {
		return s
	}
	return strings.Map(func(r rune) rune {
		if bad(r) {
			return Replacement
		}
		return r
	}, strings.ToValidUTF8(s, string(Replacement)))
}

// Clean reports whether Line would leave s unchanged.
func Clean(s string) bool { return clean(s) }

func clean(s string) bool {
	for i, r := range s {
		if r == utf8.RuneError {
			if _, n := utf8.DecodeRuneInString(s[i:]); n <= 1 {
				return false
			}
		}
		if bad(r) {
			return false
		}
	}
	return true
}

// bad reports whether r changes how the text around it reads. Bidi
// controls and zero-width characters are in Unicode's Cf (format) class.
func bad(r rune) bool {
	return unicode.IsControl(r) || unicode.Is(unicode.Cf, r) ||
		unicode.Is(unicode.Zl, r) || unicode.Is(unicode.Zp, r) ||
		unicode.Is(unicode.Bidi_Control, r)
}
