//go:build !unix

package localapi

import "os"

// checkSocketDir has nothing to check where folders have no unix owners
// and modes.
func checkSocketDir(string, os.FileMode) error { return nil }

// userRuntimeDir: there is no /run/user here.
func userRuntimeDir() string { return "" }
