package feed

import (
	"crypto/sha256"
	"encoding/hex"
	"slices"
	"strings"
	"testing"
)

func hashOf(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

func TestRead(t *testing.T) {
	t.Parallel()
	a, b := hashOf("a"), hashOf("b")
	bazaar := `################################################################
# MalwareBazaar full malware samples dump (CSV)                #
#                                                              #
################################################################
#
# "first_seen_utc","sha256_hash","md5_hash","sha1_hash","reporter","file_name"
"2026-02-27 10:11:12", "` + a + `", "0cc175b9c0f1b6a831c399e269772661", "x", "someone", "invoice, march.exe"
"2026-02-27 10:12:13", "` + strings.ToUpper(b) + `", "x", "x", "someone", "a ""quoted"" name"
#
# Number of entries: 2
`
	tests := []struct {
		name    string
		in      string
		want    []string
		wantErr string
	}{
		{"empty", "", nil, ""},
		{"comments and blanks", "# list\n\n  " + a + "  \n" + b + " # the b file\n", []string{a, b}, ""},
		{"uppercase is lowered", strings.ToUpper(a) + "\n", []string{a}, ""},
		{"CRLF and BOM", "\ufeff" + a + "\r\n" + b + "\r\n", []string{a, b}, ""},
		{"short hash", a + "\n\nabc\n", nil, "list.txt:3: not a SHA-256"},
		{"sha256sum format", a + "  /usr/bin/a\n", nil, "list.txt:1:"},
		{"not hex", strings.Repeat("g", 64), nil, "list.txt:1:"},
		{"malware export with a commented header", bazaar, []string{a, b}, ""},
		{"CSV with a plain header", "sha256,name\n" + a + ",x\n\"" + b + "\",y\n", []string{a, b}, ""},
		{"CSV without a hash column", "md5,name\n" + a + ",x\n", nil, "list.txt:1: a CSV line before any header"},
		{"CSV record too short", "name,sha256_hash\nx\n", nil, "list.txt:2: the record has 1 fields"},
		{"CSV bad hash", "sha256_hash,name\nnope,x\n", nil, `list.txt:2: not a SHA-256 (64 hex digits): "nope"`},
		{"line too long", strings.Repeat("a", maxLine+1), nil, "longer than"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := Read("list.txt", strings.NewReader(tc.in))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || got != nil {
					t.Fatalf("Read = %v, %v; want error containing %q and nothing read", got, err, tc.wantErr)
				}
				return
			}
			if err != nil || !slices.Equal(got, tc.want) {
				t.Fatalf("Read = %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

func FuzzRead(f *testing.F) {
	f.Add("sha256_hash\n" + hashOf("x") + "\n")
	f.Add("# \"a\",\"sha256_hash\"\n\"1\",\"" + hashOf("y") + "\"\n")
	f.Add(hashOf("z") + " # c\n")
	f.Fuzz(func(t *testing.T, in string) {
		got, err := Read("f", strings.NewReader(in))
		if err != nil {
			if got != nil {
				t.Fatalf("error %v with %d hashes returned", err, len(got))
			}
			return
		}
		for _, h := range got {
			if len(h) != 64 || strings.ToLower(h) != h {
				t.Fatalf("returned %q", h)
			}
		}
	})
}
