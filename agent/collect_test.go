package agent

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/agent/testenv"
	"github.com/cloudprotect/cloudprotect/wire"
)

// uniqueProgram writes a copy of /bin/true with random bytes appended (the
// loader ignores them), so its SHA-256 is new, and returns its path and hash.
func uniqueProgram(t *testing.T, dir, name string) (string, string) {
	t.Helper()
	b, err := os.ReadFile("/bin/true")
	if err != nil {
		t.Fatal(err)
	}
	b = append(b, []byte(rand.Text())...)
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b, 0o755); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return p, hex.EncodeToString(sum[:])
}

func waitRecord(t *testing.T, c *localapi.Client, what string, ok func(wire.Record) bool) wire.Record {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		q, err := c.Queue(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range q.Records {
			if ok(r.Record) {
				return r.Record
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("no queued record %s within 10s", what)
	return wire.Record{}
}

// kernelWatchFDs counts this process's fanotify descriptors and netlink
// sockets.
func kernelWatchFDs(t *testing.T) (fanotify, netlink int) {
	t.Helper()
	inodes := map[string]bool{}
	if f, err := os.Open("/proc/self/net/netlink"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) > 0 && fields[0] != "sk" {
				inodes[fields[len(fields)-1]] = true
			}
		}
		f.Close()
	}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		l, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		if err != nil {
			continue
		}
		switch {
		case l == "anon_inode:[fanotify]":
			fanotify++
		case strings.HasPrefix(l, "socket:["):
			if inodes[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] {
				netlink++
			}
		}
	}
	return fanotify, netlink
}

// mustQueue reads the queue; an error fails the test, so that a check
// that nothing is queued cannot pass on a failed read.
func mustQueue(t *testing.T, c *localapi.Client) api.QueuePreview {
	t.Helper()
	q, err := c.Queue(context.Background())
	if err != nil {
		t.Fatalf("read the queue: %v", err)
	}
	return q
}

// mustStatus reads the status; an error fails the test.
func mustStatus(t *testing.T, c *localapi.Client) api.Status {
	t.Helper()
	st, err := c.Status(context.Background())
	if err != nil {
		t.Fatalf("read the status: %v", err)
	}
	return st
}

func runN(t *testing.T, path string, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		if out, err := exec.Command(path).CombinedOutput(); err != nil {
			t.Fatalf("run %s: %v %s", path, err, out)
		}
	}
}

// The whole path of issue 3 as a person would see it, as root with the
// real fanotify source.
func TestCollectsExecutedAndLoadedPrograms(t *testing.T) {
	testenv.NeedRoot(t)
	a := startAgentWith(t, ModeUser, "", func(c *Config) { c.LoadDirs = []string{filepath.Join(c.StateDir, "..", "Downloads")} })
	downloads := filepath.Join(a.dir, "Downloads")
	os.MkdirAll(downloads, 0o755)
	work := t.TempDir()
	ctx := context.Background()

	// Not participating: the same workload leaves nothing, and no kernel
	// watch is open.
	prog, _ := uniqueProgram(t, work, "before")
	runN(t, prog, 3)
	if q := mustQueue(t, a.client); len(q.Records) != 0 {
		t.Fatalf("queued while undecided: %+v", q)
	}
	if fa, nl := kernelWatchFDs(t); fa != 0 || nl != 0 {
		t.Fatalf("undecided: %d fanotify and %d netlink descriptors open", fa, nl)
	}

	if _, err := a.client.SetParticipation(ctx, api.ParticipationRequest{Participate: true, StatementVersion: consent.StatementVersion, Via: "cli"}); err != nil {
		t.Fatal(err)
	}
	st := mustStatus(t, a.client)
	if st.Agent.ExecSource != "fanotify" {
		t.Fatalf("exec source = %q, want fanotify as root", st.Agent.ExecSource)
	}

	const n = 7
	prog, sum := uniqueProgram(t, work, "fresh")
	runN(t, prog, n)
	rec := waitRecord(t, a.client, "for the fresh binary", func(r wire.Record) bool { return r.SHA256 == sum && r.ExecCount >= n })
	if rec.ExecCount != n || rec.Kind != "elf" || rec.ELF == nil || rec.Loaded {
		t.Errorf("record = %+v (elf %+v), want exec_count %d, kind elf, not loaded", rec, rec.ELF, n)
	}

	script := filepath.Join(work, "hello.sh")
	body := "#!/bin/sh\n# " + rand.Text() + "\nexit 0\n"
	os.WriteFile(script, []byte(body), 0o755)
	ssum := sha256.Sum256([]byte(body))
	runN(t, script, 1)
	srec := waitRecord(t, a.client, "for the script", func(r wire.Record) bool { return r.SHA256 == hex.EncodeToString(ssum[:]) })
	if srec.Kind != "script" || srec.Interpreter != "/bin/sh" || srec.ExecCount != 1 {
		t.Errorf("script record = %+v", srec)
	}

	dl, dsum := uniqueProgram(t, downloads, "tool")
	os.Chmod(dl, 0o644)
	os.Chmod(dl, 0o755)
	drec := waitRecord(t, a.client, "for the downloaded program", func(r wire.Record) bool { return r.SHA256 == dsum })
	if !drec.Loaded || drec.ExecCount != 0 {
		t.Errorf("downloaded record = %+v, want loaded and never run", drec)
	}

	// Leaving stops the sources within a second and purges the queue.
	if _, err := a.client.SetParticipation(ctx, api.ParticipationRequest{Participate: false, Via: "cli"}); err != nil {
		t.Fatal(err)
	}
	st = mustStatus(t, a.client)
	if st.Queue.Pending != 0 || st.Queue.Records != 0 || st.Agent.ExecSource != "" {
		t.Errorf("after leaving: queue %+v, source %q", st.Queue, st.Agent.ExecSource)
	}
	if fa, nl := kernelWatchFDs(t); fa != 0 || nl != 0 {
		t.Errorf("after leaving: %d fanotify and %d netlink descriptors open", fa, nl)
	}
	runN(t, prog, 3)

	// Leaving right after an exec, while its record is only buffered for
	// the next commit: it is deleted too, not committed a moment later.
	if _, err := a.client.SetParticipation(ctx, api.ParticipationRequest{Participate: true, StatementVersion: consent.StatementVersion, Via: "cli"}); err != nil {
		t.Fatal(err)
	}
	seen := func() uint64 { return mustStatus(t, a.client).Agent.EventsSeen }
	before := seen()
	quick, _ := uniqueProgram(t, work, "quick")
	runN(t, quick, 1)
	for deadline := time.Now().Add(5 * time.Second); seen() == before && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond) // handled: identified and buffered
	if _, err := a.client.SetParticipation(ctx, api.ParticipationRequest{Participate: false, Via: "cli"}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond) // past the queue's one-second commit
	if q := mustQueue(t, a.client); len(q.Records) != 0 {
		t.Errorf("a record buffered at the moment of leaving was kept: %d records", len(q.Records))
	}

	dl2, _ := uniqueProgram(t, downloads, "tool2")
	os.Chmod(dl2, 0o755)
	time.Sleep(time.Second) // longer than the loaded watcher's quiet time
	if q := mustQueue(t, a.client); len(q.Records) != 0 {
		t.Errorf("queued after leaving: %d records", len(q.Records))
	}
}
