//go:build unix

package localapi

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
)

// checkSocketDir checks the folder a socket is made in: a real folder of
// this process's user (its mode repaired to mode when wider), and every
// folder above it of root or this user, written to by no one else unless
// it is sticky (like /tmp, where only an entry's owner may remove or
// rename it). Then nobody else can have put a socket there first, or
// replace the agent's.
func checkSocketDir(dir string, mode os.FileMode) error {
	me := uint32(os.Geteuid())
	var st syscall.Stat_t
	if err := syscall.Lstat(dir, &st); err != nil {
		return err
	}
	switch {
	case st.Mode&syscall.S_IFMT != syscall.S_IFDIR:
		return fmt.Errorf("the socket's folder %s is not a folder (a symbolic link?)", dir)
	case st.Uid != me:
		return fmt.Errorf("the socket's folder %s belongs to uid %d, not to this agent's user %d: someone else may replace the socket", dir, st.Uid, me)
	}
	if os.FileMode(st.Mode&0o7777) != mode {
		if err := os.Chmod(dir, mode); err != nil {
			return fmt.Errorf("repair the mode of the socket's folder: %w", err)
		}
	}
	for d := filepath.Dir(dir); ; d = filepath.Dir(d) {
		if err := syscall.Stat(d, &st); err != nil {
			return err
		}
		switch {
		case st.Uid != 0 && st.Uid != me:
			return fmt.Errorf("the folder %s above the socket belongs to uid %d: it could replace the socket's folder", d, st.Uid)
		case st.Mode&0o022 != 0 && st.Mode&syscall.S_ISVTX == 0:
			return fmt.Errorf("others may write to the folder %s above the socket (mode %o): they could replace the socket's folder", d, st.Mode&0o777)
		}
		if d == "/" {
			return nil
		}
	}
}

// userRuntimeDir returns /run/user/UID when it is the user's own private
// folder, else "".
func userRuntimeDir() string {
	dir := filepath.Join("/run/user", strconv.Itoa(os.Getuid()))
	var st syscall.Stat_t
	if syscall.Lstat(dir, &st) != nil || st.Mode&syscall.S_IFMT != syscall.S_IFDIR || int(st.Uid) != os.Getuid() || st.Mode&0o077 != 0 {
		return ""
	}
	return dir
}
