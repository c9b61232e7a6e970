// Command mkdeb builds cloudprotect's Debian package from programs already
// built: `make deb` runs it. The package's tree is staged by the same code
// as `cloudprotect install --prefix /usr`, then built with dpkg-deb.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"time"

	"github.com/cloudprotect/cloudprotect/cmd/cloudprotect/setup"
)

func main() {
	binDir := flag.String("bin", "bin", "folder holding the built programs")
	out := flag.String("out", "bin", "folder to write the package to")
	version := flag.String("version", "", "version as git describe prints it (default: 0)")
	arch := flag.String("arch", "", "Debian architecture (default: from $GOARCH or this machine)")
	maintainer := flag.String("maintainer", os.Getenv("DEB_MAINTAINER"), "maintainer, \"Name <address>\" (default $DEB_MAINTAINER, else "+setup.DefaultMaintainer+")")
	flag.Parse()

	a := *arch
	if a == "" {
		goarch := os.Getenv("GOARCH")
		if goarch == "" {
			goarch = runtime.GOARCH
		}
		a = setup.DebArch(goarch)
	}
	date := time.Now()
	// Reproducible builds set the date from the source.
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		if n, err := strconv.ParseInt(s, 10, 64); err == nil {
			date = time.Unix(n, 0).UTC()
		}
	}
	opts := setup.DebOptions{BinDir: *binDir, Version: setup.DebVersion(*version), Arch: a, Maintainer: *maintainer, Date: date}
	path, err := setup.BuildDeb(context.Background(), opts, *out)
	if err != nil {
		fmt.Fprintf(os.Stderr, "mkdeb: error: %v\nmkdeb: hint: build the programs first (make build); dpkg-deb comes with the Debian package dpkg\n", err)
		os.Exit(1)
	}
	fmt.Println(path)
}
