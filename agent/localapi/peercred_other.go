//go:build !linux

package localapi

import (
	"context"
	"net"
)

// connCred knows no caller on systems without SO_PEERCRED: such callers
// may read but never change participation.
func connCred(ctx context.Context, _ net.Conn) context.Context { return ctx }
