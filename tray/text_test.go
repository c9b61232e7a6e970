package tray

import (
	"strings"
	"testing"
)

func TestMarkup(t *testing.T) {
	got := markup(`<b>x</b> & <a href="http://evil">y</a>` + "\u202E\n")
	want := `&lt;b&gt;x&lt;/b&gt; &amp; &lt;a href="http://evil"&gt;y&lt;/a&gt;??`
	if got != want {
		t.Errorf("markup = %q, want %q", got, want)
	}
}

func TestShort(t *testing.T) {
	if got := short(strings.Repeat("я", 10), 5); got != "яяяя…" {
		t.Errorf("short = %q", got)
	}
	if got := short("a\u202Ebc", 5); got != "a?bc" {
		t.Errorf("short = %q", got)
	}
}
