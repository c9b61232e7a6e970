package localapi

import (
	"context"
	"net"

	"golang.org/x/sys/unix"
)

// connCred reads the peer's credentials when a connection is accepted.
func connCred(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ctx
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return ctx
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil || cerr != nil {
		return ctx
	}
	return context.WithValue(ctx, credKey{}, Cred{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid})
}
