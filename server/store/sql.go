package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"
)

// dialect holds what differs between SQLite and PostgreSQL. Queries are
// written with "?" placeholders; rebind turns them into the dialect's.
type dialect struct {
	name       string
	migrations [][]string // statements per schema version, version = index+1
	// lockMigrations runs first in the migration transaction.
	lockMigrations string
	// lockInstallation selects 1 from installations for id, holding a lock
	// that makes a concurrent deletion wait for the transaction.
	lockInstallation string
	rebind           func(string) string
	upsertStats      func(ctx context.Context, tx *sql.Tx, id string, stats []Stat) error
	insertListed     func(ctx context.Context, tx *sql.Tx, list string, hashes []string) error
	lookupStats      string // one parameter: the hashes (see hashesArg)
	lookupListed     string
	hashesArg        func([]string) any
	columns          func(ctx context.Context, db *sql.DB) (map[string][]column, error)
}

// column is one column of one table, for Residue.
type column struct {
	name string
	blob bool // holds bytes rather than text
	text bool
}

// scanColumns lists every table's columns with query, which yields
// (table, column, type) rows; textType and blobType are the database's
// names of its text and byte types.
func scanColumns(ctx context.Context, db *sql.DB, textType, blobType, query string) (map[string][]column, error) {
	rows, err := db.QueryContext(ctx, query)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string][]column{}
	for rows.Next() {
		var table, name, typ string
		if err := rows.Scan(&table, &name, &typ); err != nil {
			return nil, err
		}
		out[table] = append(out[table], column{name: name, text: typ == textType, blob: typ == blobType})
	}
	return out, rows.Err()
}

// sqlStore implements Store over database/sql. For SQLite, writes go
// through a pool of one connection (SQLite has one writer) and reads
// through another pool; for PostgreSQL both are the same pool.
type sqlStore struct {
	d     *dialect
	write *sql.DB
	read  *sql.DB
	log   *slog.Logger
}

func (s *sqlStore) Close() error {
	err := s.write.Close()
	if s.read != s.write {
		err = errors.Join(err, s.read.Close())
	}
	return err
}

func (s *sqlStore) Ping(ctx context.Context) error {
	var one int
	if err := s.read.QueryRowContext(ctx, "SELECT 1").Scan(&one); err != nil {
		return fmt.Errorf("ping %s: %w", s.d.name, err)
	}
	return nil
}

// migrate brings the schema to the newest version, one transaction for
// all steps. On PostgreSQL an advisory lock makes servers that start at
// once take turns; on SQLite the write transaction does.
func (s *sqlStore) migrate(ctx context.Context) error {
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("migrate schema: %w", err)
	}
	defer tx.Rollback()
	if s.d.lockMigrations != "" {
		if _, err := tx.ExecContext(ctx, s.d.lockMigrations); err != nil {
			return fmt.Errorf("migrate schema: lock: %w", err)
		}
	}
	if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
		version INTEGER PRIMARY KEY,
		applied_at BIGINT NOT NULL
	)`); err != nil {
		return fmt.Errorf("migrate schema: %w", err)
	}
	var current int
	if err := tx.QueryRowContext(ctx, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations").Scan(&current); err != nil {
		return fmt.Errorf("migrate schema: read version: %w", err)
	}
	latest := len(s.d.migrations)
	if current > latest {
		return fmt.Errorf("migrate schema: database is at version %d, this server knows up to %d: upgrade the server", current, latest)
	}
	for v := current + 1; v <= latest; v++ {
		for _, stmt := range s.d.migrations[v-1] {
			if _, err := tx.ExecContext(ctx, stmt); err != nil {
				return fmt.Errorf("migrate schema to version %d: %w", v, err)
			}
		}
		if _, err := tx.ExecContext(ctx, s.d.rebind("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)"), v, time.Now().Unix()); err != nil {
			return fmt.Errorf("migrate schema to version %d: %w", v, err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("migrate schema: commit: %w", err)
	}
	if current != latest {
		s.log.Info("schema migrated", "db", s.d.name, "from", current, "to", latest)
	}
	return nil
}

func (s *sqlStore) Register(ctx context.Context, id string, tokenHash []byte, now time.Time) error {
	_, err := s.write.ExecContext(ctx, s.d.rebind("INSERT INTO installations (id, token_hash, created_at) VALUES (?, ?, ?)"),
		id, tokenHash, now.Unix())
	if err != nil {
		return fmt.Errorf("register installation: %w", err)
	}
	return nil
}

func (s *sqlStore) Authenticate(ctx context.Context, tokenHash []byte) (string, error) {
	var id string
	err := s.read.QueryRowContext(ctx, s.d.rebind("SELECT id FROM installations WHERE token_hash = ?"), tokenHash).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		return "", ErrNotFound
	}
	if err != nil {
		return "", fmt.Errorf("authenticate: %w", err)
	}
	return id, nil
}

func (s *sqlStore) InstallationExists(ctx context.Context, id string) (bool, error) {
	var one int
	err := s.read.QueryRowContext(ctx, s.d.rebind("SELECT 1 FROM installations WHERE id = ?"), id).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("find installation: %w", err)
	}
	return true, nil
}

func (s *sqlStore) Ingest(ctx context.Context, installationID, batchID string, stats []Stat, now time.Time) (bool, error) {
	// Sorted by hash, rows are locked in the same order by every
	// transaction, so two batches of one installation cannot deadlock.
	stats = slices.Clone(stats)
	slices.SortFunc(stats, func(a, b Stat) int { return strings.Compare(a.SHA256, b.SHA256) })

	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return false, fmt.Errorf("ingest batch: %w", err)
	}
	defer tx.Rollback()
	var one int
	err = tx.QueryRowContext(ctx, s.d.rebind(s.d.lockInstallation), installationID).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return false, ErrUnknownInstallation
	}
	if err != nil {
		return false, fmt.Errorf("ingest batch: lock installation: %w", err)
	}
	// The batch row is the idempotency guard: a concurrent transaction
	// inserting the same key waits for this one and then inserts nothing.
	res, err := tx.ExecContext(ctx, s.d.rebind(
		"INSERT INTO batches (installation_id, batch_id, received_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"),
		installationID, batchID, now.Unix())
	if err != nil {
		return false, fmt.Errorf("ingest batch: record batch id: %w", err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("ingest batch: %w", err)
	}
	if n == 0 {
		return true, nil
	}
	if err := s.d.upsertStats(ctx, tx, installationID, stats); err != nil {
		return false, fmt.Errorf("ingest batch: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return false, fmt.Errorf("ingest batch: commit: %w", err)
	}
	return false, nil
}

func (s *sqlStore) DeleteInstallation(ctx context.Context, id string) (bool, error) {
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return false, fmt.Errorf("delete installation: %w", err)
	}
	defer tx.Rollback()
	// Deleting the installation row first waits for ingests holding it,
	// and makes later ones fail with ErrUnknownInstallation.
	res, err := tx.ExecContext(ctx, s.d.rebind("DELETE FROM installations WHERE id = ?"), id)
	if err != nil {
		return false, fmt.Errorf("delete installation: %w", err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("delete installation: %w", err)
	}
	for _, q := range []string{
		"DELETE FROM stats WHERE installation_id = ?",
		"DELETE FROM batches WHERE installation_id = ?",
	} {
		if _, err := tx.ExecContext(ctx, s.d.rebind(q), id); err != nil {
			return false, fmt.Errorf("delete installation: %w", err)
		}
	}
	if err := tx.Commit(); err != nil {
		return false, fmt.Errorf("delete installation: commit: %w", err)
	}
	return n > 0, nil
}

func (s *sqlStore) Stats(ctx context.Context, installationID string) ([]Stat, error) {
	rows, err := s.read.QueryContext(ctx, s.d.rebind(`SELECT sha256, size, kind, package_managed, malformed,
		exec_count, loaded, first_seen, last_seen FROM stats WHERE installation_id = ? ORDER BY sha256`), installationID)
	if err != nil {
		return nil, fmt.Errorf("read stats: %w", err)
	}
	defer rows.Close()
	var out []Stat
	for rows.Next() {
		var (
			st                Stat
			pkg, malf, loaded int
			first, last       int64
		)
		if err := rows.Scan(&st.SHA256, &st.Size, &st.Kind, &pkg, &malf, &st.ExecCount, &loaded, &first, &last); err != nil {
			return nil, fmt.Errorf("read stats: %w", err)
		}
		st.PackageManaged, st.Malformed, st.Loaded = pkg != 0, malf != 0, loaded != 0
		st.FirstSeen, st.LastSeen = time.Unix(first, 0).UTC(), time.Unix(last, 0).UTC()
		out = append(out, st)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read stats: %w", err)
	}
	return out, nil
}

func (s *sqlStore) Lookup(ctx context.Context, hashes []string) ([]FileInfo, error) {
	infos := make([]FileInfo, len(hashes))
	index := make(map[string][]int, len(hashes))
	for i, h := range hashes {
		infos[i].SHA256 = h
		index[h] = append(index[h], i)
	}
	if len(hashes) == 0 {
		return infos, nil
	}
	arg := s.d.hashesArg(hashes)
	rows, err := s.read.QueryContext(ctx, s.d.rebind(s.d.lookupStats), arg)
	if err != nil {
		return nil, fmt.Errorf("look up files: %w", err)
	}
	for rows.Next() {
		var (
			h          string
			prevalence int
			first      int64
			malformed  int
		)
		if err := rows.Scan(&h, &prevalence, &first, &malformed); err != nil {
			rows.Close()
			return nil, fmt.Errorf("look up files: %w", err)
		}
		for _, i := range index[h] {
			infos[i].Prevalence = prevalence
			infos[i].FirstSeen = time.Unix(first, 0).UTC()
			infos[i].Malformed = malformed != 0
		}
	}
	if err := errors.Join(rows.Err(), rows.Close()); err != nil {
		return nil, fmt.Errorf("look up files: %w", err)
	}
	rows, err = s.read.QueryContext(ctx, s.d.rebind(s.d.lookupListed), arg)
	if err != nil {
		return nil, fmt.Errorf("look up lists: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var h, list string
		if err := rows.Scan(&h, &list); err != nil {
			return nil, fmt.Errorf("look up lists: %w", err)
		}
		for _, i := range index[h] {
			switch list {
			case ListTrusted:
				infos[i].Trusted = true
			case ListUntrusted:
				infos[i].Untrusted = true
			case ListMalicious:
				infos[i].Malicious = true
			}
		}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("look up lists: %w", err)
	}
	return infos, nil
}

func (s *sqlStore) ImportLists(ctx context.Context, lists map[string][]string, replace bool) error {
	for name := range lists {
		if name != ListTrusted && name != ListUntrusted && name != ListMalicious {
			return fmt.Errorf("import lists: unknown list %q", name)
		}
	}
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("import lists: %w", err)
	}
	defer tx.Rollback()
	names := make([]string, 0, len(lists))
	for name := range lists {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		if replace {
			if _, err := tx.ExecContext(ctx, s.d.rebind("DELETE FROM listed WHERE list = ?"), name); err != nil {
				return fmt.Errorf("import lists: empty %s: %w", name, err)
			}
		}
		hashes := slices.Clone(lists[name])
		slices.Sort(hashes)
		hashes = slices.Compact(hashes)
		if err := s.d.insertListed(ctx, tx, name, hashes); err != nil {
			return fmt.Errorf("import lists: %s: %w", name, err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("import lists: commit: %w", err)
	}
	return nil
}

func (s *sqlStore) Residue(ctx context.Context, id string, tokenHash []byte) (map[string]int64, error) {
	tables, err := s.d.columns(ctx, s.read)
	if err != nil {
		return nil, fmt.Errorf("list columns: %w", err)
	}
	out := make(map[string]int64, len(tables))
	for table, cols := range tables {
		var conds []string
		var args []any
		for _, c := range cols {
			if c.text {
				conds = append(conds, quoteIdent(c.name)+" = ?")
				args = append(args, id)
			}
			if c.blob {
				conds = append(conds, quoteIdent(c.name)+" = ?")
				args = append(args, tokenHash)
			}
		}
		if len(conds) == 0 {
			out[table] = 0
			continue
		}
		q := "SELECT COUNT(*) FROM " + quoteIdent(table) + " WHERE " + strings.Join(conds, " OR ")
		var n int64
		if err := s.read.QueryRowContext(ctx, s.d.rebind(q), args...).Scan(&n); err != nil {
			return nil, fmt.Errorf("count rows in %s: %w", table, err)
		}
		out[table] = n
	}
	return out, nil
}

func quoteIdent(s string) string {
	return `"` + strings.ReplaceAll(s, `"`, `""`) + `"`
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
