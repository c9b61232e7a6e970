// Package version says which build of cloudprotect a program is: the
// release set at build time (make sets it from git describe), or, for a
// plain go build, the source revision Go recorded.
package version

import (
	"runtime/debug"
	"sync"
)

// Version is the release, set at build time with
// -ldflags '-X github.com/cloudprotect/cloudprotect/cmd/internal/version.Version=1.2.0'.
var Version = "0.1.0-dev"

// String is Version, followed by the source revision when Go recorded one
// and the version was not set at build time.
func String() string { return str() }

var str = sync.OnceValue(func() string {
	v := Version
	if v != "0.1.0-dev" {
		return v
	}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return v
	}
	var rev, dirty string
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				dirty = "-dirty"
			}
		}
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if rev != "" {
		v += " (" + rev + dirty + ")"
	}
	return v
})
