// Package dist holds the files that put cloudprotect on a system: the
// systemd unit of the agent, the tray's autostart entry, the desktop
// entry, the example policy, the man pages and the Debian package's
// control files and maintainer scripts.
//
// They are kept here as plain files (some are text/template templates, see
// package cmd/cloudprotect/setup) and embedded, so that `cloudprotect
// install` and `make deb` install exactly the same content.
package dist

import "embed"

// FS holds the files, under systemd/, xdg/, applications/, policy/, man/
// debian/ and lintian/.
//
//go:embed systemd xdg applications policy man debian lintian
var FS embed.FS
