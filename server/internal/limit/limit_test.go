package limit

import (
	"net/http/httptest"
	"net/netip"
	"testing"
	"time"
)

func TestAllow(t *testing.T) {
	t.Parallel()
	t0 := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	l := New(2, time.Minute, 3)
	a := netip.MustParseAddr("192.0.2.1")
	for i, want := range []bool{true, true, false} {
		if ok, _ := l.Allow(a, t0); ok != want {
			t.Fatalf("attempt %d: %v; want %v", i, ok, want)
		}
	}
	if ok, wait := l.Allow(a, t0.Add(30*time.Second)); ok || wait != 30*time.Second {
		t.Fatalf("half a refill later: %v, wait %v; want refused, 30s", ok, wait)
	}
	if ok, _ := l.Allow(a, t0.Add(90*time.Second)); !ok {
		t.Fatal("after a refill: refused")
	}
	// One IPv6 /64 is one address; another /64 is another.
	v6 := netip.MustParseAddr("2001:db8:1:2::1")
	l.Allow(v6, t0)
	l.Allow(netip.MustParseAddr("2001:db8:1:2:ffff::9"), t0)
	if ok, _ := l.Allow(netip.MustParseAddr("2001:db8:1:2::77"), t0); ok {
		t.Fatal("a third address in the same /64 got a token beyond the burst")
	}
	if ok, _ := l.Allow(netip.MustParseAddr("2001:db8:1:3::1"), t0); !ok {
		t.Fatal("another /64 was refused")
	}
	if len(l.buckets) > 3 {
		t.Fatalf("%d addresses remembered; want at most 3", len(l.buckets))
	}
	if got := RetryAfter(1500 * time.Millisecond); got != "2" {
		t.Errorf("RetryAfter(1.5s) = %q; want 2", got)
	}
}

func TestClientAddr(t *testing.T) {
	t.Parallel()
	proxies := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	for _, tc := range []struct {
		name, remote, xff, want string
	}{
		{"direct", "192.0.2.5:1234", "", "192.0.2.5"},
		{"direct ignores the header", "192.0.2.5:1234", "198.51.100.1", "192.0.2.5"},
		{"through the proxy", "10.1.2.3:80", "198.51.100.1", "198.51.100.1"},
		{"forged hop before the real one", "10.1.2.3:80", "203.0.113.66, 198.51.100.1", "198.51.100.1"},
		{"two proxies", "10.1.2.3:80", "198.51.100.1, 10.9.9.9", "198.51.100.1"},
		{"malformed hop", "10.1.2.3:80", "junk", "10.1.2.3"},
		{"proxy without header", "10.1.2.3:80", "", "10.1.2.3"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			r := httptest.NewRequest("GET", "/", nil)
			r.RemoteAddr = tc.remote
			if tc.xff != "" {
				r.Header.Set("X-Forwarded-For", tc.xff)
			}
			if got := ClientAddr(r, proxies); got.String() != tc.want {
				t.Errorf("ClientAddr = %s; want %s", got, tc.want)
			}
		})
	}
}
