package localapi

import (
	"net"
	"unsafe"

	"golang.org/x/sys/unix"
)

// peerCred reads the credentials of the process at the other end of a
// unix socket connection: uid, gid and pid from SO_PEERCRED and the
// supplementary groups from SO_PEERGROUPS. The kernel recorded both when
// the peer called connect(), so they describe who connected even after
// that process is gone and its PID belongs to someone else. Without
// SO_PEERGROUPS (kernels before 4.13) the caller has no supplementary
// groups: group membership is then only the primary group, which fails
// closed.
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
	var groups []uint32
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if cerr == nil {
			groups = peerGroups(int(fd))
		}
	}); err != nil || cerr != nil {
		return Cred{}, false
	}
	return Cred{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid, Groups: groups}, true
}

// maxPeerGroups is NGROUPS_MAX on Linux.
const maxPeerGroups = 65536

// peerGroups reads SO_PEERGROUPS, growing the buffer when the kernel
// answers ERANGE with the size it needs. It returns nil when the kernel
// does not know the option.
func peerGroups(fd int) []uint32 {
	buf := make([]uint32, 32)
	for {
		n := uint32(len(buf) * 4)
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
		switch {
		case errno == 0:
			return buf[: n/4 : n/4]
		case errno == unix.ERANGE && int(n/4) > len(buf) && n/4 <= maxPeerGroups:
			buf = make([]uint32, n/4)
		default:
			return nil
		}
	}
}
