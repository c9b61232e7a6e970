package server

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/wire"
)

// ReadHashList reads a verdict list: one SHA-256 a line, hex in either
// case (stored lowercase), surrounding spaces ignored; blank lines and
// text from "#" to the end of a line are comments. A bad line is an error
// naming name:line.
func ReadHashList(name string, r io.Reader) ([]string, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 64<<10)
	var out []string
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		line = strings.ToLower(strings.TrimSpace(line))
		if line == "" {
			continue
		}
		if !wire.ValidSHA256(line) {
			return nil, fmt.Errorf("%s:%d: not a SHA-256 (64 hex digits): %q", name, n, truncate(line, 80))
		}
		out = append(out, line)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", name, err)
	}
	return out, nil
}

// ImportFiles reads the named list files (by store list name: trusted,
// untrusted, malicious) and imports them in one transaction: either every
// list is imported or, on any error, none. With replace, each list named
// replaces its previous contents.
func ImportFiles(ctx context.Context, st store.Store, files map[string]string, replace bool) (map[string]int, error) {
	lists := make(map[string][]string, len(files))
	counts := make(map[string]int, len(files))
	for list, path := range files {
		f, err := os.Open(path)
		if err != nil {
			return nil, &HintError{Err: fmt.Errorf("open %s list: %w", list, err), Hint: "pass a readable file, one SHA-256 a line"}
		}
		hashes, err := ReadHashList(path, f)
		f.Close()
		if err != nil {
			return nil, &HintError{Err: fmt.Errorf("read %s list: %w", list, err), Hint: "fix that line and import again: nothing was imported"}
		}
		lists[list] = hashes
		counts[list] = len(hashes)
	}
	if err := st.ImportLists(ctx, lists, replace); err != nil {
		return nil, err
	}
	return counts, nil
}
