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
	"regexp"
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
//	{"participation": "off", "admin_group": "sudo", "server": "https://…"}
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
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			return Policy{}, fmt.Errorf("server %q is not an http(s) URL", p.Server)
		}
	}
	return p, nil
}

// LoadPolicy reads the policy at path. A missing file is the default
// policy (the person decides).
func LoadPolicy(path string) (Policy, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return Policy{Participation: PolicyUser}, nil
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
