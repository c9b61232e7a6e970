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

// summaryLockKey is the advisory lock of transactions that change the
// summaries (see summary.go).
const summaryLockKey = migrationLockKey + 1

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
	}, summaryMigration("BIGINT", "BIGSERIAL PRIMARY KEY")},
	lockMigrations: fmt.Sprintf("SELECT pg_advisory_xact_lock(%d)", migrationLockKey),
	lockSummaries:  fmt.Sprintf("SELECT pg_advisory_xact_lock(%d)", summaryLockKey),
	rebind:         rebindDollar,
	ingest:         postgresIngest,
	inHashes:       "%s = ANY(?::text[])",
	hashTable:      "unnest(?::text[]) AS %s(sha256)",
	inSeqs:         "%s = ANY(?::bigint[])",
	statsByTime:    "stats AS %s",
	statsBySHA:     "stats AS %s",
	hashesArg:      func(h []string) any { return h },
	seqsArg:        func(n []int64) any { return n },
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

// postgresIngest stores a batch in one statement, so one round trip: it
// marks the installation active (locking its row, which a deletion waits
// for), records the batch ID (a concurrent insert of the same ID waits
// for this one and then inserts nothing) and, only if both did something,
// records the batch as pending for the summaries and upserts the stats
// with its sequence number.
func postgresIngest(ctx context.Context, db *sql.DB, id, batchID string, stats []Stat, now time.Time) (ok, dup bool, err error) {
	a := statArrays(stats)
	var installations, batches int
	err = db.QueryRowContext(ctx, `WITH inst AS (
			UPDATE installations SET
				active_days = active_days + CASE WHEN last_active < $3 THEN 1 ELSE 0 END,
				last_active = $4
			WHERE id = $1 RETURNING id
		), b AS (
			INSERT INTO batches (installation_id, batch_id, received_at, records)
			SELECT id, $2, $4, $5 FROM inst
			ON CONFLICT DO NOTHING RETURNING installation_id
		), p AS (
			INSERT INTO pending_batches (installation_id, received_at, records)
			SELECT installation_id, $4, $5 FROM b RETURNING installation_id, seq
		), s AS (
			INSERT INTO stats
			(installation_id, created_at, batch, sha256, size, kind, path, package_managed, malformed, exec_count, loaded, first_seen, last_seen)
			SELECT p.installation_id, $4, p.seq, u.* FROM p, unnest($6::text[], $7::bigint[], $8::text[], $9::text[], $10::smallint[], $11::smallint[],
				$12::bigint[], $13::smallint[], $14::bigint[], $15::bigint[]) AS u
			`+upsertSet+`
		)
		SELECT (SELECT COUNT(*) FROM inst), (SELECT COUNT(*) FROM b)`,
		id, batchID, dayStart(now), now.Unix(), len(stats),
		a.hashes, a.sizes, a.kinds, a.paths, a.pkg, a.malf, a.execs, a.loaded, a.first, a.last).Scan(&installations, &batches)
	if err != nil {
		return false, false, err
	}
	return installations > 0, installations > 0 && batches == 0, nil
}

// arrays are stats by column, as PostgreSQL's unnest takes them.
type arrays struct {
	hashes, kinds, paths      []string
	sizes, execs, first, last []int64
	pkg, malf, loaded         []int16
}

func statArrays(stats []Stat) arrays {
	n := len(stats)
	a := arrays{
		hashes: make([]string, n), kinds: make([]string, n), paths: make([]string, n),
		sizes: make([]int64, n), execs: make([]int64, n), first: make([]int64, n), last: make([]int64, n),
		pkg: make([]int16, n), malf: make([]int16, n), loaded: make([]int16, n),
	}
	for i, st := range stats {
		a.hashes[i], a.sizes[i], a.kinds[i], a.paths[i] = st.SHA256, st.Size, st.Kind, st.Path
		a.pkg[i], a.malf[i], a.loaded[i] = int16(boolInt(st.PackageManaged)), int16(boolInt(st.Malformed)), int16(boolInt(st.Loaded))
		a.execs[i], a.first[i], a.last[i] = st.ExecCount, st.FirstSeen.Unix(), st.LastSeen.Unix()
	}
	return a
}

// upsertSet is what an upsert of stats does to a row that exists.
const upsertSet = `ON CONFLICT (installation_id, sha256) DO UPDATE SET
		size = excluded.size,
		kind = excluded.kind,
		path = excluded.path,
		package_managed = excluded.package_managed,
		malformed = GREATEST(stats.malformed, excluded.malformed),
		exec_count = stats.exec_count + excluded.exec_count,
		loaded = GREATEST(stats.loaded, excluded.loaded),
		first_seen = LEAST(stats.first_seen, excluded.first_seen),
		last_seen = GREATEST(stats.last_seen, excluded.last_seen)`

// PostgresUpsertSQL is the bare multi-row upsert of a batch's stats over
// arrays, as postgresIngest does it (which also records the batch).
// Parameters: installation ID, time of receipt, then one array per
// column. It is exported for the benchmark that compares the server's
// ingest with the bare statement.
const PostgresUpsertSQL = `INSERT INTO stats
	(installation_id, created_at, sha256, size, kind, path, package_managed, malformed, exec_count, loaded, first_seen, last_seen)
	SELECT $1, $2, u.* FROM unnest($3::text[], $4::bigint[], $5::text[], $6::text[], $7::smallint[], $8::smallint[],
		$9::bigint[], $10::smallint[], $11::bigint[], $12::bigint[]) AS u
	` + upsertSet

func postgresColumns(ctx context.Context, db *sql.DB) (map[string][]column, error) {
	return scanColumns(ctx, db, "text", "bytea", `SELECT table_name, column_name, data_type FROM information_schema.columns
		WHERE table_schema = current_schema()`)
}
