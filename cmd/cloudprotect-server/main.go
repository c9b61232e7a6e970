// Command cloudprotect-server is the reference Security Network cloud.
//
//	cloudprotect-server [serve] --listen ADDR --db DSN [--tls-cert FILE --tls-key FILE] [--enroll-secret-file FILE]
//	cloudprotect-server import --db DSN [--feed NAME] [--trusted FILE] [--untrusted FILE] [--malicious FILE] [--replace]
//	cloudprotect-server analyst add|remove|list [NAME] --db DSN
//
// DSN is sqlite:PATH (the default, sqlite:./cloudprotect-server.db) or
// postgres://USER:PASS@HOST:PORT/DB. Plain HTTP is allowed only on a
// loopback address. The analysts' console is served under /console/.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"golang.org/x/term"

	"github.com/cloudprotect/cloudprotect/cmd/internal/version"
	"github.com/cloudprotect/cloudprotect/server"
	"github.com/cloudprotect/cloudprotect/server/console"
	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/server/verdict"
	"github.com/cloudprotect/cloudprotect/wire"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

const usage = `usage:
  cloudprotect-server [serve] --listen ADDR --db DSN [--tls-cert FILE --tls-key FILE] [--enroll-secret-file FILE]
  cloudprotect-server import --db DSN [--feed NAME] [--trusted FILE] [--untrusted FILE] [--malicious FILE] [--replace]
  cloudprotect-server analyst add NAME [--replace] | remove NAME | list   --db DSN
  cloudprotect-server help [COMMAND] | version
run "cloudprotect-server help COMMAND" (or COMMAND --help) for the flags of a command
`

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if len(args) > 0 {
		switch args[0] {
		case "help", "-h", "-help", "--help":
			if len(args) > 1 && args[0] == "help" {
				// help COMMAND is COMMAND --help.
				return run([]string{args[1], "--help"}, stdin, stdout, stderr)
			}
			fmt.Fprint(stdout, usage)
			return 0
		case "version", "-version", "--version":
			fmt.Fprintf(stdout, "cloudprotect-server %s\n", version.String())
			return 0
		}
	}
	// Help asked for goes to standard output; mistakes to standard error.
	flagOut := stderr
	for _, a := range args {
		if a == "-h" || a == "-help" || a == "--help" {
			flagOut = stdout
		}
	}
	cmd := "serve"
	if len(args) > 0 && (args[0] == "serve" || args[0] == "import" || args[0] == "analyst") {
		cmd, args = args[0], args[1:]
	} else if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		fmt.Fprintf(stderr, "cloudprotect-server: error: unknown command %q\n%s", args[0], usage)
		return 2
	}
	var err error
	switch cmd {
	case "serve":
		err = serve(ctx, args, flagOut)
	case "import":
		err = importLists(ctx, args, stdout, flagOut)
	case "analyst":
		err = analyst(ctx, args, stdin, stdout, flagOut)
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

// parse parses flags wherever they stand among at most maxArgs
// positional arguments, which it returns.
func parse(fs *flag.FlagSet, args []string, maxArgs int) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, usageError{err}
		}
		if fs.NArg() == 0 {
			break
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
	if len(pos) > maxArgs {
		fmt.Fprintf(fs.Output(), "cloudprotect-server: error: unexpected argument %q\n", pos[maxArgs])
		return nil, usageError{errors.New("unexpected argument")}
	}
	return pos, nil
}

const dbHint = "check --db: sqlite:PATH in a writable directory, or a reachable postgres:// URL"

func serve(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	def := verdict.Default()
	var (
		listen       = fs.String("listen", "127.0.0.1:8080", "address to listen on, `HOST:PORT`; plain HTTP only on loopback")
		dsn          = fs.String("db", store.DefaultDSN, "database: sqlite:PATH or postgres://USER:PASS@HOST:PORT/DB")
		cert         = fs.String("tls-cert", "", "TLS certificate chain, PEM `FILE`")
		key          = fs.String("tls-key", "", "TLS private key, PEM `FILE`")
		secretFile   = fs.String("enroll-secret-file", "", "`FILE` holding the secret installations must send to register (a private network); readable by the server's account only")
		regBurst     = fs.Int("register-burst", server.DefaultRegisterBurst, "registrations one address (IPv6: /64) may make at once (-1: no limit)")
		regInterval  = fs.Duration("register-interval", server.DefaultRegisterInterval, "then one registration per address every `DURATION`")
		proxies      = fs.String("trusted-proxy", "", "comma-separated `CIDRs` of reverse proxies whose X-Forwarded-For names the client")
		quorum       = fs.Int("malformed-quorum", def.MalformedQuorum, "established installations that must find an ELF malformed before it is untrusted (0: never)")
		estAge       = fs.Duration("established-age", def.EstablishedAge, "an installation counts as evidence once registered this long")
		estDays      = fs.Int("established-days", def.EstablishedDays, "and active on this many distinct days")
		ttlListed    = fs.Duration("ttl-listed", def.ListedTTL, "how long agents may cache a verdict of an analyst or a feed")
		ttlUnknown   = fs.Duration("ttl-unknown", def.UnknownTTL, "how long agents may cache any other verdict")
		maxIngest    = fs.Int("max-concurrent-batches", server.DefaultMaxConcurrentIngest, "batches decoded and stored at once; an arrived batch waits for a slot, then gets 503")
		perInst      = fs.Int("max-batches-per-installation", server.DefaultMaxBodiesPerInstallation, "batches one installation may be sending at once; more get 429")
		noConsole    = fs.Bool("no-console", false, "do not serve the analysts' console under /console/")
		jsonLogs     = fs.Bool("log-json", false, "log as JSON lines instead of text")
		logRequests  = fs.Bool("log-requests", true, "log one line per request")
		sessionHours = fs.Duration("console-session", 12*time.Hour, "how long a console sign-in lasts")
	)
	if _, err := parse(fs, args, 0); err != nil {
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
	var secret []byte
	if *secretFile != "" {
		var err error
		if secret, err = readSecret(*secretFile); err != nil {
			return err
		}
	}
	trusted, err := parsePrefixes(*proxies)
	if err != nil {
		return err
	}
	st, err := store.Open(ctx, *dsn, log)
	if err != nil {
		return &server.HintError{Err: err, Hint: dbHint}
	}
	defer st.Close()
	rules := verdict.Rules{MalformedQuorum: *quorum, EstablishedAge: *estAge, EstablishedDays: *estDays, ListedTTL: *ttlListed, UnknownTTL: *ttlUnknown}
	metrics := server.NewMetrics()
	cfg := server.Config{
		Store:                    st,
		Rules:                    rules,
		Logger:                   reqLog,
		MaxConcurrentIngest:      *maxIngest,
		MaxBodiesPerInstallation: *perInst,
		EnrollSecret:             secret,
		RegisterBurst:            *regBurst,
		RegisterInterval:         *regInterval,
		TrustedProxies:           trusted,
		Metrics:                  metrics,
	}
	if !*noConsole {
		c, err := console.New(console.Config{Store: st, Rules: rules, Logger: log, Metrics: metrics, TrustedProxies: trusted, SessionTTL: *sessionHours})
		if err != nil {
			return err
		}
		cfg.Console = c
	}
	if secret != nil {
		log.Info("registrations need the enrollment secret", "file", *secretFile)
	}
	// The summarizer runs as long as the HTTP server, and is waited for
	// before the store closes.
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	summarized := make(chan error, 1)
	go func() { summarized <- (&server.Summarizer{Store: st, Logger: log}).Serve(ctx) }()
	err = server.Serve(ctx, l, server.New(cfg), log)
	stop()
	<-summarized
	return err
}

// readSecret reads an enrollment secret: the file's contents without
// surrounding white space. The file must not be readable by others.
func readSecret(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, &server.HintError{Err: fmt.Errorf("read enrollment secret: %w", err), Hint: "pass --enroll-secret-file FILE naming a file with the secret"}
	}
	if fi.Mode().Perm()&0o004 != 0 {
		return nil, &server.HintError{Err: fmt.Errorf("read enrollment secret: %s is readable by every user", path), Hint: "chmod o-r " + path}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, &server.HintError{Err: fmt.Errorf("read enrollment secret: %w", err), Hint: "make the file readable by the server's account"}
	}
	b = []byte(strings.TrimSpace(string(b)))
	if len(b) < 16 || len(b) > wire.MaxEnrollSecret {
		return nil, &server.HintError{Err: fmt.Errorf("read enrollment secret: %s holds %d bytes", path, len(b)),
			Hint: fmt.Sprintf("write a secret of 16 to %d characters, e.g. head -c 24 /dev/urandom | base64 > %s", wire.MaxEnrollSecret, path)}
	}
	return b, nil
}

func parsePrefixes(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		if !strings.Contains(f, "/") {
			if a, err := netip.ParseAddr(f); err == nil {
				out = append(out, netip.PrefixFrom(a, a.BitLen()))
				continue
			}
		}
		p, err := netip.ParsePrefix(f)
		if err != nil {
			return nil, &server.HintError{Err: fmt.Errorf("parse --trusted-proxy: %w", err), Hint: "give addresses or CIDRs, e.g. 127.0.0.1,10.0.0.0/8"}
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

func importLists(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("import", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		dsn      = fs.String("db", store.DefaultDSN, "database: sqlite:PATH or postgres://USER:PASS@HOST:PORT/DB")
		feedName = fs.String("feed", "", "the feed's `NAME`, shown with its verdicts (default: the first file's name)")
		replace  = fs.Bool("replace", false, "what the feed listed before on a named list and no longer lists is removed")
		files    = map[string]*string{
			store.ListTrusted:   fs.String("trusted", "", "`FILE` of trusted SHA-256s: one a line, or CSV with a sha256_hash column"),
			store.ListUntrusted: fs.String("untrusted", "", "`FILE` of untrusted SHA-256s"),
			store.ListMalicious: fs.String("malicious", "", "`FILE` of malicious SHA-256s"),
		}
	)
	if _, err := parse(fs, args, 0); err != nil {
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
		return &server.HintError{Err: err, Hint: dbHint}
	}
	defer st.Close()
	counts, err := server.ImportFiles(ctx, st, *feedName, named, *replace, time.Now())
	if err != nil {
		return err
	}
	for _, list := range []string{store.ListTrusted, store.ListUntrusted, store.ListMalicious} {
		if c, ok := counts[list]; ok {
			fmt.Fprintf(stdout, "imported %d %s hashes (%d newly listed", c.Hashes, list, c.Added)
			if *replace {
				fmt.Fprintf(stdout, ", %d removed", c.Removed)
			}
			fmt.Fprintln(stdout, ")")
		}
	}
	return nil
}

func analyst(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("analyst", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: cloudprotect-server analyst add NAME [--replace] | remove NAME | list   --db DSN\n"+
			"add reads the password from the terminal (twice), or else the first line of standard input\n")
		fs.PrintDefaults()
	}
	var (
		dsn     = fs.String("db", store.DefaultDSN, "database: sqlite:PATH or postgres://USER:PASS@HOST:PORT/DB")
		replace = fs.Bool("replace", false, "add: set a new password for an existing analyst, ending their sessions")
	)
	pos, err := parse(fs, args, 2)
	if err != nil {
		return err
	}
	hintUsage := "run: cloudprotect-server analyst add NAME, analyst remove NAME or analyst list"
	if len(pos) == 0 {
		return &server.HintError{Err: errors.New("analyst: no subcommand"), Hint: hintUsage}
	}
	sub, rest := pos[0], pos[1:]
	want := map[string]int{"add": 1, "remove": 1, "list": 0}
	n, ok := want[sub]
	if !ok {
		return &server.HintError{Err: fmt.Errorf("analyst: unknown subcommand %q", sub), Hint: hintUsage}
	}
	if len(rest) != n {
		return &server.HintError{Err: fmt.Errorf("analyst %s: want %d name(s), got %d", sub, n, len(rest)), Hint: hintUsage}
	}
	var name string
	if n == 1 {
		name = rest[0]
		if !console.ValidAnalystName(name) {
			return &server.HintError{Err: fmt.Errorf("analyst %s: name %q", sub, name), Hint: "use 1 to 64 characters from a-z, 0-9 and . _ - (starting with a letter or digit)"}
		}
	}
	var hash string
	if sub == "add" {
		pw, err := readPassword(stdin, stderr)
		if err != nil {
			return err
		}
		if hash, err = console.HashPassword(pw); err != nil {
			return &server.HintError{Err: fmt.Errorf("analyst add: %w", err), Hint: "choose a longer password; a passphrase of several words is easiest"}
		}
	}
	st, err := store.Open(ctx, *dsn, nil)
	if err != nil {
		return &server.HintError{Err: err, Hint: dbHint}
	}
	defer st.Close()
	switch sub {
	case "add":
		err := st.AddAnalyst(ctx, name, hash, *replace, time.Now())
		if errors.Is(err, store.ErrExists) {
			return &server.HintError{Err: fmt.Errorf("analyst add: %s already exists", name), Hint: "pass --replace to set a new password"}
		}
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "analyst %s can sign in to the console at /console/\n", name)
	case "remove":
		err := st.RemoveAnalyst(ctx, name)
		if errors.Is(err, store.ErrNotFound) {
			return &server.HintError{Err: fmt.Errorf("analyst remove: no analyst %s", name), Hint: "see the names with: cloudprotect-server analyst list"}
		}
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "analyst %s removed and signed out\n", name)
	case "list":
		as, err := st.Analysts(ctx)
		if err != nil {
			return err
		}
		for _, a := range as {
			fmt.Fprintf(stdout, "%s\tadded %s\n", a.Name, a.CreatedAt.Format(time.DateOnly))
		}
	}
	return nil
}

// readPassword asks twice on a terminal, or reads the first line of a
// pipe.
func readPassword(stdin io.Reader, stderr io.Writer) (string, error) {
	if f, ok := stdin.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		fmt.Fprint(stderr, "Password: ")
		a, err := term.ReadPassword(int(f.Fd()))
		fmt.Fprintln(stderr)
		if err != nil {
			return "", fmt.Errorf("read password: %w", err)
		}
		fmt.Fprint(stderr, "Again: ")
		b, err := term.ReadPassword(int(f.Fd()))
		fmt.Fprintln(stderr)
		if err != nil {
			return "", fmt.Errorf("read password: %w", err)
		}
		if string(a) != string(b) {
			return "", &server.HintError{Err: errors.New("read password: the two passwords differ"), Hint: "type the same password twice"}
		}
		return string(a), nil
	}
	line, err := bufio.NewReader(io.LimitReader(stdin, 4096)).ReadString('\n')
	if err != nil && !(errors.Is(err, io.EOF) && line != "") {
		return "", &server.HintError{Err: errors.New("read password: standard input is empty"), Hint: "type it on a terminal, or pipe it: printf '%s\\n' \"$PW\" | cloudprotect-server analyst add NAME"}
	}
	return strings.TrimRight(line, "\r\n"), nil
}
