package wire

import (
	"strings"
	"testing"
)

func TestValidSHA256(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		in   string
		want bool
	}{
		{"lowercase", strings.Repeat("0123456789abcdef", 4), true},
		{"uppercase", strings.Repeat("0123456789ABCDEF", 4), false},
		{"short", strings.Repeat("a", 63), false},
		{"long", strings.Repeat("a", 65), false},
		{"not hex", strings.Repeat("g", 64), false},
		{"empty", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := ValidSHA256(tc.in); got != tc.want {
				t.Errorf("ValidSHA256(%q) = %v; want %v", tc.in, got, tc.want)
			}
		})
	}
}

func TestValidBatchID(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		in   string
		want bool
	}{
		{"ulid", "01JQ7Z3K5VEXAMPLE", true},
		{"uuid", "0b7d2c1e-3f4a-4b5c-8d9e-0f1a2b3c4d5e", true},
		{"punctuation", "a.b_c:d-e", true},
		{"empty", "", false},
		{"space", "a b", false},
		{"slash", "a/b", false},
		{"non-ASCII", "é", false},
		{"too long", strings.Repeat("a", MaxBatchIDLen+1), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := ValidBatchID(tc.in); got != tc.want {
				t.Errorf("ValidBatchID(%q) = %v; want %v", tc.in, got, tc.want)
			}
		})
	}
}

func TestCheckPath(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, in string
		ok       bool
	}{
		{"system", "/usr/bin/ls", true},
		{"anonymised home", "~/bin/tool", true},
		{"home", "/home/alice/tool", false},
		{"nested home", "/mnt/home/alice/x", false},
		{"root home", "/root/x", false},
		{"root exactly", "/root", false},
		{"rootfs is fine", "/rootfs/x", true},
		{"relative", "bin/x", false},
		{"control character", "/usr/bin/a\nb", false},
		{"invalid UTF-8", "/usr/bin/\xff", false},
		{"too long", "/" + strings.Repeat("a", MaxPathLen), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := CheckPath(tc.in) == ""; got != tc.ok {
				t.Errorf("CheckPath(%q) = %q; want ok %v", tc.in, CheckPath(tc.in), tc.ok)
			}
		})
	}
}
