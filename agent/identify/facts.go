// Package identify turns an executable file into the facts the Security
// Network collects about it: its SHA-256, size, ELF facts, script
// interpreter, whether it lies in a package-managed directory, and its path
// with the user's home directory anonymised. Nothing else about the file,
// and never its contents, leaves this package.
package identify

import "github.com/cloudprotect/cloudprotect/wire"

// Facts is what is known about one executable file; its fields are the
// ones the Security Network Statement lists (see wire.Facts).
type Facts = wire.Facts

// ELF holds the facts read from an ELF header (see wire.ELF).
type ELF = wire.ELF
