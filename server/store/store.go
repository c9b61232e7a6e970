// Package store keeps the Security Network cloud's data: installations
// and a hash of their tokens, the statistics they contributed aggregated
// per file, the batch IDs already counted, and the imported verdict lists.
// One interface, Store, has two implementations over database/sql:
// embedded SQLite (modernc.org/sqlite, no cgo) for one machine and
// PostgreSQL (pgx) for several server processes on one database.
//
// What is stored, and nothing more:
//
//	installations  id, SHA-256 of the token, creation time (Unix seconds)
//	batches        installation id, batch id, receipt time
//	stats          installation id, file SHA-256, size, kind, package-managed,
//	               ELF-malformed flag, exec count, loaded flag, first/last seen
//	listed         file SHA-256 and the imported list naming it
//
// Paths, interpreters and other ELF facts are validated by the server but
// not kept: no verdict rule uses them. Deleting an installation removes
// every row that names it, in one transaction.
package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"
)

// Verdict lists an import can fill.
const (
	ListTrusted   = "trusted"
	ListUntrusted = "untrusted"
	ListMalicious = "malicious"
)

// ErrNotFound is returned when no installation has the given token.
var ErrNotFound = errors.New("not found")

// ErrUnknownInstallation is returned by Ingest when the installation does
// not exist (any more).
var ErrUnknownInstallation = errors.New("unknown installation")

// Stat is what is kept of one statistics record. Within one Ingest call
// each SHA256 appears at most once.
type Stat struct {
	SHA256         string
	Size           int64
	Kind           string
	PackageManaged bool
	Malformed      bool // an ELF parser stopped on this file
	ExecCount      int64
	Loaded         bool
	FirstSeen      time.Time
	LastSeen       time.Time
}

// FileInfo is what the store knows about one file.
type FileInfo struct {
	SHA256 string
	// Trusted, Untrusted and Malicious report the imported lists that
	// name the file.
	Trusted, Untrusted, Malicious bool
	// Prevalence is the number of installations that reported the file.
	Prevalence int
	// FirstSeen is the earliest first_seen any installation reported; zero
	// when none did.
	FirstSeen time.Time
	// Malformed reports that some installation found its ELF malformed.
	Malformed bool
}

// Store is the cloud's storage. Implementations are safe for concurrent
// use, also by several processes on one database.
type Store interface {
	// Register adds an installation identified by the SHA-256 of its token.
	Register(ctx context.Context, id string, tokenHash []byte, now time.Time) error
	// Authenticate returns the installation whose token has this hash, or
	// ErrNotFound.
	Authenticate(ctx context.Context, tokenHash []byte) (string, error)
	// InstallationExists reports whether the installation exists.
	InstallationExists(ctx context.Context, id string) (bool, error)
	// Ingest counts stats for the installation under batchID, atomically:
	// when that installation already sent batchID it counts nothing and
	// returns duplicate true, also when two identical calls race, in this
	// process or another one. It returns ErrUnknownInstallation when the
	// installation does not exist.
	Ingest(ctx context.Context, installationID, batchID string, stats []Stat, now time.Time) (duplicate bool, err error)
	// DeleteInstallation removes the installation, its token hash, its
	// batch IDs and every statistic it contributed. It reports whether the
	// installation existed.
	DeleteInstallation(ctx context.Context, id string) (existed bool, err error)
	// Stats returns what is stored for the installation, by hash.
	Stats(ctx context.Context, installationID string) ([]Stat, error)
	// Lookup returns one FileInfo per hash, in the order given.
	Lookup(ctx context.Context, hashes []string) ([]FileInfo, error)
	// ImportLists adds hashes to the named lists (ListTrusted, ...) in one
	// transaction; with replace, each named list is emptied first.
	ImportLists(ctx context.Context, lists map[string][]string, replace bool) error
	// Residue counts, per table, the rows that still hold the installation
	// ID or the token hash in any column. After DeleteInstallation every
	// count is zero.
	Residue(ctx context.Context, id string, tokenHash []byte) (map[string]int64, error)
	// Ping checks that the database answers.
	Ping(ctx context.Context) error
	Close() error
}

// DefaultDSN is the database used when none is given.
const DefaultDSN = "sqlite:./cloudprotect-server.db"

// Open opens the database named by dsn and brings its schema up to date:
// "sqlite:PATH" for embedded SQLite, "postgres://..." or
// "postgresql://..." for PostgreSQL. A nil log discards.
func Open(ctx context.Context, dsn string, log *slog.Logger) (Store, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	switch {
	case strings.HasPrefix(dsn, "sqlite:"):
		return openSQLite(ctx, strings.TrimPrefix(dsn, "sqlite:"), log)
	case strings.HasPrefix(dsn, "postgres://"), strings.HasPrefix(dsn, "postgresql://"):
		return openPostgres(ctx, dsn, log)
	}
	return nil, fmt.Errorf("open store: unknown database %q: want sqlite:PATH or postgres://HOST/DB", redact(dsn))
}

// redact hides a password in a DSN for error messages.
func redact(dsn string) string {
	scheme, rest, ok := strings.Cut(dsn, "://")
	if !ok {
		return dsn
	}
	at := strings.LastIndex(rest, "@")
	if at < 0 {
		return dsn
	}
	user, _, hasPassword := strings.Cut(rest[:at], ":")
	if !hasPassword {
		return dsn
	}
	return scheme + "://" + user + ":xxxxx" + rest[at:]
}
