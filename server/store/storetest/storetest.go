// Package storetest runs one test suite against every store backend:
// SQLite in a temporary directory, and PostgreSQL when
// CLOUDPROTECT_TEST_POSTGRES holds a postgres:// URL. Each PostgreSQL
// test gets a schema of its own, dropped when the test ends. Without the
// variable the PostgreSQL half skips, unless CI=true, where it fails.
package storetest

import (
	"context"
	"crypto/rand"
	"database/sql"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" driver

	"github.com/cloudprotect/cloudprotect/server/store"
)

// EnvPostgres names the variable holding the PostgreSQL test database.
const EnvPostgres = "CLOUDPROTECT_TEST_POSTGRES"

// Backend is one store implementation under test.
type Backend struct {
	Name string
	// NewDSN returns the DSN of a fresh, empty database, removed when tb
	// ends. Several stores may be opened on one DSN.
	NewDSN func(tb testing.TB) string
}

// Backends lists every backend. Call Available before using one.
func Backends() []Backend {
	return []Backend{
		{Name: "sqlite", NewDSN: func(tb testing.TB) string {
			return "sqlite:" + filepath.Join(tb.TempDir(), "cloud.db")
		}},
		{Name: "postgres", NewDSN: newPostgresSchema},
	}
}

// Available skips tb when the backend is not configured, or fails it when
// CI=true.
func (b Backend) Available(tb testing.TB) {
	tb.Helper()
	if b.Name != "postgres" || os.Getenv(EnvPostgres) != "" {
		return
	}
	if os.Getenv("CI") == "true" {
		tb.Fatalf("%s is unset but CI=true: start PostgreSQL and set %s=postgres://USER:PASS@127.0.0.1:5432/DB?sslmode=disable", EnvPostgres, EnvPostgres)
	}
	tb.Skipf("PostgreSQL half skipped: set %s=postgres://USER:PASS@127.0.0.1:5432/DB?sslmode=disable to run it", EnvPostgres)
}

// Run runs f once per backend as a subtest named after it.
func Run(t *testing.T, f func(t *testing.T, b Backend)) {
	t.Helper()
	for _, b := range Backends() {
		t.Run(b.Name, func(t *testing.T) {
			b.Available(t)
			f(t, b)
		})
	}
}

// Open opens a store on dsn, closed when tb ends.
func Open(tb testing.TB, dsn string) store.Store {
	tb.Helper()
	s, err := store.Open(context.Background(), dsn, nil)
	if err != nil {
		tb.Fatalf("open store: %v", err)
	}
	tb.Cleanup(func() {
		if err := s.Close(); err != nil {
			tb.Errorf("close store: %v", err)
		}
	})
	return s
}

// New opens a store on a fresh database of backend b.
func New(tb testing.TB, b Backend) store.Store {
	tb.Helper()
	return Open(tb, b.NewDSN(tb))
}

func newPostgresSchema(tb testing.TB) string {
	tb.Helper()
	base := os.Getenv(EnvPostgres)
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		tb.Fatalf("%s: want a postgres:// URL, got an unparsable value", EnvPostgres)
	}
	schema := "cptest_" + strings.ToLower(rand.Text())
	admin, err := sql.Open("pgx", base)
	if err != nil {
		tb.Fatalf("connect to postgres: %v", err)
	}
	defer admin.Close()
	if _, err := admin.Exec("CREATE SCHEMA " + schema); err != nil {
		tb.Fatalf("create schema: %v", err)
	}
	tb.Cleanup(func() {
		admin, err := sql.Open("pgx", base)
		if err != nil {
			tb.Errorf("connect to postgres: %v", err)
			return
		}
		defer admin.Close()
		if _, err := admin.Exec("DROP SCHEMA " + schema + " CASCADE"); err != nil {
			tb.Errorf("drop schema: %v", err)
		}
	})
	q := u.Query()
	q.Set("search_path", schema)
	u.RawQuery = q.Encode()
	return u.String()
}
