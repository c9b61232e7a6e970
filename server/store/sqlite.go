package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/url"
	"strings"

	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

var sqliteDialect = &dialect{
	name: "sqlite",
	migrations: [][]string{{
		`CREATE TABLE installations (
			id TEXT PRIMARY KEY,
			token_hash BLOB NOT NULL UNIQUE,
			created_at INTEGER NOT NULL
		)`,
		`CREATE TABLE batches (
			installation_id TEXT NOT NULL,
			batch_id TEXT NOT NULL,
			received_at INTEGER NOT NULL,
			PRIMARY KEY (installation_id, batch_id)
		) WITHOUT ROWID`,
		`CREATE TABLE stats (
			installation_id TEXT NOT NULL,
			sha256 TEXT NOT NULL,
			size INTEGER NOT NULL,
			kind TEXT NOT NULL,
			package_managed INTEGER NOT NULL,
			malformed INTEGER NOT NULL,
			exec_count INTEGER NOT NULL,
			loaded INTEGER NOT NULL,
			first_seen INTEGER NOT NULL,
			last_seen INTEGER NOT NULL,
			PRIMARY KEY (installation_id, sha256)
		) WITHOUT ROWID`,
		`CREATE INDEX stats_sha256 ON stats (sha256)`,
		`CREATE TABLE listed (
			sha256 TEXT NOT NULL,
			list TEXT NOT NULL,
			PRIMARY KEY (sha256, list)
		) WITHOUT ROWID`,
	}},
	lockInstallation: "SELECT 1 FROM installations WHERE id = ?",
	rebind:           func(q string) string { return q },
	upsertStats:      sqliteUpsertStats,
	insertListed:     sqliteInsertListed,
	lookupStats: `SELECT sha256, COUNT(*), MIN(first_seen), MAX(malformed) FROM stats
		WHERE sha256 IN (SELECT value FROM json_each(?)) GROUP BY sha256`,
	lookupListed: `SELECT sha256, list FROM listed WHERE sha256 IN (SELECT value FROM json_each(?))`,
	hashesArg: func(h []string) any {
		b, _ := json.Marshal(h) // []string always marshals
		return string(b)
	},
	columns: sqliteColumns,
}

// openSQLite opens the database file at path. WAL lets readers run beside
// the one writer; busy_timeout makes a second process wait rather than
// fail; writes begin IMMEDIATE so a transaction never has to upgrade its
// lock halfway.
func openSQLite(ctx context.Context, path string, log *slog.Logger) (*sqlStore, error) {
	if path == "" || path == ":memory:" || strings.HasPrefix(path, "file:") || strings.Contains(path, "?") {
		return nil, fmt.Errorf("open sqlite: want sqlite:PATH with a file path, got %q", path)
	}
	q := url.Values{}
	q.Add("_pragma", "busy_timeout(10000)")
	q.Add("_pragma", "journal_mode(WAL)")
	q.Add("_pragma", "synchronous(NORMAL)")
	q.Add("_pragma", "cache_size(-32768)") // KiB: 32 MiB of pages per connection
	dsn := "file:" + path + "?" + q.Encode()
	write, err := sql.Open("sqlite", dsn+"&_txlock=immediate")
	if err != nil {
		return nil, fmt.Errorf("open sqlite %s: %w", path, err)
	}
	write.SetMaxOpenConns(1)
	write.SetMaxIdleConns(1)
	write.SetConnMaxLifetime(0)
	s := &sqlStore{d: sqliteDialect, write: write, read: write, log: log}
	// Create the file and set WAL through the writer before readers open.
	if err := s.migrate(ctx); err != nil {
		write.Close()
		return nil, fmt.Errorf("open sqlite %s: %w", path, err)
	}
	read, err := sql.Open("sqlite", dsn)
	if err != nil {
		write.Close()
		return nil, fmt.Errorf("open sqlite %s: %w", path, err)
	}
	read.SetMaxOpenConns(4)
	read.SetMaxIdleConns(4)
	s.read = read
	return s, nil
}

func sqliteUpsertStats(ctx context.Context, tx *sql.Tx, id string, stats []Stat) error {
	stmt, err := tx.PrepareContext(ctx, `INSERT INTO stats
		(installation_id, sha256, size, kind, package_managed, malformed, exec_count, loaded, first_seen, last_seen)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT (installation_id, sha256) DO UPDATE SET
			size = excluded.size,
			kind = excluded.kind,
			package_managed = excluded.package_managed,
			malformed = MAX(stats.malformed, excluded.malformed),
			exec_count = stats.exec_count + excluded.exec_count,
			loaded = MAX(stats.loaded, excluded.loaded),
			first_seen = MIN(stats.first_seen, excluded.first_seen),
			last_seen = MAX(stats.last_seen, excluded.last_seen)`)
	if err != nil {
		return fmt.Errorf("prepare upsert: %w", err)
	}
	defer stmt.Close()
	for _, st := range stats {
		if _, err := stmt.ExecContext(ctx, id, st.SHA256, st.Size, st.Kind, boolInt(st.PackageManaged),
			boolInt(st.Malformed), st.ExecCount, boolInt(st.Loaded), st.FirstSeen.Unix(), st.LastSeen.Unix()); err != nil {
			return fmt.Errorf("upsert stats: %w", err)
		}
	}
	return nil
}

func sqliteInsertListed(ctx context.Context, tx *sql.Tx, list string, hashes []string) error {
	stmt, err := tx.PrepareContext(ctx, "INSERT INTO listed (sha256, list) VALUES (?, ?) ON CONFLICT DO NOTHING")
	if err != nil {
		return fmt.Errorf("prepare insert: %w", err)
	}
	defer stmt.Close()
	for _, h := range hashes {
		if _, err := stmt.ExecContext(ctx, h, list); err != nil {
			return fmt.Errorf("insert listed hash: %w", err)
		}
	}
	return nil
}

func sqliteColumns(ctx context.Context, db *sql.DB) (map[string][]column, error) {
	return scanColumns(ctx, db, "TEXT", "BLOB", `SELECT m.name, p.name, upper(p.type) FROM sqlite_master AS m
		JOIN pragma_table_info(m.name) AS p WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'`)
}
