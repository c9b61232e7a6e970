package localapi

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/user"
	"strconv"
	"strings"
)

// Cred is the identity of the process at the other end of the socket, as
// the kernel reports it (SO_PEERCRED): it cannot be forged by the client.
type Cred struct {
	PID int32
	UID uint32
	GID uint32
}

type credKey struct{}

// CredFrom returns the caller's credentials, if the connection had them.
func CredFrom(ctx context.Context) (Cred, bool) {
	c, ok := ctx.Value(credKey{}).(Cred)
	return c, ok
}

// Authorizer decides whether a caller may change participation.
type Authorizer func(Cred) bool

// OwnerOnly allows root and the user uid: the rule of a user-mode agent.
func OwnerOnly(uid int) Authorizer {
	return func(c Cred) bool { return c.UID == 0 || int(c.UID) == uid }
}

// RootOrGroup allows root and members of the group that group() names:
// the rule of the system agent. The group is looked up on each call, so a
// policy change applies at once.
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
		return inGroup(c, uint32(gid))
	}
}

// inGroup reports whether the calling process is in gid: its primary group,
// or a supplementary group of the process itself (read from /proc, which
// is what the process really has), else of its user in the group database.
func inGroup(c Cred, gid uint32) bool {
	if c.GID == gid {
		return true
	}
	if groups, err := procGroups(c.PID); err == nil {
		for _, g := range groups {
			if g == gid {
				return true
			}
		}
		return false
	}
	u, err := user.LookupId(strconv.FormatUint(uint64(c.UID), 10))
	if err != nil {
		return false
	}
	ids, err := u.GroupIds()
	if err != nil {
		return false
	}
	want := strconv.FormatUint(uint64(gid), 10)
	for _, id := range ids {
		if id == want {
			return true
		}
	}
	return false
}

func procGroups(pid int32) ([]uint32, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("no pid")
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "Groups:")
		if !ok {
			continue
		}
		var out []uint32
		for _, f := range strings.Fields(rest) {
			g, err := strconv.ParseUint(f, 10, 32)
			if err != nil {
				return nil, err
			}
			out = append(out, uint32(g))
		}
		return out, nil
	}
	return nil, fmt.Errorf("no Groups line for pid %d", pid)
}
