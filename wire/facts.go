package wire

// Facts is what is known about one executable file. Every field here is
// listed in the Security Network Statement; adding one means bumping the
// statement version.
type Facts struct {
	// SHA256 is the lowercase hex SHA-256 of the file's contents.
	SHA256 string `json:"sha256"`
	// Size is the file size in bytes.
	Size int64 `json:"size"`
	// Path is the anonymised path: "/home/<user>/x" becomes "~/x", and
	// "/root/x" becomes "~/x"; it never contains a user name.
	Path string `json:"path"`
	// Kind is "elf", "script" or "other".
	Kind string `json:"kind"`
	// ELF holds the ELF facts when Kind is "elf".
	ELF *ELF `json:"elf,omitempty"`
	// Interpreter is the #! interpreter of a script ("/usr/bin/python3"),
	// anonymised like Path.
	Interpreter string `json:"interpreter,omitempty"`
	// PackageManaged reports whether the file lies in a directory that a
	// package manager owns (/usr/bin, /usr/lib, /opt/... is not).
	PackageManaged bool `json:"package_managed"`
}

// ELF holds the facts read from an ELF header. A malformed file is a fact
// too: Malformed says what was wrong, and the other fields hold what could
// be read before that.
type ELF struct {
	Machine     string `json:"machine"`               // "x86_64", "aarch64", ...
	Type        string `json:"type"`                  // "exec", "dyn", "rel", "core"
	Static      bool   `json:"static"`                // no PT_INTERP
	PIE         bool   `json:"pie"`                   // ET_DYN with an interpreter or DF_1_PIE
	Interpreter string `json:"interpreter,omitempty"` // PT_INTERP, e.g. /lib64/ld-linux-x86-64.so.2
	BuildID     string `json:"build_id,omitempty"`    // hex of NT_GNU_BUILD_ID
	Malformed   string `json:"malformed,omitempty"`   // why parsing stopped, if it did
}
