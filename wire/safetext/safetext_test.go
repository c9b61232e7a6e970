package safetext

import (
	"strings"
	"testing"
)

func TestLine(t *testing.T) {
	tests := []struct{ name, in, want string }{
		{"plain", "/usr/bin/ls", "/usr/bin/ls"},
		{"unicode kept", "~/Загрузки/tést €", "~/Загрузки/tést €"},
		{"newline", "a\nb\r\tc", "a?b??c"},
		{"right-to-left override", "invoice\u202Efdp.exe", "invoice?fdp.exe"},
		{"isolates and marks", "\u2066a\u2069\u200Eb\u200Fc\u061C", "?a??b?c?"},
		{"zero width and BOM", "pay\u200Bpal\uFEFF", "pay?pal?"},
		{"line separator", "a\u2028b\u2029c", "a?b?c"},
		{"C1 control", "a\u0085b\u009bc", "a?b?c"},
		{"escape sequence", "\x1b[31mred", "?[31mred"},
		{"invalid UTF-8", "a\xffb", "a?b"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Line(tt.in); got != tt.want {
				t.Errorf("Line(%q) = %q, want %q", tt.in, got, tt.want)
			}
		})
	}
}

func TestMarkup(t *testing.T) {
	got := Markup(`<b>x</b> & <a href="http://evil">y</a>` + "\u202E")
	want := `&lt;b&gt;x&lt;/b&gt; &amp; &lt;a href="http://evil"&gt;y&lt;/a&gt;?`
	if got != want {
		t.Errorf("Markup = %q, want %q", got, want)
	}
}

func TestShort(t *testing.T) {
	if got := Short(strings.Repeat("я", 10), 5); got != "яяяя…" {
		t.Errorf("Short = %q", got)
	}
	if got := Short("abc", 5); got != "abc" {
		t.Errorf("Short = %q", got)
	}
}

func FuzzLine(f *testing.F) {
	f.Add("invoice\u202Efdp.exe\n<b>")
	f.Fuzz(func(t *testing.T, s string) {
		out := Line(s)
		for _, r := range out {
			if neutralised(r) {
				t.Fatalf("Line(%q) = %q keeps %U", s, out, r)
			}
		}
		if m := Markup(s); strings.ContainsAny(m, "<>") {
			t.Fatalf("Markup(%q) = %q", s, m)
		}
	})
}
