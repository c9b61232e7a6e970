package store

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" driver
)

// migrationLockKey is the advisory lock servers take while migrating, so
// that two starting at once take turns ("cloudprotect" in ASCII, truncated).
const migrationLockKey = 0x636c6f756470

var postgresDialect = &dialect{
	name: "postgres",
	migrations: [][]string{{
		`CREATE TABLE installations (
			id TEXT PRIMARY KEY,
			token_hash BYTEA NOT NULL UNIQUE,
			created_at BIGINT NOT NULL
		)`,
		`CREATE TABLE batches (
			installation_id TEXT NOT NULL,
			batch_id TEXT NOT NULL,
			received_at BIGINT NOT NULL,
			PRIMARY KEY (installation_id, batch_id)
		)`,
		`CREATE TABLE stats (
			installation_id TEXT NOT NULL,
			sha256 TEXT NOT NULL,
			size BIGINT NOT NULL,
			kind TEXT NOT NULL,
			package_managed SMALLINT NOT NULL,
			malformed SMALLINT NOT NULL,
			exec_count BIGINT NOT NULL,
			loaded SMALLINT NOT NULL,
			first_seen BIGINT NOT NULL,
			last_seen BIGINT NOT NULL,
			PRIMARY KEY (installation_id, sha256)
		)`,
		`CREATE INDEX stats_sha256 ON stats (sha256)`,
		`CREATE TABLE listed (
			sha256 TEXT NOT NULL,
			list TEXT NOT NULL,
			PRIMARY KEY (sha256, list)
		)`,
	}},
	lockMigrations: fmt.Sprintf("SELECT pg_advisory_xact_lock(%d)", migrationLockKey),
	// FOR SHARE lets ingests of one installation run side by side while a
	// DELETE of the row waits for them, and they for it.
	lockInstallation: "SELECT 1 FROM installations WHERE id = ? FOR SHARE",
	rebind:           rebindDollar,
	upsertStats:      postgresUpsertStats,
	insertListed:     postgresInsertListed,
	lookupStats: `SELECT sha256, COUNT(*), MIN(first_seen), MAX(malformed) FROM stats
		WHERE sha256 = ANY(?::text[]) GROUP BY sha256`,
	lookupListed: `SELECT sha256, list FROM listed WHERE sha256 = ANY(?::text[])`,
	hashesArg:    func(h []string) any { return h },
	columns:      postgresColumns,
}

// openPostgres opens a pool on the database named by dsn. Several servers
// may share the database: every write is one transaction and the schema
// migration takes an advisory lock.
func openPostgres(ctx context.Context, dsn string, log *slog.Logger) (*sqlStore, error) {
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		return nil, fmt.Errorf("open postgres %s: %w", redact(dsn), err)
	}
	db.SetMaxOpenConns(16)
	db.SetMaxIdleConns(16)
	db.SetConnMaxIdleTime(5 * time.Minute)
	s := &sqlStore{d: postgresDialect, write: db, read: db, log: log}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open postgres %s: %w", redact(dsn), err)
	}
	return s, nil
}

// rebindDollar turns "?" placeholders into $1, $2, ...
func rebindDollar(q string) string {
	var b strings.Builder
	n := 0
	for i := 0; i < len(q); i++ {
		if q[i] == '?' {
			n++
			b.WriteByte('$')
			b.WriteString(strconv.Itoa(n))
			continue
		}
		b.WriteByte(q[i])
	}
	return b.String()
}

// postgresUpsertStats upserts all stats in one statement over arrays.
func postgresUpsertStats(ctx context.Context, tx *sql.Tx, id string, stats []Stat) error {
	n := len(stats)
	var (
		hashes = make([]string, n)
		sizes  = make([]int64, n)
		kinds  = make([]string, n)
		pkg    = make([]int16, n)
		malf   = make([]int16, n)
		execs  = make([]int64, n)
		loaded = make([]int16, n)
		first  = make([]int64, n)
		last   = make([]int64, n)
	)
	for i, st := range stats {
		hashes[i], sizes[i], kinds[i] = st.SHA256, st.Size, st.Kind
		pkg[i], malf[i], loaded[i] = int16(boolInt(st.PackageManaged)), int16(boolInt(st.Malformed)), int16(boolInt(st.Loaded))
		execs[i], first[i], last[i] = st.ExecCount, st.FirstSeen.Unix(), st.LastSeen.Unix()
	}
	_, err := tx.ExecContext(ctx, `INSERT INTO stats
		(installation_id, sha256, size, kind, package_managed, malformed, exec_count, loaded, first_seen, last_seen)
		SELECT $1, u.* FROM unnest($2::text[], $3::bigint[], $4::text[], $5::smallint[], $6::smallint[],
			$7::bigint[], $8::smallint[], $9::bigint[], $10::bigint[]) AS u
		ON CONFLICT (installation_id, sha256) DO UPDATE SET
			size = excluded.size,
			kind = excluded.kind,
			package_managed = excluded.package_managed,
			malformed = GREATEST(stats.malformed, excluded.malformed),
			exec_count = stats.exec_count + excluded.exec_count,
			loaded = GREATEST(stats.loaded, excluded.loaded),
			first_seen = LEAST(stats.first_seen, excluded.first_seen),
			last_seen = GREATEST(stats.last_seen, excluded.last_seen)`,
		id, hashes, sizes, kinds, pkg, malf, execs, loaded, first, last)
	if err != nil {
		return fmt.Errorf("upsert stats: %w", err)
	}
	return nil
}

func postgresInsertListed(ctx context.Context, tx *sql.Tx, list string, hashes []string) error {
	_, err := tx.ExecContext(ctx, `INSERT INTO listed (sha256, list)
		SELECT h, $1 FROM unnest($2::text[]) AS h ON CONFLICT DO NOTHING`, list, hashes)
	if err != nil {
		return fmt.Errorf("insert listed hashes: %w", err)
	}
	return nil
}

func postgresColumns(ctx context.Context, db *sql.DB) (map[string][]column, error) {
	return scanColumns(ctx, db, "text", "bytea", `SELECT table_name, column_name, data_type FROM information_schema.columns
		WHERE table_schema = current_schema()`)
}
