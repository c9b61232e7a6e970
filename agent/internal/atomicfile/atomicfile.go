// Package atomicfile replaces files so that a crash leaves either the old
// content or the new one, never a torn mix.
package atomicfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// Write replaces path with data: it writes a temporary file in
// the same folder, syncs it, renames it over path and syncs the folder, so
// that after a crash path holds either the old or the new content.
func Write(path string, data []byte, perm fs.FileMode) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err = f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = f.Chmod(perm); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("write %s: sync: %w", path, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if d, derr := os.Open(dir); derr == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// Wipe overwrites path with zeros, fsyncs it and removes it, so that its
// contents are gone from the file system as far as a program can make
// sure. A missing file is no error; a file that cannot be overwritten
// (a full disk) is removed all the same, and the error says so.
func Wipe(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		// Removing needs no permission on the file itself, nor space.
		if rerr := os.Remove(path); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
			return fmt.Errorf("wipe %s: %w", path, err)
		}
		return nil
	}
	// Overwriting is the best effort: on a full disk the holes of a
	// sparse file cannot be filled. The file is removed whatever happens,
	// which needs no space, so the queue can start afresh.
	var werr error
	if st, err := f.Stat(); err != nil {
		werr = err
	} else {
		zeros := make([]byte, 1<<20)
		for off := int64(0); off < st.Size(); off += int64(len(zeros)) {
			n := min(int64(len(zeros)), st.Size()-off)
			if _, err := f.WriteAt(zeros[:n], off); err != nil {
				werr = err
				break
			}
		}
		if werr == nil {
			werr = f.Sync()
		}
	}
	f.Close()
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("wipe %s: %w", path, err)
	}
	if werr != nil {
		return fmt.Errorf("wipe %s: removed without overwriting all of it: %w", path, werr)
	}
	return nil
}
