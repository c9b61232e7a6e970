// Package dirs helps watchers follow folders that may not exist yet.
package dirs

import (
	"os"
	"path/filepath"
)

// Nearest returns dir if it is an existing folder, else the nearest folder
// above it that exists (at worst the root): the place to watch for dir to
// appear.
func Nearest(dir string) string {
	for {
		if fi, err := os.Stat(dir); err == nil && fi.IsDir() {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return dir
		}
		dir = parent
	}
}
