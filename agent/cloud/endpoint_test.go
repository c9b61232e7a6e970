package cloud

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestParseServerURLByMode(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, url    string
		user, system bool // accepted in user mode, in system mode
	}{
		{"https", "https://cloud.example.org", true, true},
		{"https with path and port", "https://cloud.example.org:8443/sn/", true, true},
		{"https on loopback", "https://127.0.0.1:8443", true, true},
		{"http on loopback, high port", "http://127.0.0.1:8787", true, false},
		{"http on localhost, high port", "http://localhost:8787", true, false},
		{"http on IPv6 loopback, high port", "http://[::1]:8787", true, false},
		{"http on loopback, port 80 implied", "http://127.0.0.1", true, true},
		{"http on loopback, port 443", "http://127.0.0.1:443", true, true},
		{"http on loopback, port 1023", "http://127.0.0.1:1023", true, true},
		{"http on loopback, port 1024", "http://127.0.0.1:1024", true, false},
		{"unix socket", "unix:///run/cloudprotect-cloud/api.sock", true, true},
		{"unix socket, relative", "unix:api.sock", false, false},
		{"unix socket, with a host", "unix://host/api.sock", false, false},
		{"unix socket, not clean", "unix:///run/../tmp/api.sock", false, false},
		{"http elsewhere", "http://cloud.example.org", false, false},
		{"http on a LAN address", "http://192.168.1.10:80", false, false},
		{"user info", "https://u:p@cloud.example.org", false, false},
		{"query", "https://cloud.example.org/?x=1", false, false},
		{"no host", "https:///v1", false, false},
		{"other scheme", "ftp://cloud.example.org", false, false},
		{"garbage", "::", false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			for _, mode := range []struct {
				system bool
				want   bool
			}{{false, tt.user}, {true, tt.system}} {
				_, _, err := ParseServerURL(tt.url, mode.system)
				if (err == nil) != mode.want {
					t.Errorf("ParseServerURL(%q, system %v) = %v; want ok %v", tt.url, mode.system, err, mode.want)
				}
				var ee *EndpointError
				if err != nil && errors.As(err, &ee) && ee.Hint == "" {
					t.Errorf("ParseServerURL(%q): %v without a hint", tt.url, err)
				}
			}
		})
	}
}

func TestFindSockets(t *testing.T) {
	t.Parallel()
	// Lines as Linux writes them: a listener on 127.0.0.1:8787 of uid
	// 65534, the connection from 127.0.0.1:40000 it accepted (listed as
	// root's until the server accepts it, on some kernels), and the
	// client's end of it.
	tcp := `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2253 00000000:0000 0A 00000000:00000000 00:00000000 00000000 65534        0 1111 1 0000000000000000 100 0 0 10 0
   1: 0100007F:2253 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2222 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:9C40 0100007F:2253 01 00000000:00000000 00:00000000 00000000     0        0 3333 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4444 1 0000000000000000 100 0 0 10 0
`
	server := netip.MustParseAddrPort("127.0.0.1:8787")
	client := netip.MustParseAddrPort("127.0.0.1:40000")
	socks, err := findSockets(strings.NewReader(tcp), server, client)
	want := []procSocket{{uid: 65534}, {uid: 0, accepted: true}}
	if err != nil || !slices.Equal(socks, want) {
		t.Errorf("server side = %+v %v; want %+v", socks, err, want)
	}
	socks, err = findSockets(strings.NewReader(tcp), client, server)
	if err != nil || !slices.Equal(socks, []procSocket{{uid: 0, accepted: true}}) {
		t.Errorf("client side = %+v %v", socks, err)
	}
	// IPv6 loopback, a dual-stack listener, and IPv4 mapped into its list.
	tcp6 := `  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:2253 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4443 1
   1: 00000000000000000000000001000000:2253 00000000000000000000000001000000:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 4444 1
   2: 0000000000000000FFFF00000100007F:2253 0000000000000000FFFF00000100007F:9C41 01 00000000:00000000 00:00000000 00000000  1001        0 5555 1
`
	v6server, v6client := netip.MustParseAddrPort("[::1]:8787"), netip.MustParseAddrPort("[::1]:40000")
	socks, err = findSockets(strings.NewReader(tcp6), v6server, v6client)
	if err != nil || !slices.Equal(socks, []procSocket{{uid: 1000}, {uid: 1000, accepted: true}}) {
		t.Errorf("IPv6 = %+v %v", socks, err)
	}
	socks, err = findSockets(strings.NewReader(tcp6), server, netip.MustParseAddrPort("127.0.0.1:40001"))
	if err != nil || !slices.Equal(socks, []procSocket{{uid: 1000}, {uid: 1001, accepted: true}}) {
		t.Errorf("IPv4 mapped = %+v %v", socks, err)
	}
}
