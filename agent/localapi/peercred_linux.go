package localapi

import (
	"net"

	"golang.org/x/sys/unix"
)

// peerCred reads the credentials of the process at the other end of a
// unix socket connection.
func peerCred(c net.Conn) (Cred, bool) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return Cred{}, false
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Cred{}, false
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil || cerr != nil {
		return Cred{}, false
	}
	return Cred{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}, true
}
