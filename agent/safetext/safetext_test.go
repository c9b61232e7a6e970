package safetext

import (
	"testing"
	"unicode/utf8"
)

func TestLine(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, in, want string }{
		{"plain", "~/Downloads/tool", "~/Downloads/tool"},
		{"other scripts", "~/Загрузки/программа-été", "~/Загрузки/программа-été"},
		{"right-to-left override", "~/Downloads/invoice\u202Etxt.exe", "~/Downloads/invoice?txt.exe"},
		{"every bidi control", "a\u202Ab\u202Bc\u202Cd\u202De\u202Ef\u2066g\u2067h\u2068i\u2069j\u200Ek\u200Fl\u061Cm", "a?b?c?d?e?f?g?h?i?j?k?l?m"},
		{"zero width", "ad\u200Bmin\u200D\uFEFF", "ad?min??"},
		{"soft hyphen", "pay\u00ADroll", "pay?roll"},
		{"line breaks", "tool\nPlease call 555-0100\r", "tool?Please call 555-0100?"},
		{"line separators", "a\u2028b\u2029c", "a?b?c"},
		{"terminal escape", "\x1b[31mred\x1b[0m", "?[31mred?[0m"},
		{"C1 control", "a\u0085b\u009bc", "a?b?c"},
		{"invalid UTF-8", "bad\xff\xfename", "bad?name"},
		{"empty", "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := Line(tc.in); got != tc.want {
				t.Errorf("Line(%q) = %q, want %q", tc.in, got, tc.want)
			}
			if Clean(tc.in) != (tc.in == tc.want) {
				t.Errorf("Clean(%q) = %v", tc.in, Clean(tc.in))
			}
		})
	}
}

func FuzzLine(f *testing.F) {
	for _, s := range []string{"~/x", "a\u202Eb", "\xff", "\n"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got := Line(s)
		if !utf8.ValidString(got) || !Clean(got) {
			t.Fatalf("Line(%q) = %q is not clean", s, got)
		}
		if Line(got) != got {
			t.Fatalf("Line is not idempotent on %q", s)
		}
		if Clean(s) && got != s {
			t.Fatalf("Line changed the clean %q to %q", s, got)
		}
	})
}
