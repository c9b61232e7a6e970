package server_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/server"
	"github.com/cloudprotect/cloudprotect/server/store/storetest"
)

func TestIsLoopback(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		addr string
		want bool
	}{
		{"127.0.0.1:8080", true},
		{"127.9.9.9:1", true},
		{"[::1]:8080", true},
		{"localhost:8080", true},
		{":8080", false},
		{"0.0.0.0:8080", false},
		{"[::]:8080", false},
		{"192.168.1.5:8080", false},
		{"example.org:80", false},
		{"127.0.0.1", false}, // no port
	} {
		t.Run(tc.addr, func(t *testing.T) {
			t.Parallel()
			if got := server.IsLoopback(tc.addr); got != tc.want {
				t.Errorf("IsLoopback(%q) = %v; want %v", tc.addr, got, tc.want)
			}
		})
	}
}

func TestServeRefuses(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		l    server.Listen
		want string
	}{
		{"plain HTTP on every interface", server.Listen{Addr: ":0"}, "refuse plain HTTP"},
		{"plain HTTP on a LAN address", server.Listen{Addr: "192.168.1.5:0"}, "refuse plain HTTP"},
		{"cert without key", server.Listen{Addr: "127.0.0.1:0", TLSCert: "c.pem"}, "go together"},
		{"missing cert files", server.Listen{Addr: "127.0.0.1:0", TLSCert: "/nonexistent/c.pem", TLSKey: "/nonexistent/k.pem"}, "load TLS key pair"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := server.Serve(context.Background(), tc.l, http.NotFoundHandler(), nil)
			var h *server.HintError
			if !errors.As(err, &h) || !strings.Contains(err.Error(), tc.want) || h.Hint == "" {
				t.Fatalf("Serve error = %v; want a HintError mentioning %q", err, tc.want)
			}
		})
	}
}

// selfSigned writes a certificate for 127.0.0.1 and its key to dir.
func selfSigned(t *testing.T, dir string) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "cloudprotect test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

func TestServe(t *testing.T) {
	t.Parallel()
	certFile, keyFile, pool := selfSigned(t, t.TempDir())
	tests := []struct {
		name   string
		listen server.Listen
		scheme string
	}{
		{"plain HTTP on loopback", server.Listen{Addr: "127.0.0.1:0"}, "http"},
		{"TLS", server.Listen{Addr: "127.0.0.1:0", TLSCert: certFile, TLSKey: keyFile}, "https"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			st := storetest.New(t, storetest.Backends()[0])
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			addr := make(chan net.Addr, 1)
			l := tc.listen
			l.Ready = func(a net.Addr) { addr <- a }
			done := make(chan error, 1)
			go func() { done <- server.Serve(ctx, l, server.New(server.Config{Store: st}), nil) }()
			var a net.Addr
			select {
			case a = <-addr:
			case err := <-done:
				t.Fatalf("Serve: %v", err)
			}
			tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
			defer tr.CloseIdleConnections()
			client := &http.Client{Transport: tr}
			resp, err := client.Get(tc.scheme + "://" + a.String() + "/healthz")
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Fatalf("healthz: %d", resp.StatusCode)
			}
			req, _ := http.NewRequest("GET", tc.scheme+"://"+a.String()+"/healthz", nil)
			req.Header.Set("X-Padding", strings.Repeat("a", 64<<10))
			resp, err = client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
				t.Fatalf("64 KiB of headers: %d; want 431", resp.StatusCode)
			}
			tr.CloseIdleConnections()
			cancel()
			if err := <-done; !errors.Is(err, context.Canceled) {
				t.Fatalf("Serve after cancel = %v; want context.Canceled", err)
			}
		})
	}
}
