package store

import (
	"context"
	"database/sql"
	"fmt"
	"slices"
	"time"
)

// Summaries keep the overview's figures small to read, whatever the
// store holds. They hold counts and curated hashes only, never an
// installation ID:
//
//	hourly           per hour (Unix seconds, a multiple of 3600): the
//	                 records ingested in it, and the files the cloud first
//	                 stored in it (a file's first report is the earliest
//	                 created_at of its stats rows)
//	detections       one row per file with a malicious verdict that an
//	                 installation reported, and the latest time the cloud
//	                 stored a report of it by an installation new to it
//	pending_batches  batches stored but not yet counted in the summaries:
//	                 sequence number, installation ID, receipt time,
//	                 records
//
// Ingest does no summary work beyond one pending_batches row: it adds
// the batch's sequence number to the stats rows it inserts (column
// batch), so the rows of each pending batch can be found again. Counting
// a file as new, or as a detection, needs a look at every installation's
// reports of it and at the verdicts; done for each new report during
// intake, those lookups made the batch's statement a seventh to a
// third slower on PostgreSQL. Summarize does them later, a pending batch
// at a time, and deletes the pending rows it counted in the same
// transaction. A stats row is
// counted when its batch is no longer pending (batch 0: stored before
// summaries existed, counted by the migration).
//
// Whatever changes the summaries (Summarize, DeleteInstallation,
// ImportLists, Decide) takes the summary lock first (PostgreSQL: an
// advisory lock; SQLite: its one writer), so each sees what the others
// committed. Ingest takes no part in it: a batch and its pending row
// commit together, so Summarize sees either both or neither.
//
// hourly rows older than summaryRetention are deleted by Summarize; the
// overview reads the last 24 hours.

// summaryRetention is how long hourly rows are kept.
const summaryRetention = 7 * 24 * time.Hour

// summarizeChunk bounds the records one Summarize transaction counts, so
// that it holds SQLite's writer briefly.
const summarizeChunk = 20_000

// malicious is the condition "the file in column col has a malicious
// verdict": an analyst's decision, else a feed's malicious list. Written
// as scalar subqueries, so that PostgreSQL probes the indexes for each
// file rather than hashing whole tables (a feed may list millions).
func malicious(col string) string {
	return `COALESCE((SELECT md.verdict = 'malicious' FROM decisions md WHERE md.sha256 = ` + col + `),
		(SELECT 1 FROM listed ml WHERE ml.sha256 = ` + col + ` AND ml.list = 'malicious' LIMIT 1) IS NOT NULL)`
}

// summaryMigration creates the summaries and counts in them what the
// store already holds.
func summaryMigration(integer, serial string) []string {
	return append([]string{
		`ALTER TABLE stats ADD COLUMN batch ` + integer + ` NOT NULL DEFAULT 0`,
		`DROP INDEX batches_received`,
		`CREATE INDEX installations_last_active ON installations (last_active)`,
		`CREATE TABLE pending_batches (
			seq ` + serial + `,
			installation_id TEXT NOT NULL,
			received_at ` + integer + ` NOT NULL,
			records INTEGER NOT NULL
		)`,
		`CREATE TABLE hourly (
			hour ` + integer + ` PRIMARY KEY,
			records ` + integer + ` NOT NULL DEFAULT 0,
			new_files ` + integer + ` NOT NULL DEFAULT 0
		)`,
		`CREATE TABLE detections (
			sha256 TEXT PRIMARY KEY,
			last_report ` + integer + ` NOT NULL
		)`,
		`CREATE INDEX detections_last_report ON detections (last_report)`,
	}, summaryFill...)
}

// summaryFill counts what the stats and batches tables hold into the
// (empty) summaries.
var summaryFill = []string{
	`INSERT INTO hourly (hour, records)
			SELECT received_at - received_at % 3600, SUM(records) FROM batches GROUP BY received_at - received_at % 3600`,
	`INSERT INTO hourly (hour, new_files)
			SELECT f.m - f.m % 3600, COUNT(*) FROM (SELECT MIN(created_at) AS m FROM stats GROUP BY sha256) AS f
			WHERE true GROUP BY f.m - f.m % 3600
			ON CONFLICT (hour) DO UPDATE SET new_files = excluded.new_files`,
	`INSERT INTO detections (sha256, last_report)
			SELECT f.sha256, f.m FROM (SELECT sha256, MAX(created_at) AS m FROM stats GROUP BY sha256) AS f
			WHERE ` + malicious("f.sha256"),
}

// lockSummaries takes the summary lock for tx's duration.
func (s *sqlStore) lockSummaries(ctx context.Context, tx *sql.Tx) error {
	if s.d.lockSummaries == "" {
		return nil
	}
	if _, err := tx.ExecContext(ctx, s.d.lockSummaries); err != nil {
		return fmt.Errorf("lock summaries: %w", err)
	}
	return nil
}

func hourOf(t int64) int64 { return t - t%3600 }

// hourDeltas are changes to hourly rows, by hour.
type hourDeltas map[int64]*[2]int64 // records, new files

func (d hourDeltas) add(hour, records, newFiles int64) {
	v := d[hour]
	if v == nil {
		v = new([2]int64)
		d[hour] = v
	}
	v[0] += records
	v[1] += newFiles
}

// apply adds the deltas to the hourly rows.
func (d hourDeltas) apply(ctx context.Context, s *sqlStore, tx *sql.Tx) error {
	hours := make([]int64, 0, len(d))
	for h, v := range d {
		if v[0] != 0 || v[1] != 0 {
			hours = append(hours, h)
		}
	}
	slices.Sort(hours) // the same order in every transaction
	for _, h := range hours {
		v := d[h]
		if _, err := tx.ExecContext(ctx, s.d.rebind(`INSERT INTO hourly (hour, records, new_files) VALUES (?, ?, ?)
			ON CONFLICT (hour) DO UPDATE SET records = hourly.records + excluded.records, new_files = hourly.new_files + excluded.new_files`),
			h, v[0], v[1]); err != nil {
			return fmt.Errorf("update hourly summary: %w", err)
		}
	}
	return nil
}

// notPending is the condition "the stats row o is counted in the
// summaries".
const notPending = `NOT EXISTS (SELECT 1 FROM pending_batches q WHERE q.seq = o.batch)`

// Summarize counts the pending batches into the summaries, a chunk per
// transaction, and deletes hourly rows older than the retention.
func (s *sqlStore) Summarize(ctx context.Context, now time.Time) error {
	for {
		var any int
		err := s.read.QueryRowContext(ctx, "SELECT COUNT(*) FROM (SELECT 1 FROM pending_batches LIMIT 1) AS p").Scan(&any)
		if err != nil {
			return fmt.Errorf("summarize: %w", err)
		}
		if any == 0 {
			return nil
		}
		more, err := s.summarizeChunk(ctx, now)
		if err != nil {
			return fmt.Errorf("summarize: %w", err)
		}
		if !more {
			return nil
		}
	}
}

// summarizeChunk counts up to summarizeChunk records of pending batches
// (at least one batch) in one transaction; more reports whether pending
// batches were left.
func (s *sqlStore) summarizeChunk(ctx context.Context, now time.Time) (more bool, err error) {
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return false, err
	}
	defer tx.Rollback()
	if err := s.lockSummaries(ctx, tx); err != nil {
		return false, err
	}
	deltas := hourDeltas{}
	var seqs []int64
	var records int64
	err = queryOn(ctx, tx, s.d.rebind("SELECT seq, received_at, records FROM pending_batches ORDER BY seq LIMIT 1000"), nil, func(rows *sql.Rows) error {
		var seq, at, n int64
		if err := rows.Scan(&seq, &at, &n); err != nil {
			return err
		}
		if more || (len(seqs) > 0 && records+n > summarizeChunk) {
			more = true
			return nil
		}
		seqs = append(seqs, seq)
		records += n
		deltas.add(hourOf(at), n, 0)
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("read pending batches: %w", err)
	}
	if len(seqs) == 0 {
		return false, nil
	}
	more = more || len(seqs) == 1000
	seqArg := s.d.seqsArg(seqs)
	// The files these batches reported to installations new to them.
	var hashes []string
	err = queryOn(ctx, tx, s.d.rebind(`SELECT DISTINCT s.sha256 FROM pending_batches p JOIN `+fmt.Sprintf(s.d.statsByTime, "s")+`
		ON s.created_at = p.received_at AND s.installation_id = p.installation_id AND s.batch = p.seq
		WHERE `+fmt.Sprintf(s.d.inSeqs, "p.seq")), []any{seqArg}, func(rows *sql.Rows) error {
		var h string
		if err := rows.Scan(&h); err != nil {
			return err
		}
		hashes = append(hashes, h)
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("read pending reports: %w", err)
	}
	// A file is new in the hour of its earliest report: compare the
	// earliest counted report before and after these batches count.
	for chunk := range slices.Chunk(hashes, 5000) {
		err := queryOn(ctx, tx, s.d.rebind(`SELECT x.old, x.new FROM (SELECT
			(SELECT o.created_at FROM `+fmt.Sprintf(s.d.statsBySHA, "o")+` WHERE o.sha256 = c.sha256 AND `+notPending+`
				ORDER BY o.created_at LIMIT 1) AS old,
			(SELECT o.created_at FROM `+fmt.Sprintf(s.d.statsBySHA, "o")+` WHERE o.sha256 = c.sha256
				AND (`+fmt.Sprintf(s.d.inSeqs, "o.batch")+` OR `+notPending+`)
				ORDER BY o.created_at LIMIT 1) AS new
			FROM `+fmt.Sprintf(s.d.hashTable, "c")+`) AS x`), []any{seqArg, s.d.hashesArg(chunk)}, deltas.moveFirstReports)
		if err != nil {
			return false, fmt.Errorf("count new files: %w", err)
		}
		if err := s.upsertDetections(ctx, tx, chunk); err != nil {
			return false, err
		}
	}
	if err := deltas.apply(ctx, s, tx); err != nil {
		return false, err
	}
	if _, err := tx.ExecContext(ctx, s.d.rebind("DELETE FROM pending_batches WHERE "+fmt.Sprintf(s.d.inSeqs, "seq")), seqArg); err != nil {
		return false, fmt.Errorf("delete counted batches: %w", err)
	}
	if _, err := tx.ExecContext(ctx, s.d.rebind("DELETE FROM hourly WHERE hour < ?"), now.Add(-summaryRetention).Unix()); err != nil {
		return false, fmt.Errorf("delete old summaries: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return false, fmt.Errorf("commit: %w", err)
	}
	return more, nil
}

// moveFirstReports reads rows of a file's old and new earliest counted
// report (either may be absent) and records that the file is new in the
// new one's hour instead of the old one's.
func (d hourDeltas) moveFirstReports(rows *sql.Rows) error {
	var old, nw sql.NullInt64
	if err := rows.Scan(&old, &nw); err != nil {
		return err
	}
	if old.Valid && nw.Valid && hourOf(old.Int64) == hourOf(nw.Int64) {
		return nil
	}
	if old.Valid {
		d.add(hourOf(old.Int64), 0, -1)
	}
	if nw.Valid {
		d.add(hourOf(nw.Int64), 0, 1)
	}
	return nil
}

// upsertDetections adds or updates the detections of those of hashes
// that have a malicious verdict and a report.
func (s *sqlStore) upsertDetections(ctx context.Context, tx *sql.Tx, hashes []string) error {
	_, err := tx.ExecContext(ctx, s.d.rebind(`INSERT INTO detections (sha256, last_report)
		SELECT c.sha256, (SELECT MAX(o.created_at) FROM stats o WHERE o.sha256 = c.sha256) AS m
		FROM `+fmt.Sprintf(s.d.hashTable, "c")+`
		WHERE `+malicious("c.sha256")+` AND EXISTS (SELECT 1 FROM stats o WHERE o.sha256 = c.sha256)
		ON CONFLICT (sha256) DO UPDATE SET last_report = excluded.last_report`), s.d.hashesArg(hashes))
	if err != nil {
		return fmt.Errorf("update detections: %w", err)
	}
	return nil
}

// refreshDetections recomputes the detections of hashes after their
// verdicts or reports changed.
func (s *sqlStore) refreshDetections(ctx context.Context, tx *sql.Tx, hashes []string) error {
	for chunk := range slices.Chunk(hashes, 10000) {
		cond, arg := s.in("sha256", chunk)
		if _, err := tx.ExecContext(ctx, s.d.rebind("DELETE FROM detections WHERE "+cond), arg); err != nil {
			return fmt.Errorf("update detections: %w", err)
		}
		if err := s.upsertDetections(ctx, tx, chunk); err != nil {
			return err
		}
	}
	return nil
}

// forgetInstallation takes an installation's part out of the summaries,
// before its rows are deleted in tx: its counted records and the files
// it reported first. It returns the detections it reported, to be
// recomputed (refreshDetections) once its rows are gone.
func (s *sqlStore) forgetInstallation(ctx context.Context, tx *sql.Tx, id string) (detected []string, err error) {
	deltas := hourDeltas{}
	// Counted records: its batches less its pending ones.
	for _, q := range []struct {
		query string
		sign  int64
	}{
		{"SELECT received_at, records FROM batches WHERE installation_id = ?", -1},
		{"SELECT received_at, records FROM pending_batches WHERE installation_id = ?", 1},
	} {
		err := queryOn(ctx, tx, s.d.rebind(q.query), []any{id}, func(rows *sql.Rows) error {
			var at, n int64
			if err := rows.Scan(&at, &n); err != nil {
				return err
			}
			deltas.add(hourOf(at), q.sign*n, 0)
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("read batches: %w", err)
		}
	}
	kept := map[int64]bool{}
	err = queryOn(ctx, tx, "SELECT hour FROM hourly", nil, func(rows *sql.Rows) error {
		var h int64
		if err := rows.Scan(&h); err != nil {
			return err
		}
		kept[h] = true
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read hourly summary: %w", err)
	}
	// Only hours still summarized change (a file that moves into an
	// older hour is counted there until Summarize deletes the row).
	for h, v := range deltas {
		if !kept[h] {
			v[0], v[1] = 0, max(v[1], 0)
		}
	}
	// Files whose earliest counted report was its own move to the next
	// one, or go.
	err = queryOn(ctx, tx, s.d.rebind(`SELECT x.old, x.new FROM (SELECT s.created_at AS own,
			(SELECT o.created_at FROM `+fmt.Sprintf(s.d.statsBySHA, "o")+` WHERE o.sha256 = s.sha256 AND `+notPending+`
				ORDER BY o.created_at LIMIT 1) AS old,
			(SELECT o.created_at FROM `+fmt.Sprintf(s.d.statsBySHA, "o")+` WHERE o.sha256 = s.sha256 AND o.installation_id <> ? AND `+notPending+`
				ORDER BY o.created_at LIMIT 1) AS new
			FROM stats s WHERE s.installation_id = ? AND NOT EXISTS (SELECT 1 FROM pending_batches q WHERE q.seq = s.batch)) AS x
		WHERE x.own = x.old`), []any{id, id}, deltas.moveFirstReports)
	if err != nil {
		return nil, fmt.Errorf("count new files: %w", err)
	}
	if err := deltas.apply(ctx, s, tx); err != nil {
		return nil, err
	}
	err = queryOn(ctx, tx, s.d.rebind("SELECT d.sha256 FROM detections d JOIN stats s ON s.sha256 = d.sha256 WHERE s.installation_id = ?"),
		[]any{id}, func(rows *sql.Rows) error {
			var h string
			if err := rows.Scan(&h); err != nil {
				return err
			}
			detected = append(detected, h)
			return nil
		})
	if err != nil {
		return nil, fmt.Errorf("read detections: %w", err)
	}
	return detected, nil
}
