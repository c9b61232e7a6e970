//go:build !linux

package localapi

import "net"

// peerCred knows no caller on systems without SO_PEERCRED: such callers
// may read but never change participation.
func peerCred(net.Conn) (Cred, bool) { return Cred{}, false }
