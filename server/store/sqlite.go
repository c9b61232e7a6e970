package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"time"

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
	}, {
		`ALTER TABLE installations ADD COLUMN last_active INTEGER NOT NULL DEFAULT 0`,
		`ALTER TABLE installations ADD COLUMN active_days INTEGER NOT NULL DEFAULT 0`,
		`ALTER TABLE batches ADD COLUMN records INTEGER NOT NULL DEFAULT 0`,
		`CREATE INDEX batches_received ON batches (received_at)`,
		`ALTER TABLE stats ADD COLUMN path TEXT NOT NULL DEFAULT ''`,
		`ALTER TABLE stats ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0`,
		`DROP INDEX stats_sha256`,
		`CREATE INDEX stats_sha256 ON stats (sha256, created_at)`,
		`CREATE INDEX stats_created ON stats (created_at)`,
		`CREATE TABLE listed_v2 (
			sha256 TEXT NOT NULL,
			list TEXT NOT NULL,
			feed TEXT NOT NULL,
			added_at INTEGER NOT NULL,
			PRIMARY KEY (sha256, list, feed)
		) WITHOUT ROWID`,
		`INSERT INTO listed_v2 (sha256, list, feed, added_at) SELECT sha256, list, 'import', 0 FROM listed`,
		`DROP TABLE listed`,
		`ALTER TABLE listed_v2 RENAME TO listed`,
		`CREATE INDEX listed_feed ON listed (feed, list)`,
		`CREATE TABLE decisions (
			sha256 TEXT PRIMARY KEY,
			verdict TEXT NOT NULL,
			analyst TEXT NOT NULL,
			reason TEXT NOT NULL,
			decided_at INTEGER NOT NULL
		) WITHOUT ROWID`,
		`CREATE TABLE verdict_history (
			id INTEGER PRIMARY KEY AUTOINCREMENT,
			sha256 TEXT NOT NULL,
			verdict TEXT NOT NULL,
			source TEXT NOT NULL,
			actor TEXT NOT NULL,
			reason TEXT NOT NULL,
			at INTEGER NOT NULL
		)`,
		`CREATE INDEX verdict_history_sha256 ON verdict_history (sha256, id)`,
		`CREATE TABLE analysts (
			name TEXT PRIMARY KEY,
			password_hash TEXT NOT NULL,
			created_at INTEGER NOT NULL
		) WITHOUT ROWID`,
		`CREATE TABLE console_sessions (
			token_hash BLOB PRIMARY KEY,
			analyst TEXT NOT NULL,
			csrf TEXT NOT NULL,
			created_at INTEGER NOT NULL,
			expires_at INTEGER NOT NULL
		) WITHOUT ROWID`,
		`CREATE INDEX console_sessions_analyst ON console_sessions (analyst)`,
	}, summaryMigration("INTEGER", "INTEGER PRIMARY KEY AUTOINCREMENT")}, // AUTOINCREMENT: a sequence number is never used twice
	rebind:      func(q string) string { return q },
	upsertStats: sqliteUpsertStats,
	inHashes:    "%s IN (SELECT value FROM json_each(?))",
	hashTable:   "(SELECT value AS sha256 FROM json_each(?)) AS %s",
	inSeqs:      "%s IN (SELECT value FROM json_each(?))",
	// Without statistics (ANALYZE is not run: its stat4 samples would keep
	// deleted hashes) SQLite prefers scanning the by-file index.
	statsByTime: "stats AS %s INDEXED BY stats_created",
	statsBySHA:  "stats AS %s INDEXED BY stats_sha256",
	hashesArg: func(h []string) any {
		b, _ := json.Marshal(h) // []string always marshals
		return string(b)
	},
	seqsArg: func(n []int64) any {
		b, _ := json.Marshal(n) // []int64 always marshals
		return string(b)
	},
	afterDelete: sqliteAfterDelete,
	columns:     sqliteColumns,
}

// openSQLite opens the database file at path. WAL lets readers run beside
// the one writer; busy_timeout makes a second process wait rather than
// fail; writes begin IMMEDIATE so a transaction never has to upgrade its
// lock halfway. secure_delete makes SQLite overwrite deleted rows and
// freed pages with zeros, so a deleted installation cannot be read back
// from free space in the file (see sqliteAfterDelete for the WAL).
func openSQLite(ctx context.Context, path string, log *slog.Logger) (*sqlStore, error) {
	if path == "" || path == ":memory:" || strings.HasPrefix(path, "file:") || strings.Contains(path, "?") {
		return nil, fmt.Errorf("open sqlite: want sqlite:PATH with a file path, got %q", path)
	}
	q := url.Values{}
	q.Add("_pragma", "busy_timeout(10000)")
	q.Add("_pragma", "journal_mode(WAL)")
	q.Add("_pragma", "synchronous(NORMAL)")
	q.Add("_pragma", "cache_size(-32768)") // KiB: 32 MiB of pages per connection
	q.Add("_pragma", "secure_delete(ON)")
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

func sqliteUpsertStats(ctx context.Context, tx *sql.Tx, id string, stats []Stat, now time.Time, batch int64) error {
	stmt, err := tx.PrepareContext(ctx, `INSERT INTO stats
		(installation_id, sha256, size, kind, path, package_managed, malformed, exec_count, loaded, first_seen, last_seen, created_at, batch)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT (installation_id, sha256) DO UPDATE SET
			size = excluded.size,
			kind = excluded.kind,
			path = excluded.path,
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
		if _, err := stmt.ExecContext(ctx, id, st.SHA256, st.Size, st.Kind, st.Path, boolInt(st.PackageManaged),
			boolInt(st.Malformed), st.ExecCount, boolInt(st.Loaded), st.FirstSeen.Unix(), st.LastSeen.Unix(), now.Unix(), batch); err != nil {
			return fmt.Errorf("upsert stats: %w", err)
		}
	}
	return nil
}

// sqliteAfterDelete empties the write-ahead log after a deletion: its
// frames hold the pages as they were before, deleted rows included. A
// TRUNCATE checkpoint copies them into the database (where secure_delete
// has zeroed the rows) and cuts the log to nothing. Readers in the way
// make it wait (busy_timeout); if they outlast that it tries again.
func sqliteAfterDelete(ctx context.Context, s *sqlStore) error {
	for try := 0; ; try++ {
		var busy, logFrames, done int
		if err := s.write.QueryRowContext(ctx, "PRAGMA wal_checkpoint(TRUNCATE)").Scan(&busy, &logFrames, &done); err != nil {
			return fmt.Errorf("empty the write-ahead log: %w", err)
		}
		if busy == 0 {
			return nil
		}
		if try == 5 {
			return fmt.Errorf("empty the write-ahead log: readers kept it busy; it is emptied at the next deletion or restart")
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("empty the write-ahead log: %w", ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func sqliteColumns(ctx context.Context, db *sql.DB) (map[string][]column, error) {
	return scanColumns(ctx, db, "TEXT", "BLOB", `SELECT m.name, p.name, upper(p.type) FROM sqlite_master AS m
		JOIN pragma_table_info(m.name) AS p WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'`)
}
