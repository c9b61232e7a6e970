package tray

import (
	"strings"
	"unicode/utf8"

	"github.com/cloudprotect/cloudprotect/agent/safetext"
)

// short is safetext.Line cut to at most max characters, ending in "…"
// when cut: a file name long enough to fill a menu or a notification
// cannot push the rest out of sight.
func short(s string, max int) string {
	s = safetext.Line(s)
	if max < 1 || utf8.RuneCountInString(s) <= max {
		return s
	}
	return string([]rune(s)[:max-1]) + "…"
}

var markupEscaper = strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;")

// markup is safetext.Line escaped for the body of a desktop notification,
// which servers that advertise "body-markup" read as a subset of HTML.
func markup(s string) string { return markupEscaper.Replace(safetext.Line(s)) }
