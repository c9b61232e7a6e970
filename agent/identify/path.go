package identify

import (
	"github.com/cloudprotect/cloudprotect/wire"

	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// PackageManaged reports whether path lies in a directory that the
// distribution's package manager owns. The rule, applied to the cleaned
// absolute path:
//
//   - yes under /usr, /bin, /sbin and every top-level /lib* directory
//     (/lib, /lib32, /lib64, /libx32, ...);
//   - except under /usr/local (the administrator's own software) and
//     /usr/tmp (a temporary directory on some systems);
//   - no anywhere else: /home, /root, /tmp, /var/tmp, /opt, /srv, /snap,
//     /nix, /run, /media, /mnt, ... and relative paths.
//
// It looks at the path only; it does not ask the package database.
func PackageManaged(path string) bool {
	if !strings.HasPrefix(path, "/") {
		return false
	}
	path = filepath.Clean(path)
	top, rest, _ := strings.Cut(path[1:], "/")
	switch {
	case top == "usr":
		sub, _, _ := strings.Cut(rest, "/")
		return rest != "" && sub != "local" && sub != "tmp"
	case top == "bin", top == "sbin", strings.HasPrefix(top, "lib"):
		return rest != ""
	}
	return false
}

// User is one account whose home directory and name must never appear in
// a collected path.
type User struct {
	Name string
	Home string
}

// ReadPasswd reads the accounts of people from an /etc/passwd-format file:
// those with a UID of at least 1000 other than nobody (65534), and root.
// System accounts are left out: their "homes" are often directories such
// as /bin or /usr/sbin whose paths are not personal.
func ReadPasswd(path string) ([]User, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read accounts: %w", err)
	}
	defer f.Close()
	users, err := parsePasswd(f)
	if err != nil {
		return nil, fmt.Errorf("read accounts from %s: %w", path, err)
	}
	return users, nil
}

func parsePasswd(r io.Reader) ([]User, error) {
	var users []User
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		fields := strings.Split(line, ":")
		if len(fields) < 7 {
			continue
		}
		uid, err := strconv.Atoi(fields[2])
		if err != nil {
			continue
		}
		if uid != 0 && (uid < 1000 || uid == 65534) {
			continue
		}
		users = append(users, User{Name: fields[0], Home: fields[5]})
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return users, nil
}

// Anonymizer removes user names and home directories from paths. Its rules,
// in order, on the cleaned path:
//
//  1. a configured home directory (from ReadPasswd), or /root, or
//     /home/<name>, or /var/home/<name>: the home part becomes "~";
//  2. /run/user/<uid>/… becomes /run/user/~/…;
//  3. /media/<name>/… and /run/media/<name>/… (removable media mounted for
//     a user) become /media/~/… and /run/media/~/…;
//  4. any remaining path component equal to a configured user name becomes
//     "~", so /srv/backups/alice/x becomes /srv/backups/~/x;
//  5. a home folder deeper in the tree (a container's or a backup's root)
//     goes too: …/home/<name>/… and …/root/… become …/~/….
//
// The result is always a path the cloud accepts (wire.CheckPath): control
// characters become "?", it is cut to wire.MaxPathLen, and a relative path
// gives "". A home directory that is "/" or lies in a package-managed directory is
// ignored (rule 1 would otherwise turn /bin/ls into ~/ls). An Anonymizer is
// immutable and safe for concurrent use.
type Anonymizer struct {
	homes []string        // cleaned, without trailing slash, longest first
	names map[string]bool // user names (rule 4)
}

// NewAnonymizer returns an Anonymizer that also knows the given accounts.
// With no accounts it still applies rules 1–3 to the standard locations.
func NewAnonymizer(users []User) *Anonymizer {
	a := &Anonymizer{names: make(map[string]bool)}
	for _, u := range users {
		if u.Name != "" && u.Name != "root" {
			a.names[u.Name] = true
		}
		h := filepath.Clean(u.Home)
		if !strings.HasPrefix(h, "/") || h == "/" || PackageManaged(h) || h == "/nonexistent" {
			continue
		}
		a.homes = append(a.homes, h)
	}
	slices.SortFunc(a.homes, func(x, y string) int { return len(y) - len(x) })
	a.homes = slices.Compact(a.homes)
	return a
}

// SystemAnonymizer is NewAnonymizer with the accounts of /etc/passwd; when
// that cannot be read, it falls back to the standard locations.
func SystemAnonymizer() *Anonymizer {
	users, _ := ReadPasswd("/etc/passwd")
	return NewAnonymizer(users)
}

// Anonymize returns path with home directories and user names removed.
func (a *Anonymizer) Anonymize(path string) string {
	return wire.SanitizePath(a.anonymize(path))
}

func (a *Anonymizer) anonymize(path string) string {
	if path == "" {
		return ""
	}
	p := filepath.Clean(path)
	if rest, ok := a.home(p); ok {
		p = "~" + rest
	} else if rest, ok := stripDir(p, "/run/user/"); ok {
		p = "/run/user/~" + rest
	} else if rest, ok := stripDir(p, "/media/"); ok {
		p = "/media/~" + rest
	} else if rest, ok := stripDir(p, "/run/media/"); ok {
		p = "/run/media/~" + rest
	}
	if p == "/home" {
		return "~"
	}
	p = nestedHomes(p)
	if len(a.names) == 0 {
		return p
	}
	// Rule 4, without allocating when nothing matches.
	var b []string
	parts := strings.Split(p, "/")
	for i, c := range parts {
		if a.names[c] {
			if b == nil {
				b = parts
			}
			b[i] = "~"
		}
	}
	if b == nil {
		return p
	}
	return strings.Join(b, "/")
}

// nestedHomes anonymises home folders below the top of the tree (in a
// container's or a backup's root, say): ".../home/NAME/x" becomes
// ".../~/x" and ".../root/x" becomes ".../~/x", since the name after
// "home" is a user's and "root" is root's home. The cloud refuses any path
// that still holds "/home/" or "/root/" (wire.CheckPath).
func nestedHomes(p string) string {
	if !strings.Contains(p, "/home/") && !strings.Contains(p, "/root/") {
		return p
	}
	parts := strings.Split(p, "/")
	out := parts[:0]
	for i := 0; i < len(parts); i++ {
		c := parts[i]
		switch {
		case c == "home" && i+1 < len(parts):
			out = append(out, "~")
			i++ // the user's name goes too
		case c == "root" && i+1 < len(parts):
			out = append(out, "~")
		default:
			out = append(out, c)
		}
	}
	return strings.Join(out, "/")
}

// home matches rule 1 and returns what follows the home directory ("" or
// "/…").
func (a *Anonymizer) home(p string) (string, bool) {
	for _, h := range a.homes {
		if p == h {
			return "", true
		}
		if strings.HasPrefix(p, h) && p[len(h)] == '/' {
			return p[len(h):], true
		}
	}
	if p == "/root" {
		return "", true
	}
	if strings.HasPrefix(p, "/root/") {
		return p[len("/root"):], true
	}
	if rest, ok := stripDir(p, "/home/"); ok {
		return rest, true
	}
	return stripDir(p, "/var/home/")
}

// stripDir matches prefix + "<one component>" and returns what follows
// that component ("" or "/…"). The prefix itself does not match.
func stripDir(p, prefix string) (string, bool) {
	if !strings.HasPrefix(p, prefix) || len(p) == len(prefix) {
		return "", false
	}
	rest := p[len(prefix):]
	if i := strings.IndexByte(rest, '/'); i >= 0 {
		return rest[i:], true
	}
	return "", true
}
