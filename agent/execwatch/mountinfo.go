package execwatch

import (
	"bufio"
	"bytes"
	"strings"
)

// mount is one line of /proc/self/mountinfo, reduced to what marking needs.
type mount struct {
	dev    string // "major:minor", one per filesystem (superblock)
	point  string
	fstype string
}

// pseudoFS lists filesystem types that hold no programs worth watching, or
// that cannot be marked.
var pseudoFS = map[string]bool{
	"proc": true, "sysfs": true, "cgroup": true, "cgroup2": true,
	"devpts": true, "debugfs": true, "tracefs": true, "securityfs": true,
	"bpf": true, "mqueue": true, "pstore": true, "configfs": true,
	"fusectl": true, "autofs": true, "binfmt_misc": true, "nsfs": true,
	"efivarfs": true, "hugetlbfs": true, "rpc_pipefs": true, "selinuxfs": true,
	"devtmpfs": true, "pipefs": true, "sockfs": true, "anon_inodefs": true,
	"nfsd": true, "fuse.gvfsd-fuse": true,
	"fuse.portal": true,
}

// networkFS lists remote filesystem types. They are not marked: a path
// lookup on a hung server would stall the reader.
var networkFS = map[string]bool{
	"nfs": true, "nfs4": true, "cifs": true, "smb3": true, "smbfs": true,
	"ceph": true, "afs": true, "fuse.sshfs": true, "fuse.rclone": true,
	"glusterfs": true, "fuse.glusterfs": true, "lustre": true,
}

// watchable reports whether mounts of this type are marked.
func watchable(fstype string) bool {
	return !pseudoFS[fstype] && !networkFS[fstype]
}

// parseMountinfo reads mountinfo text (see proc_pid_mountinfo(5)); lines it
// cannot parse are skipped.
func parseMountinfo(data []byte) []mount {
	var out []mount
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		// id parent major:minor root point options [optional...] - type source super
		if len(f) < 10 {
			continue
		}
		sep := -1
		for i := 6; i < len(f); i++ {
			if f[i] == "-" {
				sep = i
				break
			}
		}
		if sep < 0 || sep+1 >= len(f) {
			continue
		}
		out = append(out, mount{dev: f[2], point: unescapeMount(f[4]), fstype: f[sep+1]})
	}
	return out
}

// unescapeMount undoes the octal escapes (\040 for a space, …) the kernel
// writes in mount points.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }

// filesystemsToMark returns one mount point per distinct watchable
// filesystem, the first one listed (mountinfo lists parents first).
func filesystemsToMark(ms []mount) []mount {
	seen := make(map[string]bool)
	var out []mount
	for _, m := range ms {
		if !watchable(m.fstype) || seen[m.dev] {
			continue
		}
		seen[m.dev] = true
		out = append(out, m)
	}
	return out
}
