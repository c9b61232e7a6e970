package faults

import (
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Hostile files in the watched download folder and executed: huge and
// sparse files, FIFOs and device nodes behind symlinks, truncated and
// malformed ELF, files rewritten and replaced while they are hashed. The
// agent neither hangs nor crashes, its peak memory stays bounded, and
// afterwards it still counts programs and identifies large files.
func TestHostileFiles(t *testing.T) {
	faultCase(t)
	a := newAgent(t, agentOpts{Cloud: startCloud(t)})
	work := worldDir(t, "cloudprotect-faults-files-")
	a.start()
	a.participate()
	a.waitWatching(work)
	pid := a.pid()
	dl := filepath.Join(a.Home, "Downloads")

	// Huge and sparse: over the size limit, and large enough to be hashed
	// in the background (zeros cost no disk).
	sparse := func(name string, size int64) string {
		p := filepath.Join(dl, name)
		f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY, 0o755)
		if err != nil {
			t.Fatal(err)
		}
		f.Write([]byte("\x7fELF"))
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		f.Close()
		return p
	}
	sparse("huge-sparse", 3<<30)
	bigPath := sparse("big-sparse", 100<<20)
	bigSum := sha256File(t, bigPath)

	// Things that are not regular files, directly and behind symlinks.
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(unix.Mkfifo(filepath.Join(work, "fifo"), 0o755))
	must(unix.Mkfifo(filepath.Join(dl, "fifo"), 0o755))
	must(os.Symlink(filepath.Join(work, "fifo"), filepath.Join(dl, "fifo-link")))
	must(unix.Mknod(filepath.Join(work, "zero"), unix.S_IFCHR|0o755, int(unix.Mkdev(1, 5))))
	must(unix.Mknod(filepath.Join(dl, "zero-node"), unix.S_IFCHR|0o755, int(unix.Mkdev(1, 5))))
	must(os.Symlink(filepath.Join(work, "zero"), filepath.Join(dl, "zero-link")))
	must(os.Symlink("/dev/urandom", filepath.Join(dl, "urandom-link")))
	must(os.Symlink("self-loop", filepath.Join(dl, "self-loop")))
	for _, p := range []string{filepath.Join(dl, "fifo-link"), filepath.Join(dl, "zero-link"), filepath.Join(dl, "zero-node")} {
		exec.Command(p).Run() // refused by the kernel; the attempt is the point
	}

	// Truncated and malformed ELF, in the download folder and executed.
	elves, _ := filepath.Glob("../identify/testdata/*.elf")
	if len(elves) == 0 {
		t.Fatal("no ELF fixtures in agent/identify/testdata")
	}
	for _, src := range elves {
		b, err := os.ReadFile(src)
		must(err)
		name := filepath.Base(src)
		must(os.WriteFile(filepath.Join(dl, name), b, 0o755))
		p := filepath.Join(work, name)
		must(os.WriteFile(p, b, 0o755))
		exec.Command(p).Run()
	}

	// Rewritten in place and replaced while hashed: a large file (hashed
	// in the background) and a program executed while it is swapped.
	changing := filepath.Join(dl, "changing")
	chunk := make([]byte, 80<<20)
	rand.Read(chunk)
	must(os.WriteFile(changing, chunk, 0o755))
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Go(func() {
		f, err := os.OpenFile(changing, os.O_WRONLY, 0)
		if err != nil {
			return
		}
		defer f.Close()
		buf := make([]byte, 4096)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			rand.Read(buf)
			f.WriteAt(buf, int64(i*7919*4096)%(80<<20))
		}
	})
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			p, _ := uniqueProgram(t, work, "next")
			swapped := filepath.Join(work, "swapped")
			os.Rename(p, swapped)
			exec.Command(swapped).Run()
			// And a download replaced under the watcher's nose.
			tmp := filepath.Join(dl, ".partial")
			os.WriteFile(tmp, chunk[:1<<20], 0o755)
			os.Rename(tmp, filepath.Join(dl, "replaced"))
		}
	})
	time.Sleep(time.Duration(scale(3, 20)) * time.Second)
	close(stop)
	wg.Wait()

	// Still alive, still the same process, still answering.
	if a.pid() != pid || !a.running() {
		t.Fatalf("the agent died")
	}
	a.status()
	// Still counting: a fresh program executed three times...
	prog, sum := uniqueProgram(t, work, "canary")
	runN(t, prog, 3)
	a.waitSeen(sum, 3, "the canary's three executions")
	// ...and still identifying large files in the background.
	a.waitLoaded(bigSum, "the 100 MiB sparse download")
	// A download that arrives now is seen too.
	_, dlSum := uniqueProgram(t, dl, "late-download")
	a.waitLoaded(dlSum, "a download after the hostile files")

	// The huge file, the FIFOs and the devices left no record.
	_, recs := a.queued()
	for _, r := range recs {
		switch filepath.Base(r.Path) {
		case "huge-sparse", "fifo", "fifo-link", "zero-link", "zero-node", "urandom-link", "self-loop":
			t.Errorf("record for %s: %+v", r.Path, r)
		}
	}
	ps := readProc(t, pid)
	if ps.HWMKiB > 256<<10 {
		t.Errorf("peak memory %d KiB, want under 256 MiB", ps.HWMKiB)
	}
	t.Logf("hostile files: %d ELF fixtures, sparse 3 GiB and 100 MiB, FIFOs, devices, symlinks, rewrites; agent %v", len(elves), ps)
}
