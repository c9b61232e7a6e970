package console

import (
	"fmt"
	"html/template"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/wire"
)

var funcs = template.FuncMap{
	"when":         when,
	"ago":          ago,
	"num":          num,
	"bytes":        humanBytes,
	"short":        func(h string) string { return h[:min(len(h), 16)] + "…" },
	"shown":        shown,
	"verdictClass": verdictClass,
	"sourceText":   sourceText,
	"barHeight":    barHeight,
	"hourLabel":    hourLabel,
	"verdicts": func() []string {
		return []string{wire.VerdictMalicious, wire.VerdictUntrusted, wire.VerdictUnknown, wire.VerdictTrusted}
	},
	"lists": func() []string { return []string{store.ListMalicious, store.ListUntrusted, store.ListTrusted} },
}

func when(t time.Time) string {
	if t.IsZero() {
		return "—"
	}
	return t.UTC().Format("2006-01-02 15:04 UTC")
}

func ago(t time.Time, now time.Time) string {
	if t.IsZero() {
		return "never"
	}
	d := now.Sub(t)
	switch {
	case d < 0:
		return "just now"
	case d < time.Minute:
		return "just now"
	case d < time.Hour:
		return fmt.Sprintf("%d min ago", int(d/time.Minute))
	case d < 48*time.Hour:
		return fmt.Sprintf("%d h ago", int(d/time.Hour))
	default:
		return fmt.Sprintf("%d days ago", int(d/(24*time.Hour)))
	}
}

// num writes an integer with thousands separators: 12,345.
func num(v any) string {
	var n int64
	switch x := v.(type) {
	case int:
		n = int64(x)
	case int64:
		n = x
	default:
		return fmt.Sprint(v)
	}
	s := strconv.FormatInt(n, 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

func humanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// bidi reports whether r changes the direction of the text around it.
func bidi(r rune) bool {
	return (r >= 0x202a && r <= 0x202e) || (r >= 0x2066 && r <= 0x2069) || r == 0x200e || r == 0x200f || r == 0x061c
}

// shown makes a string sent by an installation safe to read: direction
// overrides and invisible format characters appear as ⟨U+XXXX⟩, so a path
// cannot pretend to be another. html/template escapes the rest.
func shown(s string) string {
	var b strings.Builder
	for _, r := range s {
		if bidi(r) || unicode.Is(unicode.Cf, r) || unicode.IsControl(r) {
			fmt.Fprintf(&b, "⟨U+%04X⟩", r)
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

func verdictClass(v string) string {
	switch v {
	case wire.VerdictMalicious, wire.VerdictUntrusted, wire.VerdictTrusted, wire.VerdictUnknown, store.VerdictCleared:
		return "v-" + v
	}
	return "v-unknown"
}

func sourceText(source string) string {
	switch source {
	case wire.SourceAnalyst:
		return "an analyst"
	case wire.SourceFeed:
		return "a feed"
	case wire.SourcePrevalence:
		return "the network's reports"
	}
	return source
}

// barHeight is a bar's height in percent of the tallest, in steps of 5
// (a CSS class per step: the console's policy allows no inline style).
func barHeight(n, max int64) int {
	if max <= 0 || n <= 0 {
		return 0
	}
	return int(5 + 95*n/max/5*5)
}

// hourLabel names the i-th of the 24 hours ending with now's.
func hourLabel(i int, now time.Time) string {
	h := now.UTC().Truncate(time.Hour).Add(time.Duration(i-23) * time.Hour)
	return h.Format("15:00")
}
