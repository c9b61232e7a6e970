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
	// lockSummaries runs first in every transaction that changes the
	// summaries (see summary.go); empty where transactions that write
	// are serialised anyway.
	lockSummaries string
	rebind        func(string) string
	// upsertStats stores stats of a batch with sequence number batch, in
	// tx; ingest, when set, does all of Ingest in one statement instead
	// (stats sorted by hash); ok reports whether the installation exists.
	upsertStats func(ctx context.Context, tx *sql.Tx, id string, stats []Stat, now time.Time, batch int64) error
	ingest      func(ctx context.Context, db *sql.DB, id, batchID string, stats []Stat, now time.Time) (ok, duplicate bool, err error)
	// inHashes is a condition "column is one of the hashes" over one
	// parameter, %s standing for the column; hashesArg makes the parameter.
	inHashes  string
	hashesArg func([]string) any
	// hashTable is a table of one column, sha256, holding the hashes of
	// one parameter (see hashesArg), %s standing for its alias.
	hashTable string
	// inSeqs is a condition "column is one of the numbers" over one
	// parameter, %s standing for the column; seqsArg makes the parameter.
	inSeqs  string
	seqsArg func([]int64) any
	// statsByTime names the stats table, %s standing for its alias, for a
	// query that selects by created_at, with a hint to use its index where
	// the planner needs one.
	statsByTime string
	// statsBySHA is the same for a query that selects by sha256 and
	// orders by created_at.
	statsBySHA string
	columns    func(ctx context.Context, db *sql.DB) (map[string][]column, error)
	// afterDelete runs after a deletion committed, to clear what the
	// database keeps of deleted rows outside its tables.
	afterDelete func(ctx context.Context, s *sqlStore) error
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

// in returns the condition "col is one of the hashes" and its argument.
func (s *sqlStore) in(col string, hashes []string) (string, any) {
	return fmt.Sprintf(s.d.inHashes, col), s.d.hashesArg(hashes)
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

// dayStart is the start of t's UTC day, in Unix seconds.
func dayStart(t time.Time) int64 {
	u := t.Unix()
	return u - u%86400
}

func (s *sqlStore) Ingest(ctx context.Context, installationID, batchID string, stats []Stat, now time.Time) (bool, error) {
	// Sorted by hash, rows are locked in the same order by every
	// transaction, so two batches of one installation cannot deadlock.
	stats = slices.Clone(stats)
	slices.SortFunc(stats, func(a, b Stat) int { return strings.Compare(a.SHA256, b.SHA256) })

	if s.d.ingest != nil {
		ok, dup, err := s.d.ingest(ctx, s.write, installationID, batchID, stats, now)
		if err != nil {
			return false, fmt.Errorf("ingest batch: %w", err)
		}
		if !ok {
			return false, ErrUnknownInstallation
		}
		return dup, nil
	}
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return false, fmt.Errorf("ingest batch: %w", err)
	}
	defer tx.Rollback()
	// Updating the installation's row notes the day it was active, and
	// locks the row: a concurrent deletion waits for this transaction, and
	// an ingest after it finds no row.
	res, err := tx.ExecContext(ctx, s.d.rebind(`UPDATE installations SET
		active_days = active_days + CASE WHEN last_active < ? THEN 1 ELSE 0 END,
		last_active = ?
		WHERE id = ?`), dayStart(now), now.Unix(), installationID)
	if err != nil {
		return false, fmt.Errorf("ingest batch: mark installation active: %w", err)
	}
	if n, err := res.RowsAffected(); err != nil {
		return false, fmt.Errorf("ingest batch: %w", err)
	} else if n == 0 {
		return false, ErrUnknownInstallation
	}
	// The batch row is the idempotency guard: a concurrent transaction
	// inserting the same key waits for this one and then inserts nothing.
	res, err = tx.ExecContext(ctx, s.d.rebind(
		"INSERT INTO batches (installation_id, batch_id, received_at, records) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"),
		installationID, batchID, now.Unix(), len(stats))
	if err != nil {
		return false, fmt.Errorf("ingest batch: record batch id: %w", err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("ingest batch: %w", err)
	}
	if n == 0 {
		// The activity is kept: the installation did talk to us today.
		if err := tx.Commit(); err != nil {
			return false, fmt.Errorf("ingest batch: commit: %w", err)
		}
		return true, nil
	}
	// The batch waits to be counted in the summaries under its sequence
	// number, which its new stats rows carry.
	res, err = tx.ExecContext(ctx, s.d.rebind("INSERT INTO pending_batches (installation_id, received_at, records) VALUES (?, ?, ?)"),
		installationID, now.Unix(), len(stats))
	if err != nil {
		return false, fmt.Errorf("ingest batch: record pending batch: %w", err)
	}
	seq, err := res.LastInsertId()
	if err != nil {
		return false, fmt.Errorf("ingest batch: %w", err)
	}
	if err := s.d.upsertStats(ctx, tx, installationID, stats, now, seq); err != nil {
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
	if err := s.lockSummaries(ctx, tx); err != nil {
		return false, fmt.Errorf("delete installation: %w", err)
	}
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
	detected, err := s.forgetInstallation(ctx, tx, id)
	if err != nil {
		return false, fmt.Errorf("delete installation: %w", err)
	}
	for _, q := range []string{
		"DELETE FROM stats WHERE installation_id = ?",
		"DELETE FROM batches WHERE installation_id = ?",
		"DELETE FROM pending_batches WHERE installation_id = ?",
	} {
		if _, err := tx.ExecContext(ctx, s.d.rebind(q), id); err != nil {
			return false, fmt.Errorf("delete installation: %w", err)
		}
	}
	if err := s.refreshDetections(ctx, tx, detected); err != nil {
		return false, fmt.Errorf("delete installation: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return false, fmt.Errorf("delete installation: commit: %w", err)
	}
	if n > 0 && s.d.afterDelete != nil {
		if err := s.d.afterDelete(ctx, s); err != nil {
			return true, fmt.Errorf("delete installation: %w", err)
		}
	}
	return n > 0, nil
}

func (s *sqlStore) Stats(ctx context.Context, installationID string) ([]Stat, error) {
	rows, err := s.read.QueryContext(ctx, s.d.rebind(`SELECT sha256, size, kind, path, package_managed, malformed,
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
		if err := rows.Scan(&st.SHA256, &st.Size, &st.Kind, &st.Path, &pkg, &malf, &st.ExecCount, &loaded, &first, &last); err != nil {
			return nil, fmt.Errorf("read stats: %w", err)
		}
		st.PackageManaged, st.Malformed, st.Loaded = pkg != 0, malf != 0, loaded != 0
		st.FirstSeen, st.LastSeen = unix(first), unix(last)
		out = append(out, st)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read stats: %w", err)
	}
	return out, nil
}

func unix(t int64) time.Time { return time.Unix(t, 0).UTC() }

func (s *sqlStore) Lookup(ctx context.Context, hashes []string, trust Trust) ([]FileInfo, error) {
	infos := make([]FileInfo, len(hashes))
	index := make(map[string][]int, len(hashes))
	for i, h := range hashes {
		infos[i].SHA256 = h
		index[h] = append(index[h], i)
	}
	if len(hashes) == 0 {
		return infos, nil
	}
	each := func(h string, f func(in *FileInfo)) {
		for _, i := range index[h] {
			f(&infos[i])
		}
	}
	cond, arg := s.in("sha256", hashes)
	var malformed []string
	err := s.query(ctx, "SELECT sha256, COUNT(*), MIN(first_seen), MAX(malformed) FROM stats WHERE "+cond+" GROUP BY sha256",
		[]any{arg}, func(rows *sql.Rows) error {
			var (
				h          string
				prevalence int
				first      int64
				malf       int
			)
			if err := rows.Scan(&h, &prevalence, &first, &malf); err != nil {
				return err
			}
			if malf != 0 {
				malformed = append(malformed, h)
			}
			each(h, func(in *FileInfo) {
				in.Prevalence, in.FirstSeen, in.Malformed = prevalence, unix(first), malf != 0
			})
			return nil
		})
	if err != nil {
		return nil, fmt.Errorf("look up files: %w", err)
	}
	if err := s.curated(ctx, hashes, each); err != nil {
		return nil, fmt.Errorf("look up files: %w", err)
	}
	if len(malformed) > 0 {
		if err := s.established(ctx, malformed, trust, each); err != nil {
			return nil, fmt.Errorf("look up files: %w", err)
		}
	}
	return infos, nil
}

// curated fills in the feeds' listings and the analysts' decisions.
func (s *sqlStore) curated(ctx context.Context, hashes []string, each func(string, func(*FileInfo))) error {
	cond, arg := s.in("sha256", hashes)
	err := s.query(ctx, "SELECT sha256, list, feed, added_at FROM listed WHERE "+cond+" ORDER BY sha256, list, added_at DESC",
		[]any{arg}, func(rows *sql.Rows) error {
			var (
				h string
				l Listing
				t int64
			)
			if err := rows.Scan(&h, &l.List, &l.Feed, &t); err != nil {
				return err
			}
			l.AddedAt = unix(t)
			each(h, func(in *FileInfo) { in.Listings = append(in.Listings, l) })
			return nil
		})
	if err != nil {
		return err
	}
	return s.query(ctx, "SELECT sha256, verdict, analyst, reason, decided_at FROM decisions WHERE "+cond,
		[]any{arg}, func(rows *sql.Rows) error {
			var (
				h string
				d Decision
				t int64
			)
			if err := rows.Scan(&h, &d.Verdict, &d.Analyst, &d.Reason, &t); err != nil {
				return err
			}
			d.DecidedAt = unix(t)
			each(h, func(in *FileInfo) { dd := d; in.Decision = &dd })
			return nil
		})
}

// established counts, per file, the established installations that
// reported it and those of them that found it malformed.
func (s *sqlStore) established(ctx context.Context, hashes []string, trust Trust, each func(string, func(*FileInfo))) error {
	cond, arg := s.in("s.sha256", hashes)
	return s.query(ctx, `SELECT s.sha256, COUNT(*), SUM(s.malformed) FROM stats s
		JOIN installations i ON i.id = s.installation_id
		WHERE `+cond+` AND i.created_at <= ? AND i.active_days >= ? GROUP BY s.sha256`,
		[]any{arg, trust.registeredBefore(), trust.MinActiveDays}, func(rows *sql.Rows) error {
			var (
				h       string
				n, malf int
			)
			if err := rows.Scan(&h, &n, &malf); err != nil {
				return err
			}
			each(h, func(in *FileInfo) { in.Established, in.MalformedEstablished = n, malf })
			return nil
		})
}

// query runs q on the read pool and calls f for every row.
func (s *sqlStore) query(ctx context.Context, q string, args []any, f func(*sql.Rows) error) error {
	return queryOn(ctx, s.read, s.d.rebind(q), args, f)
}

// queryOn runs q, with the dialect's placeholders, on db (a pool or a
// transaction) and calls f for every row.
func queryOn(ctx context.Context, db interface {
	QueryContext(context.Context, string, ...any) (*sql.Rows, error)
}, q string, args []any, f func(*sql.Rows) error) error {
	rows, err := db.QueryContext(ctx, q, args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		if err := f(rows); err != nil {
			return err
		}
	}
	return rows.Err()
}

// insertRows inserts rows into table in multi-row statements.
func insertRows(ctx context.Context, tx *sql.Tx, rebind func(string) string, table string, cols []string, suffix string, rows [][]any) error {
	const perStmt = 500
	for len(rows) > 0 {
		n := min(len(rows), perStmt)
		var b strings.Builder
		fmt.Fprintf(&b, "INSERT INTO %s (%s) VALUES ", table, strings.Join(cols, ", "))
		args := make([]any, 0, n*len(cols))
		ph := "(" + strings.TrimSuffix(strings.Repeat("?, ", len(cols)), ", ") + ")"
		for i, r := range rows[:n] {
			if i > 0 {
				b.WriteString(", ")
			}
			b.WriteString(ph)
			args = append(args, r...)
		}
		b.WriteString(" " + suffix)
		if _, err := tx.ExecContext(ctx, rebind(b.String()), args...); err != nil {
			return fmt.Errorf("insert into %s: %w", table, err)
		}
		rows = rows[n:]
	}
	return nil
}

func (s *sqlStore) ImportLists(ctx context.Context, feed string, lists map[string][]string, replace bool, now time.Time) (map[string]ImportCount, error) {
	if feed == "" {
		return nil, errors.New("import lists: no feed name")
	}
	for name := range lists {
		if !ValidList(name) {
			return nil, fmt.Errorf("import lists: unknown list %q", name)
		}
	}
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("import lists: %w", err)
	}
	defer tx.Rollback()
	if err := s.lockSummaries(ctx, tx); err != nil {
		return nil, fmt.Errorf("import lists: %w", err)
	}
	// Files whose malicious listing changed, for the detections.
	var changed []string
	names := make([]string, 0, len(lists))
	for name := range lists {
		names = append(names, name)
	}
	slices.Sort(names)
	out := make(map[string]ImportCount, len(lists))
	for _, name := range names {
		hashes := slices.Clone(lists[name])
		slices.Sort(hashes)
		hashes = slices.Compact(hashes)
		// What this feed already lists here.
		had := map[string]bool{}
		rows, err := tx.QueryContext(ctx, s.d.rebind("SELECT sha256 FROM listed WHERE list = ? AND feed = ?"), name, feed)
		if err != nil {
			return nil, fmt.Errorf("import lists: %s: %w", name, err)
		}
		for rows.Next() {
			var h string
			if err := rows.Scan(&h); err != nil {
				rows.Close()
				return nil, fmt.Errorf("import lists: %s: %w", name, err)
			}
			had[h] = true
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return nil, fmt.Errorf("import lists: %s: %w", name, err)
		}
		var added, history [][]any
		for _, h := range hashes {
			if had[h] {
				delete(had, h)
				continue
			}
			added = append(added, []any{h, name, feed, now.Unix()})
			history = append(history, []any{h, name, SourceFeed, feed, "", now.Unix()})
		}
		count := ImportCount{Hashes: len(hashes), Added: len(added)}
		if replace && len(had) > 0 {
			gone := make([]string, 0, len(had))
			for h := range had {
				gone = append(gone, h)
			}
			slices.Sort(gone)
			for chunk := range slices.Chunk(gone, 10000) {
				cond, arg := s.in("sha256", chunk)
				if _, err := tx.ExecContext(ctx, s.d.rebind("DELETE FROM listed WHERE list = ? AND feed = ? AND "+cond), name, feed, arg); err != nil {
					return nil, fmt.Errorf("import lists: %s: remove: %w", name, err)
				}
			}
			for _, h := range gone {
				history = append(history, []any{h, VerdictCleared, SourceFeed, feed, "removed from the " + name + " list", now.Unix()})
			}
			count.Removed = len(gone)
		}
		if name == ListMalicious {
			for _, h := range history {
				changed = append(changed, h[0].(string))
			}
		}
		if err := insertRows(ctx, tx, s.d.rebind, "listed", []string{"sha256", "list", "feed", "added_at"}, "ON CONFLICT DO NOTHING", added); err != nil {
			return nil, fmt.Errorf("import lists: %s: %w", name, err)
		}
		if err := insertRows(ctx, tx, s.d.rebind, "verdict_history", []string{"sha256", "verdict", "source", "actor", "reason", "at"}, "", history); err != nil {
			return nil, fmt.Errorf("import lists: %s: %w", name, err)
		}
		out[name] = count
	}
	if err := s.refreshDetections(ctx, tx, changed); err != nil {
		return nil, fmt.Errorf("import lists: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return nil, fmt.Errorf("import lists: commit: %w", err)
	}
	return out, nil
}

func (s *sqlStore) Decide(ctx context.Context, sha256, verdict, analyst, reason string, now time.Time) error {
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("record decision: %w", err)
	}
	defer tx.Rollback()
	if err := s.lockSummaries(ctx, tx); err != nil {
		return fmt.Errorf("record decision: %w", err)
	}
	hist := verdict
	if verdict == "" {
		hist = VerdictCleared
		if _, err := tx.ExecContext(ctx, s.d.rebind("DELETE FROM decisions WHERE sha256 = ?"), sha256); err != nil {
			return fmt.Errorf("record decision: %w", err)
		}
	} else {
		if _, err := tx.ExecContext(ctx, s.d.rebind(`INSERT INTO decisions (sha256, verdict, analyst, reason, decided_at)
			VALUES (?, ?, ?, ?, ?) ON CONFLICT (sha256) DO UPDATE SET
			verdict = excluded.verdict, analyst = excluded.analyst, reason = excluded.reason, decided_at = excluded.decided_at`),
			sha256, verdict, analyst, reason, now.Unix()); err != nil {
			return fmt.Errorf("record decision: %w", err)
		}
	}
	if _, err := tx.ExecContext(ctx, s.d.rebind(`INSERT INTO verdict_history (sha256, verdict, source, actor, reason, at)
		VALUES (?, ?, ?, ?, ?, ?)`), sha256, hist, SourceAnalyst, analyst, reason, now.Unix()); err != nil {
		return fmt.Errorf("record decision: history: %w", err)
	}
	if err := s.refreshDetections(ctx, tx, []string{sha256}); err != nil {
		return fmt.Errorf("record decision: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("record decision: commit: %w", err)
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
