package server

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/cloudprotect/cloudprotect/server/feed"
	"github.com/cloudprotect/cloudprotect/server/store"
)

// ImportFiles reads the named feed files (by store list name: trusted,
// untrusted, malicious; plain hash lists or CSV exports, see package
// feed) and imports them as feed in one transaction: either every list is
// imported or, on any error, none. With replace, what the feed listed
// before on a named list and no longer lists is removed. An empty feed
// name is the first file's base name.
func ImportFiles(ctx context.Context, st store.Store, feedName string, files map[string]string, replace bool, now time.Time) (map[string]store.ImportCount, error) {
	lists := make(map[string][]string, len(files))
	for _, list := range []string{store.ListMalicious, store.ListUntrusted, store.ListTrusted} {
		path, ok := files[list]
		if !ok {
			continue
		}
		if feedName == "" {
			feedName = filepath.Base(path)
		}
		f, err := os.Open(path)
		if err != nil {
			return nil, &HintError{Err: fmt.Errorf("open %s list: %w", list, err), Hint: "pass a readable file: one SHA-256 a line, or a CSV export with a sha256_hash column"}
		}
		hashes, err := feed.Read(path, f)
		f.Close()
		if err != nil {
			return nil, &HintError{Err: fmt.Errorf("read %s list: %w", list, err), Hint: "fix that line and import again: nothing was imported"}
		}
		lists[list] = hashes
	}
	if !ValidFeedName(feedName) {
		return nil, &HintError{Err: fmt.Errorf("import: feed name %q", feedName), Hint: "pass --feed NAME: 1 to 64 letters, digits and . _ - ( ) or spaces"}
	}
	counts, err := st.ImportLists(ctx, feedName, lists, replace, now)
	if err != nil {
		return nil, &HintError{Err: err, Hint: "nothing was imported: check the database and try again"}
	}
	return counts, nil
}

// ValidFeedName reports whether name can name a feed: 1 to 64 printable
// ASCII letters, digits, spaces and . _ - ( ).
func ValidFeedName(name string) bool {
	if name == "" || len(name) > 64 {
		return false
	}
	for _, c := range name {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case c == ' ', c == '.', c == '_', c == '-', c == '(', c == ')':
		default:
			return false
		}
	}
	return true
}
