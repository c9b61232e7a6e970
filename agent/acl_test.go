package agent

import (
	"encoding/binary"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// setACLDenyUser gives path an access ACL that lets everyone read it but
// the user uid (user:UID:---), as setfacl would.
func setACLDenyUser(path string, uid uint32) error {
	type ent struct {
		tag, perm uint16
		id        uint32
	}
	ents := []ent{
		{0x01, 7, 0xffffffff}, // user::rwx
		{0x02, 0, uid},        // user:UID:---
		{0x04, 5, 0xffffffff}, // group::r-x
		{0x10, 5, 0xffffffff}, // mask::r-x
		{0x20, 5, 0xffffffff}, // other::r-x
	}
	b := binary.LittleEndian.AppendUint32(nil, 2)
	for _, e := range ents {
		b = binary.LittleEndian.AppendUint16(b, e.tag)
		b = binary.LittleEndian.AppendUint16(b, e.perm)
		b = binary.LittleEndian.AppendUint32(b, e.id)
	}
	return unix.Setxattr(path, "system.posix_acl_access", b, 0)
}

// rand4 returns four characters that make a name unique to this run.
func rand4() string { return fmt.Sprintf("%04d", os.Getpid()%10000) }
