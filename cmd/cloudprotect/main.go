// Command cloudprotect is the command-line client of the cloudprotect agent:
// status, the Security Network Statement, participating and leaving, and
// the statistics queue.
package main

import (
	"os"

	"github.com/cloudprotect/cloudprotect/cmd/cloudprotect/cli"
)

func main() { os.Exit(cli.Main(os.Args[1:], cli.OSEnv())) }
