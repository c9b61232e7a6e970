package testenv

import (
	"net"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// ListenAs listens on network and addr with a socket that belongs to uid,
// as if that user had opened it: the kernel takes a socket's owner from
// the file-system uid of the thread that creates it, and a unix socket
// file is created with it. The listener is closed when the test ends. It
// needs root.
func ListenAs(t testing.TB, uid int, network, addr string) (net.Listener, error) {
	t.Helper()
	NeedRoot(t)
	runtime.LockOSThread()
	prev, _ := unix.SetfsuidRetUid(uid)
	ln, err := net.Listen(network, addr)
	unix.SetfsuidRetUid(prev)
	if now, _ := unix.SetfsuidRetUid(prev); now != prev {
		// The thread could not get its own uid back: keep it locked, so
		// that it ends with this goroutine instead of running others.
		t.Fatalf("restore the file-system uid %d of this thread: still %d", prev, now)
	}
	runtime.UnlockOSThread()
	if err == nil {
		t.Cleanup(func() { ln.Close() })
	}
	return ln, err
}
