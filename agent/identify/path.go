package identify

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cloudprotect/cloudprotect/wire"
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

// Accounts of people, as opposed to system accounts (services): a uid of
// at least UID_MIN of /etc/login.defs (1000 unless it says otherwise),
// other than nobody.
const (
	defaultUIDMin = 1000
	nobodyUID     = 65534
)

// ReadPasswd reads the accounts of people from an /etc/passwd-format file:
// those with a UID of at least 1000 other than nobody (65534), and root.
// System accounts are left out: their names are the same on every
// computer (www-data, postgres) and their "homes" are often directories
// such as /bin or /usr/sbin whose paths are not personal.
func ReadPasswd(path string) ([]User, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read accounts: %w", err)
	}
	defer f.Close()
	users, err := parsePasswd(f, defaultUIDMin)
	if err != nil {
		return nil, fmt.Errorf("read accounts from %s: %w", path, err)
	}
	return users, nil
}

func parsePasswd(r io.Reader, uidMin int) ([]User, error) {
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
		if uid != 0 && (uid < uidMin || uid == nobodyUID) {
			continue
		}
		users = append(users, User{Name: fields[0], Home: fields[5]})
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return users, nil
}

// Names is what an Anonymizer removes from paths besides the standard
// home locations.
type Names struct {
	// Users are people's accounts: their names and home folders.
	Users []User
	// Hosts are this computer's names (short, fully qualified, aliases).
	Hosts []string
}

// Anonymizer removes user names, home folders and the computer's names
// from paths. Its rules, in order, on the cleaned path:
//
//  1. a home folder of a person (from the account database, and of every
//     person whose programs run), or /root, or /home/<name>, or
//     /var/home/<name>: the home part becomes "~";
//  2. /run/user/<uid>/… becomes /run/user/~/…;
//  3. /media/<name>/… and /run/media/<name>/… (removable media mounted for
//     a user) become /media/~/… and /run/media/~/…;
//  4. a home folder deeper in the tree (a container's or a backup's root)
//     goes too: …/home/<name>/… and …/root/… become …/~/…;
//  5. every person's user name and every name of this computer, wherever
//     it appears in the path and whatever its case (ASCII letters), as a
//     whole component or inside one, becomes "~":
//     /srv/backups/alice/x → /srv/backups/~/x,
//     /tmp/Alice-build/parser → /tmp/~-build/parser. A name shorter than
//     three characters is removed only where it stands as a word (not
//     between letters or digits: /tmp/vm-nightly/sync → /tmp/~-nightly/sync,
//     but /usr/bin/vmstat stays), or it would take letters out of every
//     other path.
//
// People are the accounts with a uid of at least UID_MIN (1000 by
// default; see ReadPasswd) and root's home; system accounts' names are
// kept, since they are the same on every computer.
//
// The result is always a path the cloud accepts (wire.CheckPath): control
// characters become "?", it is cut to wire.MaxPathLen, and a relative path
// gives "". A home directory that is "/" or lies in a package-managed
// directory is ignored (rule 1 would otherwise turn /bin/ls into ~/ls).
// Applying an Anonymizer to its own output changes nothing.
//
// An Anonymizer made by NewAnonymizer is fixed; SystemAnonymizer's keeps
// up with the computer (see there). Both are safe for concurrent use.
type Anonymizer struct {
	rules atomic.Pointer[rules]
	// src keeps a system anonymizer's rules current; nil when fixed.
	src *sources
}

// rules is what an Anonymizer removes, at one moment. It is immutable.
type rules struct {
	homes []string // cleaned, without trailing slash, longest first
	names []string // ASCII lower case, longest first
}

// NewAnonymizer returns an Anonymizer that also knows the given accounts.
// With no accounts it still applies rules 1–4 to the standard locations.
func NewAnonymizer(users []User) *Anonymizer { return NewAnonymizerFor(Names{Users: users}) }

// NewAnonymizerFor returns a fixed Anonymizer for these names.
func NewAnonymizerFor(n Names) *Anonymizer {
	a := &Anonymizer{}
	a.rules.Store(makeRules(n.Users, n.Hosts))
	return a
}

func makeRules(users []User, hosts []string) *rules {
	r := &rules{}
	for _, u := range users {
		if u.Name != "" && u.Name != "root" {
			r.names = append(r.names, asciiLower(u.Name))
		}
		h := filepath.Clean(u.Home)
		if !strings.HasPrefix(h, "/") || h == "/" || PackageManaged(h) || h == "/nonexistent" {
			continue
		}
		r.homes = append(r.homes, h)
	}
	for _, h := range hosts {
		if h = strings.TrimSpace(h); h != "" {
			r.names = append(r.names, asciiLower(h))
		}
	}
	for _, list := range []*[]string{&r.homes, &r.names} {
		slices.Sort(*list)
		*list = slices.Compact(*list)
		slices.SortStableFunc(*list, func(x, y string) int { return len(y) - len(x) })
	}
	return r
}

// Anonymize returns path with home directories, user names and the
// computer's names removed.
func (a *Anonymizer) Anonymize(path string) string {
	if a.src != nil {
		a.src.refresh(a, false)
	}
	return wire.SanitizePath(a.rules.Load().anonymize(path))
}

// Refresh brings a system anonymizer up to date at once (new accounts,
// people whose programs run, a renamed computer); the uploader calls it
// before it builds a batch. A fixed one does not change.
func (a *Anonymizer) Refresh() {
	if a.src != nil {
		a.src.refresh(a, true)
	}
}

// Records returns recs with every path in them (the file's, a script's
// interpreter, the ELF interpreter) anonymised again with what the
// Anonymizer knows now, after a Refresh: a name learnt since a record was
// queued leaves with none of its records. Records are copied where they
// change; recs is not modified.
func (a *Anonymizer) Records(recs []wire.Record) []wire.Record {
	a.Refresh()
	var out []wire.Record
	for i := range recs {
		r := recs[i]
		changed := false
		if p := a.again(r.Path); p != r.Path {
			r.Path, changed = p, true
		}
		if p := a.again(r.Interpreter); p != r.Interpreter {
			r.Interpreter, changed = p, true
		}
		if r.ELF != nil {
			if p := a.again(r.ELF.Interpreter); p != r.ELF.Interpreter {
				e := *r.ELF
				e.Interpreter, r.ELF, changed = p, &e, true
			}
		}
		if changed && out == nil {
			out = slices.Clone(recs)
		}
		if out != nil {
			out[i] = r
		}
	}
	if out == nil {
		return recs
	}
	return out
}

// again anonymises an anonymised path (or "") once more.
func (a *Anonymizer) again(p string) string {
	if p == "" || p == wire.UnknownPath {
		return p
	}
	if q := wire.SanitizePath(a.rules.Load().anonymize(p)); q != "" {
		return q
	}
	return wire.UnknownPath
}

func (r *rules) anonymize(path string) string {
	if path == "" {
		return ""
	}
	p := filepath.Clean(path)
	if rest, ok := r.home(p); ok {
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
	return hideNames(p, r.names)
}

// hideNames replaces every occurrence of one of names (ASCII lower case)
// in p, whatever its case, with "~"; a name shorter than three bytes only
// where it stands as a word. Neighbouring or overlapping occurrences
// become one "~".
func hideNames(p string, names []string) string {
	if len(names) == 0 {
		return p
	}
	lower := asciiLower(p)
	var hide []bool
	for _, n := range names {
		for i := 0; i <= len(lower)-len(n); {
			j := strings.Index(lower[i:], n)
			if j < 0 {
				break
			}
			start, end := i+j, i+j+len(n)
			if len(n) >= 3 || (wordEdge(lower, start-1) && wordEdge(lower, end)) {
				if hide == nil {
					hide = make([]bool, len(p))
				}
				for k := start; k < end; k++ {
					hide[k] = true
				}
			}
			i = start + 1
		}
	}
	if hide == nil {
		return p
	}
	var b strings.Builder
	for i := 0; i < len(p); i++ {
		if !hide[i] {
			b.WriteByte(p[i])
			continue
		}
		b.WriteByte('~')
		for i+1 < len(p) && hide[i+1] {
			i++
		}
	}
	return b.String()
}

// wordEdge reports whether position k of s is outside a word: before the
// start, past the end, or not an ASCII letter or digit.
func wordEdge(s string, k int) bool {
	if k < 0 || k >= len(s) {
		return true
	}
	c := s[k]
	return !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c >= 0x80)
}

// asciiLower lowers ASCII letters only, so byte offsets stay the same.
func asciiLower(s string) string {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c >= 'A' && c <= 'Z' {
			b := []byte(s)
			for j := i; j < len(b); j++ {
				if b[j] >= 'A' && b[j] <= 'Z' {
					b[j] += 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return s
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
func (r *rules) home(p string) (string, bool) {
	for _, h := range r.homes {
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

// SystemAnonymizer returns the agent's Anonymizer. It knows the people
// of the account database (/etc/passwd, re-read when it changes), every
// person whose processes run (looked up through the system's user
// database, so accounts from a directory service and homes outside
// /etc/passwd count too; once seen, remembered), and this computer's
// names: the kernel's host name, /etc/hostname, the names /etc/hosts
// gives it (its fully qualified name and aliases), the short form of each,
// and the pretty name of /etc/machine-info. It looks again at most every
// refreshEvery when used, and whenever Refresh is called.
func SystemAnonymizer() *Anonymizer {
	a := &Anonymizer{src: &sources{
		root:    "/",
		uidMin:  loginDefsUIDMin("/etc/login.defs"),
		learned: map[uint32]User{},
		looked:  map[uint32]bool{},
	}}
	a.src.refresh(a, true)
	return a
}

// refreshEvery is how often a system anonymizer looks for new names.
const refreshEvery = 5 * time.Second

// Bounds of what a system anonymizer remembers of running processes.
const (
	maxLearned = 4096
	maxLooked  = 65536
)

// sources are where a system anonymizer finds names.
type sources struct {
	root   string // "/" (a test's folder in tests)
	uidMin int

	mu          sync.Mutex // protects the fields below; held while refreshing
	checked     time.Time
	passwdStamp [2]int64 // size and modification time of /etc/passwd
	passwd      []User
	learned     map[uint32]User // people seen running processes
	looked      map[uint32]bool // uids looked up
	hosts       []string
}

// refresh updates a's rules when names changed, at most every
// refreshEvery unless forced. A refresh under way in another goroutine
// is not waited for: the rules in place are used meanwhile.
func (s *sources) refresh(a *Anonymizer, force bool) {
	if force {
		s.mu.Lock()
	} else if !s.mu.TryLock() {
		return
	}
	defer s.mu.Unlock()
	now := time.Now()
	if !force && now.Sub(s.checked) < refreshEvery {
		return
	}
	s.checked = now
	changed := false
	if fi, err := os.Stat(s.path("etc/passwd")); err == nil {
		stamp := [2]int64{fi.Size(), fi.ModTime().UnixNano()}
		if stamp != s.passwdStamp {
			s.passwdStamp = stamp
			f, err := os.Open(s.path("etc/passwd"))
			if err == nil {
				if users, err := parsePasswd(f, s.uidMin); err == nil {
					s.passwd, changed = users, true
				}
				f.Close()
			}
		}
	}
	if s.learnRunning() {
		changed = true
	}
	if hosts := s.hostNames(); !slices.Equal(hosts, s.hosts) {
		s.hosts, changed = hosts, true
	}
	if !changed && a.rules.Load() != nil {
		return
	}
	users := slices.Clone(s.passwd)
	for _, u := range s.learned {
		users = append(users, u)
	}
	a.rules.Store(makeRules(users, s.hosts))
}

func (s *sources) path(rel string) string { return filepath.Join(s.root, rel) }

// learnRunning looks up the people whose processes run and are not known
// yet. It reports whether it learnt someone.
func (s *sources) learnRunning() bool {
	ents, err := os.ReadDir(s.path("proc"))
	if err != nil {
		return false
	}
	learnt := false
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(s.path("proc/"+e.Name()), &st) != nil {
			continue
		}
		uid := st.Uid
		if s.looked[uid] || int(uid) < s.uidMin || uid == nobodyUID {
			continue
		}
		if len(s.looked) >= maxLooked {
			clear(s.looked) // at worst a uid is looked up again
		}
		s.looked[uid] = true
		u, err := user.LookupId(strconv.FormatUint(uint64(uid), 10))
		if err != nil || len(s.learned) >= maxLearned {
			continue
		}
		s.learned[uid] = User{Name: u.Username, Home: u.HomeDir}
		learnt = true
	}
	return learnt
}

// hostNames returns this computer's names, sorted.
func (s *sources) hostNames() []string {
	var names []string
	add := func(n string) {
		n = strings.TrimSuffix(strings.TrimSpace(n), ".")
		if n == "" || strings.EqualFold(n, "localhost") || strings.HasPrefix(strings.ToLower(n), "localhost.") {
			return
		}
		names = append(names, n)
		if short, _, ok := strings.Cut(n, "."); ok && short != "" {
			names = append(names, short)
		}
	}
	var kernel string
	if s.root == "/" {
		kernel, _ = os.Hostname()
	}
	add(kernel)
	if b, err := os.ReadFile(s.path("etc/hostname")); err == nil {
		add(firstLine(b))
	}
	// /etc/hosts lines that name this computer give its other names.
	if b, err := os.ReadFile(s.path("etc/hosts")); err == nil {
		known := slices.Clone(names)
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			line, _, _ := strings.Cut(sc.Text(), "#")
			fields := strings.Fields(line)
			if len(fields) < 2 {
				continue
			}
			mine := false
			for _, f := range fields[1:] {
				for _, k := range known {
					if strings.EqualFold(f, k) {
						mine = true
					}
				}
			}
			if mine {
				for _, f := range fields[1:] {
					add(f)
				}
			}
		}
	}
	if b, err := os.ReadFile(s.path("etc/machine-info")); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			if v, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "PRETTY_HOSTNAME="); ok {
				add(strings.Trim(v, `"'`))
			}
		}
	}
	for i := range names {
		names[i] = asciiLower(names[i])
	}
	slices.Sort(names)
	return slices.Compact(names)
}

func firstLine(b []byte) string {
	line, _, _ := strings.Cut(string(b), "\n")
	return line
}

// loginDefsUIDMin reads UID_MIN from login.defs, 1000 when absent.
func loginDefsUIDMin(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return defaultUIDMin
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && f[0] == "UID_MIN" {
			if n, err := strconv.Atoi(f[1]); err == nil && n > 0 {
				return n
			}
		}
	}
	return defaultUIDMin
}
