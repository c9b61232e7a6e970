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
	}, {
		`ALTER TABLE installations ADD COLUMN last_active BIGINT NOT NULL DEFAULT 0`,
		`ALTER TABLE installations ADD COLUMN active_days INTEGER NOT NULL DEFAULT 0`,
		`ALTER TABLE batches ADD COLUMN records INTEGER NOT NULL DEFAULT 0`,
		`CREATE INDEX batches_received ON batches (received_at)`,
		`ALTER TABLE stats ADD COLUMN path TEXT NOT NULL DEFAULT ''`,
		`ALTER TABLE stats ADD COLUMN created_at BIGINT NOT NULL DEFAULT 0`,
		`DROP INDEX stats_sha256`,
		`CREATE INDEX stats_sha256 ON stats (sha256, created_at)`,
		`CREATE INDEX stats_created ON stats (created_at)`,
		`ALTER TABLE listed ADD COLUMN feed TEXT NOT NULL DEFAULT 'import'`,
		`ALTER TABLE listed ADD COLUMN added_at BIGINT NOT NULL DEFAULT 0`,
		`ALTER TABLE listed DROP CONSTRAINT listed_pkey`,
		`ALTER TABLE listed ADD PRIMARY KEY (sha256, list, feed)`,
		`CREATE INDEX listed_feed ON listed (feed, list)`,
		`CREATE TABLE decisions (
			sha256 TEXT PRIMARY KEY,
			verdict TEXT NOT NULL,
			analyst TEXT NOT NULL,
			reason TEXT NOT NULL,
			decided_at BIGINT NOT NULL
		)`,
		`CREATE TABLE verdict_history (
			id BIGSERIAL PRIMARY KEY,
			sha256 TEXT NOT NULL,
			verdict TEXT NOT NULL,
			source TEXT NOT NULL,
			actor TEXT NOT NULL,
			reason TEXT NOT NULL,
			at BIGINT NOT NULL
		)`,
		`CREATE INDEX verdict_history_sha256 ON verdict_history (sha256, id)`,
		`CREATE TABLE analysts (
			name TEXT PRIMARY KEY,
			password_hash TEXT NOT NULL,
			created_at BIGINT NOT NULL
		)`,
		`CREATE TABLE console_sessions (
			token_hash BYTEA PRIMARY KEY,
			analyst TEXT NOT NULL,
			csrf TEXT NOT NULL,
			created_at BIGINT NOT NULL,
			expires_at BIGINT NOT NULL
		)`,
		`CREATE INDEX console_sessions_analyst ON console_sessions (analyst)`,
	}},
	lockMigrations: fmt.Sprintf("SELECT pg_advisory_xact_lock(%d)", migrationLockKey),
	rebind:         rebindDollar,
	upsertStats:    postgresUpsertStats,
	inHashes:       "%s = ANY(?::text[])",
	hashTable:      "unnest(?::text[]) AS %s(sha256)",
	statsByTime:    "stats AS %s",
	hashesArg:      func(h []string) any { return h },
	columns:        postgresColumns,
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
func postgresUpsertStats(ctx context.Context, tx *sql.Tx, id string, stats []Stat, now time.Time) error {
	n := len(stats)
	var (
		hashes = make([]string, n)
		sizes  = make([]int64, n)
		kinds  = make([]string, n)
		paths  = make([]string, n)
		pkg    = make([]int16, n)
		malf   = make([]int16, n)
		execs  = make([]int64, n)
		loaded = make([]int16, n)
		first  = make([]int64, n)
		last   = make([]int64, n)
	)
	for i, st := range stats {
		hashes[i], sizes[i], kinds[i], paths[i] = st.SHA256, st.Size, st.Kind, st.Path
		pkg[i], malf[i], loaded[i] = int16(boolInt(st.PackageManaged)), int16(boolInt(st.Malformed)), int16(boolInt(st.Loaded))
		execs[i], first[i], last[i] = st.ExecCount, st.FirstSeen.Unix(), st.LastSeen.Unix()
	}
	if _, err := tx.ExecContext(ctx, PostgresUpsertSQL, id, now.Unix(), hashes, sizes, kinds, paths, pkg, malf, execs, loaded, first, last); err != nil {
		return fmt.Errorf("upsert stats: %w", err)
	}
	return nil
}

// PostgresUpsertSQL is the statement that stores a batch on PostgreSQL:
// one multi-row upsert over arrays. Parameters: installation ID, time of
// receipt, then one array per column. It is exported for the benchmark
// that compares the server's ingest with the bare statement.
const PostgresUpsertSQL = `INSERT INTO stats
	(installation_id, created_at, sha256, size, kind, path, package_managed, malformed, exec_count, loaded, first_seen, last_seen)
	SELECT $1, $2, u.* FROM unnest($3::text[], $4::bigint[], $5::text[], $6::text[], $7::smallint[], $8::smallint[],
		$9::bigint[], $10::smallint[], $11::bigint[], $12::bigint[]) AS u
	ON CONFLICT (installation_id, sha256) DO UPDATE SET
		size = excluded.size,
		kind = excluded.kind,
		path = excluded.path,
		package_managed = excluded.package_managed,
		malformed = GREATEST(stats.malformed, excluded.malformed),
		exec_count = stats.exec_count + excluded.exec_count,
		loaded = GREATEST(stats.loaded, excluded.loaded),
		first_seen = LEAST(stats.first_seen, excluded.first_seen),
		last_seen = GREATEST(stats.last_seen, excluded.last_seen)`

func postgresColumns(ctx context.Context, db *sql.DB) (map[string][]column, error) {
	return scanColumns(ctx, db, "text", "bytea", `SELECT table_name, column_name, data_type FROM information_schema.columns
		WHERE table_schema = current_schema()`)
}
