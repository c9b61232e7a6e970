package execwatch

import (
	"slices"
	"testing"
)

func TestFilesystemsToMark(t *testing.T) {
	tests := []struct {
		name      string
		mountinfo string
		want      []string // mount points marked
	}{
		{"root and pseudo filesystems", `21 26 0:20 / /proc rw,relatime - proc proc rw
22 26 0:21 / /sys rw,relatime - sysfs sysfs rw
26 1 254:0 / / rw,relatime - ext4 /dev/vda rw
25 23 0:23 / /dev/pts rw,relatime - devpts devpts rw
40 30 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
`, []string{"/"}},
		{"one mark per filesystem", `26 1 254:0 / / rw - ext4 /dev/vda rw
50 26 254:0 /srv /mnt/srv rw - ext4 /dev/vda rw
51 26 0:40 / /tmp rw - tmpfs tmpfs rw
`, []string{"/", "/tmp"}},
		{"optional fields and escaped spaces", `26 1 254:0 / / rw shared:1 master:2 - ext4 /dev/vda rw
60 26 0:50 / /media/my\040disk rw shared:7 - vfat /dev/sdb1 rw
`, []string{"/", "/media/my disk"}},
		{"network filesystems are not marked", `26 1 254:0 / / rw - ext4 /dev/vda rw
70 26 0:60 / /home/net rw - nfs4 server:/home rw
`, []string{"/"}},
		{"garbage lines are skipped", "nonsense\n26 1 254:0 / / rw - ext4 /dev/vda rw\n1 2 3\n", []string{"/"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			for _, m := range filesystemsToMark(parseMountinfo([]byte(tc.mountinfo))) {
				got = append(got, m.point)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}
