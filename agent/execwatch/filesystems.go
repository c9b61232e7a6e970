package execwatch

import "strings"

// Filesystem is one local filesystem that can hold programs.
type Filesystem struct {
	Dev   string // "major:minor", one per filesystem
	Point string // the first mount point listed for it
	Type  string
}

// LocalFilesystems returns, from /proc/self/mountinfo text, one mount
// point per filesystem that can hold programs and is local: the fanotify
// source's set less FUSE, whose files a user's daemon serves (reading
// them may wait on that daemon).
func LocalFilesystems(mountinfo []byte) []Filesystem {
	var out []Filesystem
	for _, m := range filesystemsToMark(parseMountinfo(mountinfo)) {
		if m.fstype == "fuse" || m.fstype == "fuseblk" || strings.HasPrefix(m.fstype, "fuse.") {
			continue
		}
		out = append(out, Filesystem{Dev: m.dev, Point: m.point, Type: m.fstype})
	}
	return out
}
