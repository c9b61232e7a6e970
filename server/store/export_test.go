package store

import (
	"context"
	"database/sql"
	"fmt"
	"time"
)

// OverviewFromRows computes the overview from the stored rows themselves,
// without the summaries (as the overview did before them), for tests to
// hold the summaries to.
func OverviewFromRows(ctx context.Context, st Store, now time.Time) (Overview, error) {
	return st.(*sqlStore).overviewFromRows(ctx, now)
}

// PendingBatches counts the batches not yet summarized.
func PendingBatches(ctx context.Context, st Store) (int, error) {
	var n int
	err := st.(*sqlStore).read.QueryRowContext(ctx, "SELECT COUNT(*) FROM pending_batches").Scan(&n)
	return n, err
}

func (s *sqlStore) overviewFromRows(ctx context.Context, now time.Time) (Overview, error) {
	var o Overview
	dayAgo := now.Add(-24 * time.Hour).Unix()
	if err := s.read.QueryRowContext(ctx, s.d.rebind(`SELECT COUNT(*), COALESCE(SUM(CASE WHEN last_active >= ? THEN 1 ELSE 0 END), 0)
		FROM installations`), dayAgo).Scan(&o.Installations, &o.ActiveInstallations); err != nil {
		return o, fmt.Errorf("read overview: installations: %w", err)
	}
	hour := now.Unix() - now.Unix()%3600
	from := hour - 23*3600
	o.RecordsPerHour = make([]int64, 24)
	err := s.query(ctx, `SELECT received_at - received_at % 3600, SUM(records) FROM batches WHERE received_at >= ?
		GROUP BY received_at - received_at % 3600`, []any{from}, func(rows *sql.Rows) error {
		var h, n int64
		if err := rows.Scan(&h, &n); err != nil {
			return err
		}
		if i := (h - from) / 3600; i >= 0 && i < 24 {
			o.RecordsPerHour[i] += n
		}
		return nil
	})
	if err != nil {
		return o, fmt.Errorf("read overview: records per hour: %w", err)
	}
	today := dayStart(now)
	if err := s.read.QueryRowContext(ctx, s.d.rebind(`SELECT COUNT(DISTINCT s.sha256) FROM `+fmt.Sprintf(s.d.statsByTime, "s")+` WHERE s.created_at >= ?
		AND NOT EXISTS (SELECT 1 FROM stats o WHERE o.sha256 = s.sha256 AND o.created_at < ?)`), today, today).Scan(&o.NewFilesToday); err != nil {
		return o, fmt.Errorf("read overview: new files: %w", err)
	}
	// Detections: files with a malicious verdict whose first report by
	// some installation is recent. An analyst's decision overrides the
	// feeds either way.
	since := now.Add(-detectionWindow).Unix()
	// The recent files are filtered to the malicious ones before their
	// reports are counted: most recent files are common programs.
	err = s.finishOverview(ctx, &o, `WITH recent AS (SELECT DISTINCT t.sha256 FROM `+fmt.Sprintf(s.d.statsByTime, "t")+` WHERE t.created_at >= ?),
		mal AS (SELECT r.sha256, CASE WHEN d.verdict IS NULL THEN 'feed' ELSE 'analyst' END AS src
			FROM recent r LEFT JOIN decisions d ON d.sha256 = r.sha256
			WHERE d.verdict = 'malicious'
			   OR (d.verdict IS NULL AND EXISTS (SELECT 1 FROM listed l WHERE l.sha256 = r.sha256 AND l.list = 'malicious')))
		SELECT m.sha256, COUNT(*), MAX(st.last_seen), m.src FROM mal m JOIN stats st ON st.sha256 = m.sha256
		GROUP BY m.sha256, m.src`, since)
	return o, err
}

// Downgrade takes the database back to the schema before the summaries
// (version 2), keeping the data, so that opening it again migrates it.
func Downgrade(ctx context.Context, st Store) error {
	s := st.(*sqlStore)
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	for _, q := range []string{
		"DROP TABLE pending_batches", "DROP TABLE hourly", "DROP TABLE detections",
		"DROP INDEX installations_last_active", "ALTER TABLE stats DROP COLUMN batch",
		"CREATE INDEX batches_received ON batches (received_at)",
		"DELETE FROM schema_migrations WHERE version = 3",
	} {
		if _, err := tx.ExecContext(ctx, q); err != nil {
			return fmt.Errorf("%s: %w", q, err)
		}
	}
	return tx.Commit()
}
