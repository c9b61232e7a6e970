package faults

import (
	"bufio"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	_ "modernc.org/sqlite" // reads the reference cloud's database

	"github.com/cloudprotect/cloudprotect/agent/localapi"
)

// cloud is a real cloudprotect-server on loopback with its own SQLite
// database.
type cloud struct {
	URL string
	db  string
	cmd *exec.Cmd
}

var listeningRE = regexp.MustCompile(`msg=listening addr=(\S+)`)

func startCloud(t *testing.T) *cloud {
	t.Helper()
	return startCloudOn(t, "127.0.0.1:0", nil)
}

// startSystemCloud starts the reference cloud where the system agent may
// reach it over plain HTTP: on loopback below port 1024, where only a
// privileged process (this test) can listen. malicious lists hashes the
// cloud knows as malicious, as an imported feed.
func startSystemCloud(t *testing.T, malicious []string) *cloud {
	t.Helper()
	for port := 1023; port > 600; port-- {
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		ln.Close()
		return startCloudOn(t, addr, malicious)
	}
	t.Fatal("no free port below 1024 on loopback")
	return nil
}

func startCloudOn(t *testing.T, addr string, malicious []string) *cloud {
	t.Helper()
	dir := worldDir(t, "cloudprotect-faults-cloud-")
	c := &cloud{db: filepath.Join(dir, "cloud.db")}
	if len(malicious) > 0 {
		list := filepath.Join(dir, "malicious.txt")
		if err := os.WriteFile(list, []byte(strings.Join(malicious, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		imp := exec.Command(filepath.Join(binaries(t), "cloudprotect-server"), "import",
			"--db", "sqlite:"+c.db, "--feed", "faults", "--malicious", list)
		if out, err := imp.CombinedOutput(); err != nil {
			t.Fatalf("import the malicious list: %v\n%s", err, out)
		}
	}
	// Every participation registers a new installation, all from
	// loopback: the loops here make more than the 20 one address may make
	// before the server holds it to one a minute. The limit itself is
	// the server's tests' (server/attack_test.go).
	c.cmd = exec.Command(filepath.Join(binaries(t), "cloudprotect-server"), "serve",
		"--listen", addr, "--db", "sqlite:"+c.db, "--log-requests=false", "--register-burst=-1")
	stderr, err := c.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.cmd.Process.Signal(syscall.SIGTERM)
		c.cmd.Wait()
	})
	listening := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			if m := listeningRE.FindStringSubmatch(sc.Text()); m != nil {
				select {
				case listening <- m[1]:
				default:
				}
			}
		}
	}()
	select {
	case a := <-listening:
		c.URL = "http://" + a
	case <-time.After(30 * time.Second):
		t.Fatal("the reference cloud did not start listening")
	}
	return c
}

// counts returns the executions the cloud holds per SHA-256, over all
// installations.
func (c *cloud) counts(t *testing.T) map[string]int64 {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+c.db+"?mode=ro&_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	rows, err := db.Query(`SELECT sha256, SUM(exec_count) FROM stats GROUP BY sha256`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	m := map[string]int64{}
	for rows.Next() {
		var sha string
		var n int64
		if err := rows.Scan(&sha, &n); err != nil {
			t.Fatal(err)
		}
		m[sha] = n
	}
	return m
}

// installations returns how many installations the cloud knows.
func (c *cloud) installations(t *testing.T) int {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+c.db+"?mode=ro&_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var n int
	if err := db.QueryRow(`SELECT COUNT(*) FROM installations`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// drain asks the agent to send until nothing is pending.
func (a *agentProc) drain() {
	a.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, err := a.Client.Upload(ctx)
		cancel()
		var ae *localapi.APIError
		if err != nil && !errors.As(err, &ae) {
			a.t.Fatalf("upload: %v", err)
		}
		q, _ := a.queued()
		if err == nil && len(q.Records) == 0 {
			return
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("still %d records pending after 60s of uploads (last: %v)", q.Totals.Programs, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// loaded reports whether the cloud holds sha as a loaded file.
func (c *cloud) loaded(t *testing.T, sha string) bool {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+c.db+"?mode=ro&_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var n int
	if err := db.QueryRow(`SELECT COUNT(*) FROM stats WHERE sha256 = ? AND loaded != 0`, sha).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n > 0
}
