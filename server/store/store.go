// Package store keeps the Security Network cloud's data: installations
// and a hash of their tokens, the statistics they contributed per file,
// the batch IDs already counted, the verdicts of curated sources (imported
// feeds and analysts) with their history, and the console's analysts and
// sessions. One interface, Store, has two implementations over
// database/sql: embedded SQLite (modernc.org/sqlite, no cgo) for one
// machine and PostgreSQL (pgx) for several server processes on one
// database.
//
// What is stored, and nothing more:
//
//	installations    id, SHA-256 of the token, creation time, last day it sent a
//	                 batch and on how many days it did (Unix seconds)
//	batches          installation id, batch id, receipt time, records in it
//	stats            installation id, file SHA-256, size, kind, path as sent
//	                 (anonymised by the agent), package-managed, ELF-malformed
//	                 flag, exec count, loaded flag, first/last seen, when the
//	                 server first stored the row and the sequence number of
//	                 that batch
//	listed           file SHA-256, the list (malicious, untrusted, trusted), the
//	                 feed that named it and when
//	decisions        file SHA-256, an analyst's verdict, the analyst, the reason
//	verdict_history  every change of a feed's or an analyst's verdict
//	analysts         name, argon2id hash of the password
//	console_sessions SHA-256 of the session cookie, analyst, CSRF token, expiry
//	pending_batches  installation id, receipt time and records of batches
//	                 not yet counted in the summaries
//	hourly           records ingested and files first stored, per hour
//	detections       file SHA-256 of reported files with a malicious verdict,
//	                 when the last installation new to them reported them
//
// (see summary.go).
// Interpreters and the other ELF facts are validated by the server but not
// kept. Deleting an installation removes every row that names it, in one
// transaction, and on SQLite overwrites the freed bytes (secure_delete)
// and empties the write-ahead log, so that nothing of it can be read from
// the files afterwards (see DeleteInstallation).
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

// ValidList reports whether name is a list an import can fill.
func ValidList(name string) bool {
	return name == ListTrusted || name == ListUntrusted || name == ListMalicious
}

// Sources of a verdict change in the history.
const (
	SourceFeed    = "feed"
	SourceAnalyst = "analyst"
)

// VerdictCleared is the history's verdict for a decision withdrawn or a
// hash removed from a feed's list.
const VerdictCleared = "cleared"

// ErrNotFound is returned when no installation has the given token, or
// no analyst or session has the given name or token.
var ErrNotFound = errors.New("not found")

// ErrUnknownInstallation is returned by Ingest when the installation does
// not exist (any more).
var ErrUnknownInstallation = errors.New("unknown installation")

// ErrExists is returned by AddAnalyst for a name already taken.
var ErrExists = errors.New("already exists")

// Stat is what is kept of one statistics record. Within one Ingest call
// each SHA256 appears at most once.
type Stat struct {
	SHA256         string
	Size           int64
	Kind           string
	Path           string // as the agent sent it (anonymised)
	PackageManaged bool
	Malformed      bool // an ELF parser stopped on this file
	ExecCount      int64
	Loaded         bool
	FirstSeen      time.Time
	LastSeen       time.Time
}

// Trust says which installations count as established: registered at
// least MinAge before Now and active (sent a batch) on at least
// MinActiveDays distinct days. Only established installations are
// evidence for a verdict rule.
type Trust struct {
	Now           time.Time
	MinAge        time.Duration
	MinActiveDays int
}

func (t Trust) registeredBefore() int64 { return t.Now.Add(-t.MinAge).Unix() }

// Listing is one feed's naming of a file.
type Listing struct {
	List    string // ListMalicious, ListUntrusted or ListTrusted
	Feed    string
	AddedAt time.Time
}

// Decision is an analyst's verdict on a file.
type Decision struct {
	Verdict   string // a wire verdict
	Analyst   string
	Reason    string
	DecidedAt time.Time
}

// FileInfo is what the store knows about one file.
type FileInfo struct {
	SHA256 string
	// Listings are the feeds that name the file.
	Listings []Listing
	// Decision is the analyst's verdict, or nil.
	Decision *Decision
	// Prevalence is the number of installations that reported the file.
	Prevalence int
	// FirstSeen is the earliest first_seen any installation reported; zero
	// when none did.
	FirstSeen time.Time
	// Malformed reports that some installation found its ELF malformed.
	Malformed bool
	// Established counts the established installations (see Trust) that
	// reported the file, and MalformedEstablished those of them that found
	// it malformed. Lookup counts them only when Malformed is true (rule 3
	// needs them then only); File always does.
	Established, MalformedEstablished int
}

// Listed reports whether a feed puts the file on list.
func (f FileInfo) Listed(list string) (Listing, bool) {
	for _, l := range f.Listings {
		if l.List == list {
			return l, true
		}
	}
	return Listing{}, false
}

// Change is one entry of the verdict history.
type Change struct {
	SHA256  string
	Verdict string // a wire verdict or VerdictCleared
	Source  string // SourceFeed or SourceAnalyst
	Actor   string // the feed's or the analyst's name
	Reason  string
	At      time.Time
}

// PathCount is a path as sent and how many installations sent it.
type PathCount struct {
	Path          string
	Installations int
}

// FileDetail is everything the console shows about one file.
type FileDetail struct {
	FileInfo
	Size      int64
	Kind      string
	LastSeen  time.Time
	StoredAt  time.Time // when the cloud first stored a report of it
	ExecCount int64
	Paths     []PathCount // most reported first, at most 50
	History   []Change    // newest first, at most 100
}

// Overview is the console's first page.
type Overview struct {
	Installations       int
	ActiveInstallations int // sent a batch in the last day
	// RecordsPerHour holds the records ingested in each of the last 24
	// hours, oldest first; the last is the current hour.
	RecordsPerHour []int64
	NewFilesToday  int // files the cloud first stored today (UTC)
	// Detections are files with a malicious verdict that installations
	// reported, most installations first, at most 20.
	Detections      []Detection
	DetectionsTotal int
	RecentChanges   []Change // newest first, at most 10
}

// Detection is a malicious file seen on installations.
type Detection struct {
	SHA256        string
	Installations int
	LastSeen      time.Time
	Source        string // SourceAnalyst or SourceFeed
}

// RareFile is an entry of the analysts' work list.
type RareFile struct {
	SHA256        string
	Installations int
	StoredAt      time.Time // when the cloud first stored a report
	Kind          string
	Path          string // one path as sent
	Decided       bool   // an analyst already decided
}

// ImportCount says what an import changed in one list.
type ImportCount struct {
	Hashes  int // distinct hashes in the file
	Added   int // newly listed by this feed
	Removed int // dropped from this feed's list by replace
}

// Analyst is a console account.
type Analyst struct {
	Name      string
	CreatedAt time.Time
}

// Session is a signed-in console session.
type Session struct {
	Analyst   string
	CSRF      string
	ExpiresAt time.Time
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
	// installation does not exist. It records the installation as active
	// on now's day.
	Ingest(ctx context.Context, installationID, batchID string, stats []Stat, now time.Time) (duplicate bool, err error)
	// DeleteInstallation removes the installation, its token hash, its
	// batch IDs and every statistic it contributed, so that none of it can
	// be read from the database files. It reports whether the
	// installation existed.
	DeleteInstallation(ctx context.Context, id string) (existed bool, err error)
	// Stats returns what is stored for the installation, by hash.
	Stats(ctx context.Context, installationID string) ([]Stat, error)
	// Lookup returns one FileInfo per hash, in the order given.
	Lookup(ctx context.Context, hashes []string, trust Trust) ([]FileInfo, error)
	// ImportLists adds hashes to the named lists (ListTrusted, ...) on
	// behalf of feed, in one transaction, recording each change in the
	// history; with replace, what the feed listed before on each named
	// list and no longer lists is removed.
	ImportLists(ctx context.Context, feed string, lists map[string][]string, replace bool, now time.Time) (map[string]ImportCount, error)
	// Decide records an analyst's verdict on a file, or withdraws the
	// decision when verdict is "", with the change in the history.
	Decide(ctx context.Context, sha256, verdict, analyst, reason string, now time.Time) error

	// File returns what the console shows about one file.
	File(ctx context.Context, sha256 string, trust Trust) (FileDetail, error)
	// Overview returns the console's overview as of now, after counting
	// the pending batches into the summaries (Summarize).
	Overview(ctx context.Context, now time.Time) (Overview, error)
	// Summarize counts the batches stored since it last ran into the
	// summaries the overview reads, and deletes summaries older than a
	// week (as of now). Any server may run it at any time.
	Summarize(ctx context.Context, now time.Time) error
	// RareFiles returns files the cloud first stored since since, reported
	// by at most maxInstallations installations, newest first.
	RareFiles(ctx context.Context, since time.Time, maxInstallations, limit int) ([]RareFile, error)

	// AddAnalyst creates a console account, or with replace sets the
	// password of an existing one (ending its sessions). It returns
	// ErrExists for a name taken without replace.
	AddAnalyst(ctx context.Context, name, passwordHash string, replace bool, now time.Time) error
	// AnalystPassword returns the password hash of an analyst, or
	// ErrNotFound.
	AnalystPassword(ctx context.Context, name string) (string, error)
	// RemoveAnalyst deletes an account and its sessions; ErrNotFound when
	// there is none.
	RemoveAnalyst(ctx context.Context, name string) error
	// Analysts lists the accounts by name.
	Analysts(ctx context.Context) ([]Analyst, error)
	// CreateSession stores a session under the hash of its cookie, and
	// removes expired ones.
	CreateSession(ctx context.Context, tokenHash []byte, s Session, now time.Time) error
	// Session returns the unexpired session with this cookie hash, or
	// ErrNotFound.
	Session(ctx context.Context, tokenHash []byte, now time.Time) (Session, error)
	// DeleteSession ends a session.
	DeleteSession(ctx context.Context, tokenHash []byte) error

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
