package localapi

import (
	"context"
	"os/user"
	"slices"
	"strconv"
)

// Cred is the identity of the process at the other end of the socket, as
// the kernel recorded it when that process connected (SO_PEERCRED and
// SO_PEERGROUPS): it cannot be forged by the client, and it is never
// looked up again later. PID is kept for the log only: by the time a
// request arrives the process may be gone and its PID reused, so nothing
// is decided by it.
type Cred struct {
	PID    int32
	UID    uint32
	GID    uint32
	Groups []uint32 // supplementary groups
}

// InGroup reports whether the caller had gid as its primary or a
// supplementary group when it connected.
func (c Cred) InGroup(gid uint32) bool {
	return c.GID == gid || slices.Contains(c.Groups, gid)
}

type credKey struct{}

// CredFrom returns the caller's credentials, if the connection had them.
func CredFrom(ctx context.Context) (Cred, bool) {
	c, ok := ctx.Value(credKey{}).(Cred)
	return c, ok
}

// Authorizer decides whether a caller is privileged: who may change
// participation and read what the agent collected (queue contents, every
// alert). Everyone else reads the status and the alerts of programs they
// ran.
type Authorizer func(Cred) bool

// OwnerOnly allows root and the user uid: the rule of a user-mode agent.
func OwnerOnly(uid int) Authorizer {
	return func(c Cred) bool { return c.UID == 0 || int(c.UID) == uid }
}

// RootOrGroup allows root and members of the group that group() names:
// the rule of the system agent. Membership is the caller's primary and
// supplementary groups as they were when it connected. The group's name
// is looked up on each call, so a policy change applies at once.
func RootOrGroup(group func() string) Authorizer {
	return func(c Cred) bool {
		if c.UID == 0 {
			return true
		}
		name := group()
		if name == "" {
			return false
		}
		g, err := user.LookupGroup(name)
		if err != nil {
			return false
		}
		gid, err := strconv.ParseUint(g.Gid, 10, 32)
		if err != nil {
			return false
		}
		return c.InGroup(uint32(gid))
	}
}
