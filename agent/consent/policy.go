package consent

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"regexp"
	"time"
)

// DefaultPolicyPath is where administrators put the policy file.
const DefaultPolicyPath = "/etc/cloudprotect/policy.json"

// maxPolicySize bounds the policy file; a real one is a few lines.
const maxPolicySize = 64 << 10

// Participation modes a policy can set.
const (
	PolicyUser = "user" // the person decides (the default)
	PolicyOn   = "on"   // participation is forced on
	PolicyOff  = "off"  // participation is forced off
)

// Policy is an administrator's policy, read from /etc/cloudprotect/policy.json:
//
//	{"participation": "off", "admin_group": "sudo", "server": "https://…",
//	 "ca_file": "/etc/cloudprotect/ca.pem",
//	 "enroll_secret_file": "/etc/cloudprotect/enroll.secret",
//	 "protection": "block", "first_sight_timeout_ms": 1500}
//
// Every field is optional. Unknown fields are an error, so a misspelt
// setting is reported rather than silently ignored.
type Policy struct {
	// Participation is "user" (default), "on" or "off".
	Participation string `json:"participation,omitempty"`
	// AdminGroup is the group whose members may change participation
	// besides root. Empty means "sudo" if it exists, else "wheel".
	AdminGroup string `json:"admin_group,omitempty"`
	// Server is the Security Network's URL, overriding the agent's flag.
	Server string `json:"server,omitempty"`
	// CAFile names a PEM file of certificate authorities the agent trusts
	// for Server, in place of the system's (a private Security Network).
	CAFile string `json:"ca_file,omitempty"`
	// EnrollSecretFile names a file holding the secret a private Security
	// Network asks for when an installation registers.
	EnrollSecretFile string `json:"enroll_secret_file,omitempty"`
	// Protection is "block" (the default: programs the Security Network
	// knows to be malicious are denied before they run) or "alert" (they
	// run and the person is told).
	Protection string `json:"protection,omitempty"`
	// FirstSightTimeoutMS bounds how long an unfamiliar program is held
	// while the agent asks the cloud (default DefaultFirstSightTimeout).
	FirstSightTimeoutMS int `json:"first_sight_timeout_ms,omitempty"`
}

// Protection modes a policy can set.
const (
	ProtectionBlock = "block"
	ProtectionAlert = "alert"
)

// Bounds of first_sight_timeout_ms.
const (
	DefaultFirstSightTimeout = 1500 * time.Millisecond
	MaxFirstSightTimeout     = 60 * time.Second
)

// FirstSightTimeout is how long an unfamiliar program may be held.
func (p Policy) FirstSightTimeout() time.Duration {
	if p.FirstSightTimeoutMS <= 0 {
		return DefaultFirstSightTimeout
	}
	return time.Duration(p.FirstSightTimeoutMS) * time.Millisecond
}

// Locked reports whether the policy forces participation on or off.
func (p Policy) Locked() bool {
	return p.Participation == PolicyOn || p.Participation == PolicyOff
}

var groupName = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}\$?$`)

// ParsePolicy decodes and checks a policy. On error nothing of it applies.
func ParsePolicy(b []byte) (Policy, error) {
	var p Policy
	if len(bytes.TrimSpace(b)) == 0 {
		return Policy{}, errors.New("the file is empty: write a JSON object such as {\"participation\": \"user\"}")
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		return Policy{}, fmt.Errorf("decode policy: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return Policy{}, errors.New("decode policy: extra data after the JSON object")
	}
	switch p.Participation {
	case "":
		p.Participation = PolicyUser
	case PolicyUser, PolicyOn, PolicyOff:
	default:
		return Policy{}, fmt.Errorf("participation is %q: use \"user\", \"on\" or \"off\"", p.Participation)
	}
	if p.AdminGroup != "" && !groupName.MatchString(p.AdminGroup) {
		return Policy{}, fmt.Errorf("admin_group %q is not a valid group name", p.AdminGroup)
	}
	if p.Server != "" {
		u, err := url.Parse(p.Server)
		web := err == nil && (u.Scheme == "https" || u.Scheme == "http") && u.Host != ""
		sock := err == nil && u.Scheme == "unix" && u.Host == "" && filepath.IsAbs(u.Path)
		if !web && !sock {
			return Policy{}, fmt.Errorf("server %q is not an https:// URL (or http:// on loopback, or unix:///path/to.sock)", p.Server)
		}
	}
	for name, f := range map[string]string{"ca_file": p.CAFile, "enroll_secret_file": p.EnrollSecretFile} {
		if f != "" && !filepath.IsAbs(f) {
			return Policy{}, fmt.Errorf("%s %q is not an absolute path: name the file from /", name, f)
		}
	}
	switch p.Protection {
	case "":
		p.Protection = ProtectionBlock
	case ProtectionBlock, ProtectionAlert:
	default:
		return Policy{}, fmt.Errorf("protection is %q: use \"block\" or \"alert\"", p.Protection)
	}
	if p.FirstSightTimeoutMS < 0 || time.Duration(p.FirstSightTimeoutMS)*time.Millisecond > MaxFirstSightTimeout {
		return Policy{}, fmt.Errorf("first_sight_timeout_ms is %d: use a value from 0 (the default, %d) to %d",
			p.FirstSightTimeoutMS, DefaultFirstSightTimeout.Milliseconds(), MaxFirstSightTimeout.Milliseconds())
	}
	return p, nil
}

// LoadPolicy reads the policy at path. A missing file is the default
// policy (the person decides).
func LoadPolicy(path string) (Policy, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return Policy{Participation: PolicyUser, Protection: ProtectionBlock}, nil
	}
	if err != nil {
		return Policy{}, fmt.Errorf("read policy: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxPolicySize+1))
	if err != nil {
		return Policy{}, fmt.Errorf("read policy: %w", err)
	}
	if len(b) > maxPolicySize {
		return Policy{}, fmt.Errorf("read policy: larger than %d bytes", maxPolicySize)
	}
	return ParsePolicy(b)
}

// AdminGroupName returns the group whose members may change participation:
// the policy's, else "sudo" if that group exists, else "wheel".
func (p Policy) AdminGroupName() string {
	if p.AdminGroup != "" {
		return p.AdminGroup
	}
	if _, err := user.LookupGroup("sudo"); err == nil {
		return "sudo"
	}
	return "wheel"
}
