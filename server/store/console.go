package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

func (s *sqlStore) File(ctx context.Context, sha256 string, trust Trust) (FileDetail, error) {
	d := FileDetail{FileInfo: FileInfo{SHA256: sha256}}
	one := func(_ string, f func(*FileInfo)) { f(&d.FileInfo) }
	var (
		first, last, stored int64
		malf                int
	)
	err := s.read.QueryRowContext(ctx, s.d.rebind(`SELECT COUNT(*), COALESCE(MIN(first_seen), 0), COALESCE(MAX(last_seen), 0),
		COALESCE(MIN(created_at), 0), COALESCE(SUM(exec_count), 0), COALESCE(MAX(malformed), 0),
		COALESCE(MAX(size), 0), COALESCE(MAX(kind), '') FROM stats WHERE sha256 = ?`), sha256).
		Scan(&d.Prevalence, &first, &last, &stored, &d.ExecCount, &malf, &d.Size, &d.Kind)
	if err != nil {
		return FileDetail{}, fmt.Errorf("read file: %w", err)
	}
	if d.Prevalence > 0 {
		d.FirstSeen, d.LastSeen, d.StoredAt, d.Malformed = unix(first), unix(last), unix(stored), malf != 0
	}
	if err := s.curated(ctx, []string{sha256}, one); err != nil {
		return FileDetail{}, fmt.Errorf("read file: %w", err)
	}
	if d.Prevalence > 0 { // for the console, also when nobody found it malformed
		if err := s.established(ctx, []string{sha256}, trust, one); err != nil {
			return FileDetail{}, fmt.Errorf("read file: %w", err)
		}
	}
	err = s.query(ctx, `SELECT path, COUNT(*) FROM stats WHERE sha256 = ? GROUP BY path ORDER BY COUNT(*) DESC, path LIMIT 50`,
		[]any{sha256}, func(rows *sql.Rows) error {
			var p PathCount
			if err := rows.Scan(&p.Path, &p.Installations); err != nil {
				return err
			}
			d.Paths = append(d.Paths, p)
			return nil
		})
	if err != nil {
		return FileDetail{}, fmt.Errorf("read file: paths: %w", err)
	}
	d.History, err = s.changes(ctx, "WHERE sha256 = ?", []any{sha256}, 100)
	if err != nil {
		return FileDetail{}, fmt.Errorf("read file: %w", err)
	}
	return d, nil
}

// changes reads the verdict history, newest first.
func (s *sqlStore) changes(ctx context.Context, where string, args []any, limit int) ([]Change, error) {
	var out []Change
	err := s.query(ctx, "SELECT sha256, verdict, source, actor, reason, at FROM verdict_history "+where+
		fmt.Sprintf(" ORDER BY id DESC LIMIT %d", limit), args, func(rows *sql.Rows) error {
		var (
			c  Change
			at int64
		)
		if err := rows.Scan(&c.SHA256, &c.Verdict, &c.Source, &c.Actor, &c.Reason, &at); err != nil {
			return err
		}
		c.At = unix(at)
		out = append(out, c)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read history: %w", err)
	}
	return out, nil
}

// detectionWindow is how far back the overview looks for detections.
const detectionWindow = 7 * 24 * time.Hour

func (s *sqlStore) Overview(ctx context.Context, now time.Time) (Overview, error) {
	var o Overview
	if err := s.Summarize(ctx, now); err != nil {
		return o, fmt.Errorf("read overview: %w", err)
	}
	if err := s.read.QueryRowContext(ctx, "SELECT COUNT(*) FROM installations").Scan(&o.Installations); err != nil {
		return o, fmt.Errorf("read overview: installations: %w", err)
	}
	dayAgo := now.Add(-24 * time.Hour).Unix()
	if err := s.read.QueryRowContext(ctx, s.d.rebind("SELECT COUNT(*) FROM installations WHERE last_active >= ?"), dayAgo).
		Scan(&o.ActiveInstallations); err != nil {
		return o, fmt.Errorf("read overview: active installations: %w", err)
	}
	from := hourOf(now.Unix()) - 23*3600
	today := dayStart(now)
	o.RecordsPerHour = make([]int64, 24)
	err := s.query(ctx, "SELECT hour, records, new_files FROM hourly WHERE hour >= ? AND hour < ?",
		[]any{min(from, today), max(from+24*3600, today+86400)}, func(rows *sql.Rows) error {
			var h, n, files int64
			if err := rows.Scan(&h, &n, &files); err != nil {
				return err
			}
			if i := (h - from) / 3600; h >= from && i < 24 {
				o.RecordsPerHour[i] += n
			}
			if h >= today && h < today+86400 {
				o.NewFilesToday += int(files)
			}
			return nil
		})
	if err != nil {
		return o, fmt.Errorf("read overview: hourly summary: %w", err)
	}
	// Detections: files with a malicious verdict that an installation
	// new to them reported recently. An analyst's decision overrides the
	// feeds either way.
	since := now.Add(-detectionWindow).Unix()
	err = s.finishOverview(ctx, &o, `SELECT d.sha256, COUNT(*), MAX(st.last_seen),
			CASE WHEN EXISTS (SELECT 1 FROM decisions x WHERE x.sha256 = d.sha256) THEN 'analyst' ELSE 'feed' END
		FROM detections d JOIN stats st ON st.sha256 = d.sha256
		WHERE d.last_report >= ? GROUP BY d.sha256`, since)
	return o, err
}

// finishOverview fills the overview's detections from a query of them
// (SHA-256, installations, last seen, verdict source), the most
// widespread first, and its recent verdict changes.
func (s *sqlStore) finishOverview(ctx context.Context, o *Overview, detections string, args ...any) error {
	err := s.query(ctx, detections, args, func(rows *sql.Rows) error {
		var (
			dt   Detection
			last int64
		)
		if err := rows.Scan(&dt.SHA256, &dt.Installations, &last, &dt.Source); err != nil {
			return err
		}
		dt.LastSeen = unix(last)
		o.Detections = append(o.Detections, dt)
		return nil
	})
	if err != nil {
		return fmt.Errorf("read overview: detections: %w", err)
	}
	slices.SortFunc(o.Detections, func(a, b Detection) int {
		if a.Installations != b.Installations {
			return b.Installations - a.Installations
		}
		if c := b.LastSeen.Compare(a.LastSeen); c != 0 {
			return c
		}
		return strings.Compare(a.SHA256, b.SHA256)
	})
	o.DetectionsTotal = len(o.Detections)
	o.Detections = o.Detections[:min(len(o.Detections), 20)]
	o.RecentChanges, err = s.changes(ctx, "", nil, 10)
	if err != nil {
		return fmt.Errorf("read overview: %w", err)
	}
	return nil
}

// rareScan is how many recent reports RareFiles reads at a time.
const rareScan = 2000

func (s *sqlStore) RareFiles(ctx context.Context, since time.Time, maxInstallations, limit int) ([]RareFile, error) {
	var out []RareFile
	seen := map[string]bool{}
	// Walk the reports newest first, a window at a time, and keep the
	// files that are rare and first stored in the period.
	before := int64(1) << 62
	for len(out) < limit {
		var cand []string
		var oldest int64
		n := 0
		err := s.query(ctx, fmt.Sprintf(`SELECT t.sha256, t.created_at FROM `+fmt.Sprintf(s.d.statsByTime, "t")+` WHERE t.created_at >= ? AND t.created_at < ?
			ORDER BY created_at DESC LIMIT %d`, rareScan), []any{since.Unix(), before}, func(rows *sql.Rows) error {
			var h string
			if err := rows.Scan(&h, &oldest); err != nil {
				return err
			}
			n++
			if !seen[h] {
				seen[h] = true
				cand = append(cand, h)
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("read rare files: %w", err)
		}
		if n == 0 {
			break
		}
		// The next window starts at the oldest second read (its other
		// reports may not all have been read); when the whole window fell
		// in one second, the rest of that second is skipped.
		next := oldest + 1
		if next >= before {
			next = oldest
		}
		before = next
		if len(cand) > 0 {
			found, err := s.rare(ctx, cand, since, maxInstallations)
			if err != nil {
				return nil, err
			}
			out = append(out, found...)
		}
		if n < rareScan {
			break
		}
	}
	slices.SortStableFunc(out, func(a, b RareFile) int { return b.StoredAt.Compare(a.StoredAt) })
	return out[:min(len(out), limit)], nil
}

// rare returns those of hashes reported by at most maxInstallations and
// first stored since since. Each candidate costs two bounded index
// probes; only the few that qualify are read in detail.
func (s *sqlStore) rare(ctx context.Context, hashes []string, since time.Time, maxInstallations int) ([]RareFile, error) {
	var keep []string
	err := s.query(ctx, `SELECT c.sha256 FROM `+fmt.Sprintf(s.d.hashTable, "c")+`
		WHERE NOT EXISTS (SELECT 1 FROM stats o WHERE o.sha256 = c.sha256 AND o.created_at < ?)
		  AND (SELECT COUNT(*) FROM (SELECT 1 FROM stats o WHERE o.sha256 = c.sha256 LIMIT ?) AS n) <= ?`,
		[]any{s.d.hashesArg(hashes), since.Unix(), maxInstallations + 1, maxInstallations}, func(rows *sql.Rows) error {
			var h string
			if err := rows.Scan(&h); err != nil {
				return err
			}
			keep = append(keep, h)
			return nil
		})
	if err != nil {
		return nil, fmt.Errorf("read rare files: %w", err)
	}
	if len(keep) == 0 {
		return nil, nil
	}
	cond, arg := s.in("s.sha256", keep)
	var out []RareFile
	err = s.query(ctx, `SELECT s.sha256, COUNT(*), MIN(s.created_at), MAX(s.kind), MIN(s.path),
		(SELECT COUNT(*) FROM decisions d WHERE d.sha256 = s.sha256)
		FROM stats s WHERE `+cond+` GROUP BY s.sha256`,
		[]any{arg}, func(rows *sql.Rows) error {
			var (
				r       RareFile
				stored  int64
				decided int
			)
			if err := rows.Scan(&r.SHA256, &r.Installations, &stored, &r.Kind, &r.Path, &decided); err != nil {
				return err
			}
			r.StoredAt, r.Decided = unix(stored), decided > 0
			out = append(out, r)
			return nil
		})
	if err != nil {
		return nil, fmt.Errorf("read rare files: %w", err)
	}
	return out, nil
}

func (s *sqlStore) AddAnalyst(ctx context.Context, name, passwordHash string, replace bool, now time.Time) error {
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("add analyst: %w", err)
	}
	defer tx.Rollback()
	res, err := tx.ExecContext(ctx, s.d.rebind(`INSERT INTO analysts (name, password_hash, created_at) VALUES (?, ?, ?)
		ON CONFLICT (name) DO NOTHING`), name, passwordHash, now.Unix())
	if err != nil {
		return fmt.Errorf("add analyst: %w", err)
	}
	if n, err := res.RowsAffected(); err != nil {
		return fmt.Errorf("add analyst: %w", err)
	} else if n == 0 {
		if !replace {
			return fmt.Errorf("add analyst %s: %w", name, ErrExists)
		}
		if _, err := tx.ExecContext(ctx, s.d.rebind("UPDATE analysts SET password_hash = ? WHERE name = ?"), passwordHash, name); err != nil {
			return fmt.Errorf("set password: %w", err)
		}
		if _, err := tx.ExecContext(ctx, s.d.rebind("DELETE FROM console_sessions WHERE analyst = ?"), name); err != nil {
			return fmt.Errorf("set password: end sessions: %w", err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("add analyst: commit: %w", err)
	}
	return nil
}

func (s *sqlStore) AnalystPassword(ctx context.Context, name string) (string, error) {
	var h string
	err := s.read.QueryRowContext(ctx, s.d.rebind("SELECT password_hash FROM analysts WHERE name = ?"), name).Scan(&h)
	if errors.Is(err, sql.ErrNoRows) {
		return "", ErrNotFound
	}
	if err != nil {
		return "", fmt.Errorf("read analyst: %w", err)
	}
	return h, nil
}

func (s *sqlStore) RemoveAnalyst(ctx context.Context, name string) error {
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("remove analyst: %w", err)
	}
	defer tx.Rollback()
	res, err := tx.ExecContext(ctx, s.d.rebind("DELETE FROM analysts WHERE name = ?"), name)
	if err != nil {
		return fmt.Errorf("remove analyst: %w", err)
	}
	if n, err := res.RowsAffected(); err != nil {
		return fmt.Errorf("remove analyst: %w", err)
	} else if n == 0 {
		return fmt.Errorf("remove analyst %s: %w", name, ErrNotFound)
	}
	if _, err := tx.ExecContext(ctx, s.d.rebind("DELETE FROM console_sessions WHERE analyst = ?"), name); err != nil {
		return fmt.Errorf("remove analyst: end sessions: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("remove analyst: commit: %w", err)
	}
	return nil
}

func (s *sqlStore) Analysts(ctx context.Context) ([]Analyst, error) {
	var out []Analyst
	err := s.query(ctx, "SELECT name, created_at FROM analysts ORDER BY name", nil, func(rows *sql.Rows) error {
		var (
			a Analyst
			t int64
		)
		if err := rows.Scan(&a.Name, &t); err != nil {
			return err
		}
		a.CreatedAt = unix(t)
		out = append(out, a)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list analysts: %w", err)
	}
	return out, nil
}

func (s *sqlStore) CreateSession(ctx context.Context, tokenHash []byte, sess Session, now time.Time) error {
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("create session: %w", err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, s.d.rebind("DELETE FROM console_sessions WHERE expires_at <= ?"), now.Unix()); err != nil {
		return fmt.Errorf("create session: expire old: %w", err)
	}
	// The analyst must still exist: a session for a removed account is
	// refused rather than orphaned.
	res, err := tx.ExecContext(ctx, s.d.rebind(`INSERT INTO console_sessions (token_hash, analyst, csrf, created_at, expires_at)
		SELECT ?, name, ?, ?, ? FROM analysts WHERE name = ?`), tokenHash, sess.CSRF, now.Unix(), sess.ExpiresAt.Unix(), sess.Analyst)
	if err != nil {
		return fmt.Errorf("create session: %w", err)
	}
	if n, err := res.RowsAffected(); err != nil {
		return fmt.Errorf("create session: %w", err)
	} else if n == 0 {
		return fmt.Errorf("create session: analyst %s: %w", sess.Analyst, ErrNotFound)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("create session: commit: %w", err)
	}
	return nil
}

func (s *sqlStore) Session(ctx context.Context, tokenHash []byte, now time.Time) (Session, error) {
	var (
		sess Session
		exp  int64
	)
	err := s.read.QueryRowContext(ctx, s.d.rebind(`SELECT analyst, csrf, expires_at FROM console_sessions
		WHERE token_hash = ? AND expires_at > ?`), tokenHash, now.Unix()).Scan(&sess.Analyst, &sess.CSRF, &exp)
	if errors.Is(err, sql.ErrNoRows) {
		return Session{}, ErrNotFound
	}
	if err != nil {
		return Session{}, fmt.Errorf("read session: %w", err)
	}
	sess.ExpiresAt = unix(exp)
	return sess, nil
}

func (s *sqlStore) DeleteSession(ctx context.Context, tokenHash []byte) error {
	if _, err := s.write.ExecContext(ctx, s.d.rebind("DELETE FROM console_sessions WHERE token_hash = ?"), tokenHash); err != nil {
		return fmt.Errorf("end session: %w", err)
	}
	return nil
}
