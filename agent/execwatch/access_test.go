package execwatch

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

type aclEntry struct {
	tag, perm uint16
	id        uint32
}

func setACL(path string, ents []aclEntry) error {
	b := binary.LittleEndian.AppendUint32(nil, aclVersion)
	for _, e := range ents {
		b = binary.LittleEndian.AppendUint16(b, e.tag)
		b = binary.LittleEndian.AppendUint16(b, e.perm)
		b = binary.LittleEndian.AppendUint32(b, e.id)
	}
	return unix.Setxattr(path, "system.posix_acl_access", b, 0)
}

// mayRead decides as the kernel does: the mode's owner, group and other
// bits without an ACL; with one, the owner's entry, a named user's entry
// limited by the mask, any matching group entry, or other.
func TestMayRead(t *testing.T) {
	t.Parallel()
	const anyID = 0xffffffff
	me := &Person{UID: 4001, GID: 5001, Groups: []uint32{5002}}
	tests := []struct {
		name  string
		uid   uint32 // the file's owner
		gid   uint32 // the file's group
		mode  uint32
		acl   []aclEntry
		allow bool
	}{
		{"owner may read", 4001, 9, 0o400, nil, true},
		{"owner may not, others may", 4001, 9, 0o044, nil, false},
		{"primary group", 9, 5001, 0o040, nil, true},
		{"supplementary group", 9, 5002, 0o040, nil, true},
		{"group may not, others may", 9, 5002, 0o704, nil, false},
		{"other", 9, 9, 0o004, nil, true},
		{"nobody", 9, 9, 0o770, nil, false},
		{"named user denied although others may", 9, 9, 0o755, []aclEntry{
			{aclUserObj, 7, anyID}, {aclUser, 0, 4001}, {aclGroupObj, 5, anyID}, {aclMask, 5, anyID}, {aclOther, 5, anyID}}, false},
		{"named user allowed although others may not", 9, 9, 0o750, []aclEntry{
			{aclUserObj, 7, anyID}, {aclUser, 4, 4001}, {aclGroupObj, 5, anyID}, {aclMask, 5, anyID}, {aclOther, 0, anyID}}, true},
		{"named user allowed but masked", 9, 9, 0o710, []aclEntry{
			{aclUserObj, 7, anyID}, {aclUser, 4, 4001}, {aclGroupObj, 1, anyID}, {aclMask, 1, anyID}, {aclOther, 0, anyID}}, false},
		{"named group allowed", 9, 9, 0o750, []aclEntry{
			{aclUserObj, 7, anyID}, {aclGroupObj, 0, anyID}, {aclGroup, 4, 5002}, {aclMask, 4, anyID}, {aclOther, 0, anyID}}, true},
		{"matching group denies, other would allow", 9, 5001, 0o705, []aclEntry{
			{aclUserObj, 7, anyID}, {aclGroupObj, 0, anyID}, {aclMask, 7, anyID}, {aclOther, 5, anyID}}, false},
	}
	dir := t.TempDir()
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, string(rune('a'+i)))
			if err := os.WriteFile(p, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			if tc.acl != nil {
				if err := setACL(p, tc.acl); errors.Is(err, unix.EOPNOTSUPP) {
					t.Skip("the file system here has no ACLs")
				} else if err != nil {
					t.Fatal(err)
				}
			}
			fd, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Close(fd)
			st := unix.Stat_t{Uid: tc.uid, Gid: tc.gid, Mode: unix.S_IFREG | tc.mode}
			if got := mayRead(me, fd, &st); got != tc.allow {
				t.Errorf("mayRead = %v, want %v", got, tc.allow)
			}
		})
	}
	if !mayRead(&Person{UID: 0}, -1, &unix.Stat_t{}) {
		t.Error("root may not read")
	}
}
