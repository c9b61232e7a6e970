package server_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cloudprotect/cloudprotect/server"
	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/server/store/storetest"
)

func TestReadHashList(t *testing.T) {
	t.Parallel()
	a, b := hashOf("a"), hashOf("b")
	tests := []struct {
		name    string
		in      string
		want    []string
		wantErr string
	}{
		{"empty", "", nil, ""},
		{"comments and blanks", "# list\n\n  " + a + "  \n" + b + " # the b file\n", []string{a, b}, ""},
		{"uppercase is lowered", strings.ToUpper(a) + "\n", []string{a}, ""},
		{"CRLF", a + "\r\n" + b + "\r\n", []string{a, b}, ""},
		{"short hash", a + "\n\nabc\n", nil, "list.txt:3: not a SHA-256"},
		{"sha256sum format", a + "  /usr/bin/a\n", nil, "list.txt:1:"},
		{"not hex", strings.Repeat("g", 64), nil, "list.txt:1:"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := server.ReadHashList("list.txt", strings.NewReader(tc.in))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error = %v; want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || strings.Join(got, ",") != strings.Join(tc.want, ",") {
				t.Fatalf("got %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

func TestImportFilesAllOrNothing(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T, b storetest.Backend) {
		t.Parallel()
		ctx := context.Background()
		dir := t.TempDir()
		good := filepath.Join(dir, "malicious.txt")
		bad := filepath.Join(dir, "trusted.txt")
		os.WriteFile(good, []byte(hashOf("evil")+"\n"), 0o600)
		os.WriteFile(bad, []byte(hashOf("ok")+"\nnot-a-hash\n"), 0o600)
		st := storetest.New(t, b)
		_, err := server.ImportFiles(ctx, st, map[string]string{store.ListMalicious: good, store.ListTrusted: bad}, false)
		if err == nil || !strings.Contains(err.Error(), bad+":2:") {
			t.Fatalf("import error = %v; want it to name %s:2", err, bad)
		}
		infos, _ := st.Lookup(ctx, []string{hashOf("evil"), hashOf("ok")})
		if infos[0].Malicious || infos[1].Trusted {
			t.Fatalf("a failed import left hashes behind: %+v", infos)
		}
		os.WriteFile(bad, []byte(hashOf("ok")+"\n"), 0o600)
		counts, err := server.ImportFiles(ctx, st, map[string]string{store.ListMalicious: good, store.ListTrusted: bad}, false)
		if err != nil || counts[store.ListMalicious] != 1 || counts[store.ListTrusted] != 1 {
			t.Fatalf("import = %v, %v", counts, err)
		}
		infos, _ = st.Lookup(ctx, []string{hashOf("evil"), hashOf("ok")})
		if !infos[0].Malicious || !infos[1].Trusted {
			t.Fatalf("after import: %+v", infos)
		}
	})
}
