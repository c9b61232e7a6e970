package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"
)

// HintError is an error with advice a person can act on; the command
// prints both.
type HintError struct {
	Err  error
	Hint string
}

func (e *HintError) Error() string { return e.Err.Error() }
func (e *HintError) Unwrap() error { return e.Err }

// Listen holds how the server listens.
type Listen struct {
	Addr string
	// TLSCert and TLSKey are PEM files. Without them the server speaks
	// plain HTTP, which it allows only on a loopback address.
	TLSCert, TLSKey string
	// Ready, if set, is called with the bound address once listening.
	Ready func(net.Addr)
	// ShutdownTimeout bounds the wait for requests in flight on cancel;
	// 0 means 10 s.
	ShutdownTimeout time.Duration
}

// IsLoopback reports whether the host of addr ("host:port") is a loopback
// address or "localhost". An empty host means every interface: not
// loopback.
func IsLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Check refuses configurations that would expose tokens and
// statistics in clear text.
func (l Listen) Check() error {
	if (l.TLSCert == "") != (l.TLSKey == "") {
		return &HintError{Err: errors.New("check flags: --tls-cert and --tls-key go together"), Hint: "pass both, or neither to serve plain HTTP on loopback"}
	}
	if l.TLSCert == "" && !IsLoopback(l.Addr) {
		return &HintError{
			Err:  fmt.Errorf("refuse plain HTTP on %q: not a loopback address, tokens and statistics would cross the network in clear", l.Addr),
			Hint: "pass --tls-cert FILE --tls-key FILE, or listen on 127.0.0.1:PORT behind a TLS-terminating proxy",
		}
	}
	return nil
}

// Serve listens as l says and serves h until ctx is done, then shuts down
// gracefully. Timeouts guard against slow clients holding connections.
func Serve(ctx context.Context, l Listen, h http.Handler, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := l.Check(); err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       60 * time.Second, // a 1 MiB batch over a slow uplink
		WriteTimeout:      60 * time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		BaseContext:       func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
	}
	if l.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(l.TLSCert, l.TLSKey)
		if err != nil {
			return &HintError{Err: fmt.Errorf("load TLS key pair: %w", err), Hint: "--tls-cert and --tls-key must be matching PEM files"}
		}
		srv.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}
	}
	ln, err := net.Listen("tcp", l.Addr)
	if err != nil {
		return &HintError{Err: fmt.Errorf("listen: %w", err), Hint: "choose a free address with --listen HOST:PORT"}
	}
	if srv.TLSConfig != nil {
		ln = tls.NewListener(ln, srv.TLSConfig)
	}
	log.Info("listening", "addr", ln.Addr().String(), "tls", srv.TLSConfig != nil)
	if l.Ready != nil {
		l.Ready(ln.Addr())
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	timeout := l.ShutdownTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), timeout)
	defer cancel()
	err = srv.Shutdown(sctx)
	<-errc
	if err != nil {
		return fmt.Errorf("shut down: %w", err)
	}
	log.Info("stopped")
	return ctx.Err()
}
