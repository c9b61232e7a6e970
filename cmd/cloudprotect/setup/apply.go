package setup

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// Apply writes every file that is missing or differs in content or mode
// under root, and returns the paths it wrote (installation paths, without
// the root). Files that are already right are not touched, so a second run
// writes nothing. Each file is replaced atomically: a program that is
// running keeps its old copy and a crash leaves the old or the new file.
func Apply(root string, files []File) (written []string, err error) {
	for _, f := range files {
		want, err := f.Data()
		if err != nil {
			return written, fmt.Errorf("read %s: %w", filepath.Base(f.Path), err)
		}
		dst := filepath.Join(root, filepath.FromSlash(f.Path))
		if same(dst, want, f.Mode) {
			continue
		}
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return written, fmt.Errorf("install %s: %w", f.Path, err)
		}
		if err := writeFile(dst, want, f.Mode); err != nil {
			return written, fmt.Errorf("install %s: %w", f.Path, err)
		}
		written = append(written, f.Path)
	}
	return written, nil
}

// same reports whether dst is a regular file holding want with mode.
func same(dst string, want []byte, mode fs.FileMode) bool {
	fi, err := os.Lstat(dst)
	if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != mode.Perm() || fi.Size() != int64(len(want)) {
		return false
	}
	have, err := os.ReadFile(dst)
	return err == nil && bytes.Equal(have, want)
}

// writeFile replaces path with data: a temporary file beside it, synced,
// given its mode, then renamed over path.
func writeFile(path string, data []byte, mode fs.FileMode) (err error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err = f.Write(data); err != nil {
		return err
	}
	// Chmod, not the umask: the mode is part of what is installed.
	if err = f.Chmod(mode.Perm()); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp, path); err != nil {
		return err
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// Installed returns the files of the manifest present under root.
func Installed(root string, files []File) []string {
	var have []string
	for _, f := range files {
		if _, err := os.Lstat(filepath.Join(root, filepath.FromSlash(f.Path))); err == nil {
			have = append(have, f.Path)
		}
	}
	return have
}

// Remove deletes the manifest's files under root and the folders of
// cloudprotect's own that are left empty (never a folder it shares with
// other software, nor an administrator's policy). It returns the paths it
// removed.
func Remove(l Layout, files []File) (removed []string, err error) {
	var errs []error
	for _, f := range files {
		p := l.OnDisk(f.Path)
		switch err := os.Remove(p); {
		case err == nil:
			removed = append(removed, f.Path)
		case errors.Is(err, fs.ErrNotExist):
		default:
			errs = append(errs, fmt.Errorf("remove %s: %w", f.Path, err))
		}
	}
	// Only cloudprotect's own folders, and only when empty: os.Remove
	// refuses a folder that still holds something (such as policy.json).
	for _, d := range []string{l.DocDir(), PolicyDir} {
		os.Remove(l.OnDisk(d))
	}
	return removed, errors.Join(errs...)
}
