package cloud

import (
	"bufio"
	"context"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// Where the agent sends. The system agent sends every person's programs,
// so it must never send to an endpoint an unprivileged local user can own:
//
//   - https://… with certificate verification, against the system's
//     certificate authorities or the policy's ca_file;
//   - http://… only to loopback (127.0.0.0/8, ::1, localhost) on a port
//     below 1024 (and below net.ipv4.ip_unprivileged_port_start), where
//     only a privileged process can listen;
//   - unix:///path/to.sock, a socket owned by root in folders owned by
//     root that nobody else can write to (or sticky ones such as /tmp),
//     spoken to in plain HTTP.
//
// A user-mode agent sends only the programs of its own user. It may also
// use plain HTTP to loopback on any port, but only to a listening socket
// that belongs to its own user or root, checked through the kernel
// (/proc/net/tcp) for every connection it makes; and a unix socket owned
// by its user or root in folders nobody else can write to. That is how
// `make run` talks to the reference cloud on 127.0.0.1:8787.
//
// Nothing is sent while no server is configured: there is no default.

// ErrNoServer means no Security Network server is configured.
var ErrNoServer = errors.New("no Security Network server is configured: nothing is sent")

// NoServerHint says how to configure one.
const NoServerHint = `set "server" in /etc/cloudprotect/policy.json (for example "https://securitynetwork.example.org"), or start cloudprotectd with --server`

// EndpointError says why a configured server is not used.
type EndpointError struct {
	URL    string
	Reason string
	Hint   string
}

func (e *EndpointError) Error() string {
	return fmt.Sprintf("server %q is not used: %s", e.URL, e.Reason)
}

// unixHost is the host name requests over a unix socket carry.
const unixHost = "securitynetwork.local"

// ParseServerURL checks a Security Network URL against the rules above;
// system selects the system agent's. It returns the base URL requests
// are made to (for a unix socket, http://securitynetwork.local) and the
// socket's path for unix:// URLs.
func ParseServerURL(rawURL string, system bool) (base *url.URL, socket string, err error) {
	u, err := parseURL(rawURL)
	if err != nil {
		return nil, "", err
	}
	bad := func(reason, hint string) (*url.URL, string, error) {
		return nil, "", &EndpointError{URL: rawURL, Reason: reason, Hint: hint}
	}
	switch u.Scheme {
	case "https":
		return u, "", nil
	case "http":
		if !loopback(u.Hostname()) {
			return bad("plain HTTP is used only to a server on this computer (loopback)",
				"use https:// with a certificate the agent can verify (name the authority in the policy's ca_file)")
		}
		if system {
			port, limit := httpPort(u), privilegedPortLimit()
			if port >= limit {
				return bad(fmt.Sprintf("the system agent uses plain HTTP on loopback only below port %d, where no ordinary user can listen", limit),
					"run the local server on a port below 1024, on a unix socket owned by root (unix:///run/…/api.sock), or use https://")
			}
		}
		return u, "", nil
	case "unix":
		return &url.URL{Scheme: "http", Host: unixHost}, u.Path, nil
	}
	return bad("unknown scheme", "use https://host, http://127.0.0.1:PORT or unix:///path/to.sock")
}

// parseURL checks a URL's form: https://host[:port][/path],
// http://host[:port][/path] or unix:///absolute/path; no user name, query
// or fragment.
func parseURL(rawURL string) (*url.URL, error) {
	u, err := url.Parse(strings.TrimSpace(rawURL))
	if err != nil {
		return nil, fmt.Errorf("parse server URL: %w", err)
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" {
		return nil, fmt.Errorf("parse server URL %q: want https://host[:port][/path]", rawURL)
	}
	switch u.Scheme {
	case "https", "http":
		if u.Host == "" {
			return nil, fmt.Errorf("parse server URL %q: want https://host[:port][/path]", rawURL)
		}
		u.Path = strings.TrimRight(u.Path, "/")
		u.RawPath = ""
	case "unix":
		if u.Host != "" || !filepath.IsAbs(u.Path) || filepath.Clean(u.Path) != u.Path {
			return nil, fmt.Errorf("parse server URL %q: want unix:///absolute/path/to.sock", rawURL)
		}
	default:
		return nil, fmt.Errorf("parse server URL %q: want https://host[:port][/path]", rawURL)
	}
	return u, nil
}

func loopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func httpPort(u *url.URL) int {
	if p := u.Port(); p != "" {
		n, err := strconv.Atoi(p)
		if err != nil {
			return 65536
		}
		return n
	}
	return 80
}

// privilegedPortLimit is the first port an unprivileged process may
// listen on: 1024, or less when the administrator lowered
// net.ipv4.ip_unprivileged_port_start.
func privilegedPortLimit() int {
	limit := 1024
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_unprivileged_port_start")
	if err != nil {
		return limit
	}
	if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && n < limit {
		limit = n
	}
	return max(limit, 0)
}

// trustedOwner reports whether a local server run by uid may receive
// what this agent sends: root's always; in user mode also its own user's.
func trustedOwner(uid int, system bool) bool {
	return uid == 0 || (!system && uid == os.Getuid())
}

// checkSocket checks that the unix socket at path, and every folder
// above it, belong to trusted owners and that no one else can write to
// those folders (or only to sticky ones, like /tmp), so nobody else can
// have put the socket there or can replace it.
func checkSocket(path string, system bool) error {
	var st syscall.Stat_t
	if err := syscall.Lstat(path, &st); err != nil {
		return fmt.Errorf("server socket %s: %w", path, err)
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFSOCK {
		return fmt.Errorf("server socket %s is not a socket", path)
	}
	if !trustedOwner(int(st.Uid), system) {
		return fmt.Errorf("server socket %s belongs to uid %d, not to root: refused", path, st.Uid)
	}
	for dir := filepath.Dir(path); ; dir = filepath.Dir(dir) {
		if err := syscall.Lstat(dir, &st); err != nil {
			return fmt.Errorf("server socket folder %s: %w", dir, err)
		}
		switch {
		case st.Mode&syscall.S_IFMT != syscall.S_IFDIR:
			return fmt.Errorf("server socket folder %s is not a folder (a symbolic link?)", dir)
		case !trustedOwner(int(st.Uid), system):
			return fmt.Errorf("server socket folder %s belongs to uid %d: refused", dir, st.Uid)
		case st.Mode&0o022 != 0 && st.Mode&syscall.S_ISVTX == 0:
			// In a sticky folder (/tmp) only an entry's owner may
			// remove or rename it, and every entry below is checked.
			return fmt.Errorf("server socket folder %s can be written by others (mode %o): refused", dir, st.Mode&0o777)
		}
		if dir == "/" {
			return nil
		}
	}
}

// dialUnix dials the server's unix socket after checking it.
func dialUnix(ctx context.Context, d *net.Dialer, path string, system bool) (net.Conn, error) {
	if err := checkSocket(path, system); err != nil {
		return nil, err
	}
	return d.DialContext(ctx, "unix", path)
}

// dialLoopback dials a plain-HTTP server on loopback and, in user mode,
// checks that the socket that accepted the connection belongs to this
// user or root. The system agent reaches only ports below the privileged
// limit (see ParseServerURL), where no ordinary user can listen.
func dialLoopback(ctx context.Context, d *net.Dialer, network, addr string, system bool) (net.Conn, error) {
	c, err := d.DialContext(ctx, network, addr)
	if err != nil || system {
		return c, err
	}
	local, lok := c.LocalAddr().(*net.TCPAddr)
	remote, rok := c.RemoteAddr().(*net.TCPAddr)
	if !lok || !rok || !remote.IP.IsLoopback() {
		c.Close()
		return nil, fmt.Errorf("connect to %s: not a loopback connection", addr)
	}
	uid, err := acceptedBy(local.AddrPort(), remote.AddrPort(), system)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("connect to %s: %w", addr, err)
	}
	if !trustedOwner(uid, system) {
		c.Close()
		return nil, fmt.Errorf("connect to %s: the server there belongs to uid %d, not to this user or root: refused", addr, uid)
	}
	return c, nil
}

// acceptedBy returns the uid that holds the server's end of the loopback
// TCP connection from local to remote, as the kernel lists it in
// /proc/net/tcp and /proc/net/tcp6: the server side's entry has remote as
// its local address and local as its remote one. Until the server accepts
// the connection, some kernels list that entry as root's; so the sockets
// listening on the server's port must belong to a trusted owner as well:
// when one of them does not, its uid is returned.
func acceptedBy(local, remote netip.AddrPort, system bool) (int, error) {
	local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	remote = netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())
	found := false
	owner := 0
	// An IPv4 connection to a dual-stack listener is listed in tcp6,
	// with IPv4-mapped addresses: look in both.
	for _, file := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		f, err := os.Open(file)
		if err != nil {
			continue
		}
		socks, err := findSockets(f, remote, local)
		f.Close()
		if err != nil {
			return 0, fmt.Errorf("find the server's socket in %s: %w", file, err)
		}
		for _, s := range socks {
			if s.accepted {
				found = true
			}
			if !trustedOwner(s.uid, system) || (s.accepted && owner == 0) {
				owner = s.uid
			}
		}
	}
	if !found {
		return 0, errors.New("the server's socket is not listed in /proc/net/tcp: refused")
	}
	return owner, nil
}

// procSocket is one socket found by findSockets.
type procSocket struct {
	uid      int
	accepted bool // the connection's server side; otherwise a listener
}

// findSockets scans a /proc/net/tcp listing for the socket whose local
// and remote addresses are the given ones, and for the sockets listening
// on local's port (on local's address or on every address).
func findSockets(r io.Reader, local, remote netip.AddrPort) ([]procSocket, error) {
	var out []procSocket
	sc := bufio.NewScanner(r)
	sc.Scan() // header
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 8 {
			continue
		}
		l, err1 := parseProcAddr(f[1])
		r, err2 := parseProcAddr(f[2])
		if err1 != nil || err2 != nil || l.Port() != local.Port() {
			continue
		}
		accepted := l == local && r == remote
		listening := f[3] == "0A" && (l.Addr() == local.Addr() || l.Addr().IsUnspecified())
		if !accepted && !listening {
			continue
		}
		uid, err := strconv.Atoi(f[7])
		if err != nil {
			return nil, fmt.Errorf("malformed uid %q", f[7])
		}
		out = append(out, procSocket{uid: uid, accepted: accepted})
	}
	return out, sc.Err()
}

// parseProcAddr reads an address of /proc/net/tcp{,6}: the IP as hex
// 32-bit words in host byte order (little endian here), a colon, and
// the port in hex.
func parseProcAddr(s string) (netip.AddrPort, error) {
	ipHex, portHex, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("malformed address %q", s)
	}
	port, err := strconv.ParseUint(portHex, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("malformed port in %q", s)
	}
	raw, err := hex.DecodeString(ipHex)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, fmt.Errorf("malformed address %q", s)
	}
	// Each 32-bit word is in the kernel's byte order (little endian on
	// the machines the agent runs on): reverse the bytes of each word.
	for i := 0; i < len(raw); i += 4 {
		raw[i], raw[i+1], raw[i+2], raw[i+3] = raw[i+3], raw[i+2], raw[i+1], raw[i]
	}
	ip, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(ip.Unmap(), uint16(port)), nil
}

// maxCAFile bounds the policy's ca_file.
const maxCAFile = 1 << 20

// loadCAFile reads a PEM file of certificate authorities.
func loadCAFile(path string) (*x509.CertPool, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read ca_file: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxCAFile+1))
	if err != nil {
		return nil, fmt.Errorf("read ca_file: %w", err)
	}
	if len(b) > maxCAFile {
		return nil, fmt.Errorf("read ca_file %s: larger than %d bytes", path, maxCAFile)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("read ca_file %s: no PEM certificate in it", path)
	}
	return pool, nil
}
