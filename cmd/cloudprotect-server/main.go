// Command cloudprotect-server is the reference Security Network cloud.
//
//	cloudprotect-server [serve] --listen ADDR --db DSN [--tls-cert FILE --tls-key FILE]
//	cloudprotect-server import --db DSN [--trusted FILE] [--untrusted FILE] [--malicious FILE] [--replace]
//
// DSN is sqlite:PATH (the default, sqlite:./cloudprotect-server.db) or
// postgres://USER:PASS@HOST:PORT/DB. Plain HTTP is allowed only on a
// loopback address.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/cloudprotect/cloudprotect/server"
	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/server/verdict"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

const usage = `usage:
  cloudprotect-server [serve] --listen ADDR --db DSN [--tls-cert FILE --tls-key FILE]
  cloudprotect-server import --db DSN [--trusted FILE] [--untrusted FILE] [--malicious FILE] [--replace]
run "cloudprotect-server serve -h" or "cloudprotect-server import -h" for the flags
`

func run(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cmd := "serve"
	if len(args) > 0 && (args[0] == "serve" || args[0] == "import") {
		cmd, args = args[0], args[1:]
	} else if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		fmt.Fprintf(stderr, "cloudprotect-server: error: unknown command %q\n%s", args[0], usage)
		return 2
	}
	var err error
	switch cmd {
	case "serve":
		err = serve(ctx, args, stderr)
	case "import":
		err = importLists(ctx, args, stdout, stderr)
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	var usageErr usageError
	if errors.As(err, &usageErr) {
		return 2
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintf(stderr, "cloudprotect-server: error: %v\n", err)
		var h *server.HintError
		if errors.As(err, &h) {
			fmt.Fprintf(stderr, "cloudprotect-server: hint: %s\n", h.Hint)
		}
		return 1
	}
	return 0
}

// usageError is a flag parsing failure; the flag package printed it.
type usageError struct{ error }

func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err}
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "cloudprotect-server: error: unexpected argument %q\n", fs.Arg(0))
		return usageError{errors.New("unexpected argument")}
	}
	return nil
}

func serve(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		listen      = fs.String("listen", "127.0.0.1:8080", "address to listen on, `HOST:PORT`; plain HTTP only on loopback")
		dsn         = fs.String("db", store.DefaultDSN, "database: sqlite:PATH or postgres://USER:PASS@HOST:PORT/DB")
		cert        = fs.String("tls-cert", "", "TLS certificate chain, PEM `FILE`")
		key         = fs.String("tls-key", "", "TLS private key, PEM `FILE`")
		prevalence  = fs.Int("trusted-prevalence", verdict.DefaultTrustedPrevalence, "installations that must report an unlisted file for it to be trusted (0: never)")
		ttlListed   = fs.Duration("ttl-listed", verdict.DefaultListedTTL, "how long agents may cache a verdict from an imported list")
		ttlUnknown  = fs.Duration("ttl-unknown", verdict.DefaultUnknownTTL, "how long agents may cache any other verdict")
		maxIngest   = fs.Int("max-concurrent-batches", 8, "batches decoded at once; more get 503 with Retry-After")
		jsonLogs    = fs.Bool("log-json", false, "log as JSON lines instead of text")
		logRequests = fs.Bool("log-requests", true, "log one line per request")
	)
	if err := parse(fs, args); err != nil {
		return err
	}
	var h slog.Handler = slog.NewTextHandler(stderr, nil)
	if *jsonLogs {
		h = slog.NewJSONHandler(stderr, nil)
	}
	log := slog.New(h)
	reqLog := log
	if !*logRequests {
		reqLog = slog.New(slog.DiscardHandler)
	}
	l := server.Listen{Addr: *listen, TLSCert: *cert, TLSKey: *key}
	if err := l.Check(); err != nil {
		return err
	}
	st, err := store.Open(ctx, *dsn, log)
	if err != nil {
		return &server.HintError{Err: err, Hint: "check --db: sqlite:PATH in a writable directory, or a reachable postgres:// URL"}
	}
	defer st.Close()
	srv := server.New(server.Config{
		Store:               st,
		Rules:               verdict.Rules{TrustedPrevalence: *prevalence, ListedTTL: *ttlListed, UnknownTTL: *ttlUnknown},
		Logger:              reqLog,
		MaxConcurrentIngest: *maxIngest,
	})
	return server.Serve(ctx, l, srv, log)
}

func importLists(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("import", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		dsn     = fs.String("db", store.DefaultDSN, "database: sqlite:PATH or postgres://USER:PASS@HOST:PORT/DB")
		replace = fs.Bool("replace", false, "each list named replaces its previous contents instead of adding to them")
		files   = map[string]*string{
			store.ListTrusted:   fs.String("trusted", "", "`FILE` of trusted SHA-256s, one a line"),
			store.ListUntrusted: fs.String("untrusted", "", "`FILE` of untrusted SHA-256s, one a line"),
			store.ListMalicious: fs.String("malicious", "", "`FILE` of malicious SHA-256s, one a line"),
		}
	)
	if err := parse(fs, args); err != nil {
		return err
	}
	named := map[string]string{}
	for list, f := range files {
		if *f != "" {
			named[list] = *f
		}
	}
	if len(named) == 0 {
		return &server.HintError{Err: errors.New("import: no list given"), Hint: "pass --trusted FILE, --untrusted FILE and/or --malicious FILE"}
	}
	st, err := store.Open(ctx, *dsn, nil)
	if err != nil {
		return &server.HintError{Err: err, Hint: "check --db: sqlite:PATH in a writable directory, or a reachable postgres:// URL"}
	}
	defer st.Close()
	counts, err := server.ImportFiles(ctx, st, named, *replace)
	if err != nil {
		return err
	}
	for _, list := range []string{store.ListTrusted, store.ListUntrusted, store.ListMalicious} {
		if n, ok := counts[list]; ok {
			fmt.Fprintf(stdout, "imported %d %s hashes\n", n, list)
		}
	}
	return nil
}
