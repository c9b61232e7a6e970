package identify

import (
	"github.com/cloudprotect/cloudprotect/wire"

	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Defaults of Options.
const (
	DefaultCacheEntries = 16384
	DefaultMaxInline    = 64 << 20
	DefaultMaxSize      = 2 << 30
	DefaultBacklog      = 64
)

// Errors of Identify. Test them with errors.Is.
var (
	// ErrDeferred means the file is larger than Options.MaxInline: it is
	// hashed in the background and its Result delivered to
	// Options.OnDeferred.
	ErrDeferred = errors.New("identify: file hashed in the background")
	// ErrBacklogFull means a large file was not identified because the
	// background backlog was full; Stats().Dropped counts it.
	ErrBacklogFull = errors.New("identify: background backlog full")
	// ErrNotRegular means the file is not a regular file (FIFO, device,
	// socket, directory); it is never read.
	ErrNotRegular = errors.New("identify: not a regular file")
	// ErrTooLarge means the file is larger than Options.MaxSize.
	ErrTooLarge = errors.New("identify: file too large")
	// ErrChanged means the file changed twice while it was being hashed.
	ErrChanged = errors.New("identify: file changed while hashed")
	// ErrStopped means a large file arrived after Serve returned.
	ErrStopped = errors.New("identify: background hashing stopped")
)

// Options configure an Identifier. The zero value gives the defaults.
type Options struct {
	// CacheEntries caps the cache of file versions (default 16,384; about
	// 300 bytes each plus the paths).
	CacheEntries int
	// MaxInline is the largest file Identify hashes on the caller's
	// goroutine (default 64 MiB); larger ones are deferred.
	MaxInline int64
	// MaxSize is the largest file identified at all (default 2 GiB).
	MaxSize int64
	// Backlog caps the large files waiting for the background worker
	// (default 64); beyond it they are dropped and counted.
	Backlog int
	// Anonymizer anonymises paths; nil means NewAnonymizer(nil). The agent
	// passes SystemAnonymizer().
	Anonymizer *Anonymizer
	// OnDeferred receives the result of every deferred file, on the
	// background worker's goroutine; it must not block for long. Nil means
	// the results only fill the cache.
	OnDeferred func(Result)
	// Logger receives debug and warning messages; nil discards them.
	Logger *slog.Logger
}

// Result is the outcome of a deferred identification.
type Result struct {
	Facts Facts // Path is the path of the first deferred call
	Err   error
	// Calls is how many Identify calls on this file version returned
	// ErrDeferred and are answered by this Result.
	Calls int
}

// Stats counts what an Identifier did.
type Stats struct {
	Hits       uint64 `json:"hits"`       // answered from the cache
	Misses     uint64 `json:"misses"`     // hashed on the caller's goroutine
	Deferred   uint64 `json:"deferred"`   // handed to the background worker
	Background uint64 `json:"background"` // hashed by the background worker
	Dropped    uint64 `json:"dropped"`    // large files lost to a full backlog
	Refused    uint64 `json:"refused"`    // not regular, too large, changed, unreadable
	Cached     int    `json:"cached"`     // entries in the cache
}

// Identifier identifies files, remembers the facts of file versions it has
// seen, and hashes large files on one background worker (see Serve). It is
// safe for concurrent use.
type Identifier struct {
	opts  Options
	anon  *Anonymizer
	log   *slog.Logger
	cache *cache
	jobs  chan *job

	mu       sync.Mutex // protects inflight and stopped
	inflight map[fileKey]*job
	stopped  bool

	hits, misses, deferred, background, dropped, refused atomic.Uint64

	afterRead func() // test hook: runs after each read of a file
}

// job is one large file waiting for the background worker.
type job struct {
	fd    int // a duplicate owned by the job
	key   fileKey
	path  string
	calls int // protected by Identifier.mu
}

// New returns an Identifier. Large files wait for Serve to be running.
func New(opts Options) *Identifier {
	if opts.CacheEntries <= 0 {
		opts.CacheEntries = DefaultCacheEntries
	}
	if opts.MaxInline <= 0 {
		opts.MaxInline = DefaultMaxInline
	}
	if opts.MaxSize <= 0 {
		opts.MaxSize = DefaultMaxSize
	}
	if opts.Backlog <= 0 {
		opts.Backlog = DefaultBacklog
	}
	anon := opts.Anonymizer
	if anon == nil {
		anon = NewAnonymizer(nil)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Identifier{
		opts:     opts,
		anon:     anon,
		log:      log,
		cache:    newCache(opts.CacheEntries),
		jobs:     make(chan *job, opts.Backlog),
		inflight: make(map[fileKey]*job),
	}
}

// Identify returns the facts of the open file f, whose path (as the exec
// source saw it) is path. It reads through f with pread only, so f's
// offset is untouched, and it never reads a file that is not regular. A
// file version seen before costs one fstat and a map lookup. A file larger
// than Options.MaxInline gives ErrDeferred (or ErrBacklogFull); the caller
// may close f at once either way. The returned Facts.ELF is shared with
// the cache and must not be modified.
func (id *Identifier) Identify(f *os.File, path string) (Facts, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return Facts{}, fmt.Errorf("identify %s: %w", path, err)
	}
	var facts Facts
	cerr := rc.Control(func(fd uintptr) {
		facts, err = id.identifyFD(int(fd), path)
	})
	if cerr != nil {
		return Facts{}, fmt.Errorf("identify %s: %w", path, cerr)
	}
	return facts, err
}

// IdentifyPath is Identify for a path. Only a regular file is opened (with
// O_NONBLOCK, so a FIFO swapped in at the last moment cannot block).
func (id *Identifier) IdentifyPath(path string) (Facts, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return Facts{}, fmt.Errorf("identify %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		id.refused.Add(1)
		return Facts{}, fmt.Errorf("identify %s: %w", path, ErrNotRegular)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return Facts{}, fmt.Errorf("identify %s: %w", path, err)
	}
	defer unix.Close(fd)
	return id.identifyFD(fd, path)
}

func (id *Identifier) identifyFD(fd int, path string) (Facts, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		id.refused.Add(1)
		return Facts{}, fmt.Errorf("identify %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		id.refused.Add(1)
		return Facts{}, fmt.Errorf("identify %s: %w", path, ErrNotRegular)
	}
	key := keyOf(&st)
	if f, ok := id.cache.get(key, path, id.anon); ok {
		id.hits.Add(1)
		return f, nil
	}
	if st.Size > id.opts.MaxSize {
		id.refused.Add(1)
		return Facts{}, fmt.Errorf("identify %s: %d bytes: %w", path, st.Size, ErrTooLarge)
	}
	if st.Size > id.opts.MaxInline {
		return Facts{}, id.deferFD(fd, key, path)
	}
	id.misses.Add(1)
	f, key, err := id.compute(context.Background(), fd, key)
	if err != nil {
		id.refused.Add(1)
		return Facts{}, fmt.Errorf("identify %s: %w", path, err)
	}
	f.Path, f.PackageManaged = pathOrUnknown(id.anon.Anonymize(path)), PackageManaged(path)
	id.cache.put(key, f, path)
	return f, nil
}

// deferFD hands a duplicate of fd to the background worker, or joins the
// job already waiting for the same file version.
func (id *Identifier) deferFD(fd int, key fileKey, path string) error {
	id.mu.Lock()
	defer id.mu.Unlock()
	if id.stopped {
		id.dropped.Add(1)
		return fmt.Errorf("identify %s: %w", path, ErrStopped)
	}
	if j, ok := id.inflight[key]; ok {
		j.calls++
		id.deferred.Add(1)
		return ErrDeferred
	}
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		id.refused.Add(1)
		return fmt.Errorf("identify %s: duplicate descriptor: %w", path, err)
	}
	j := &job{fd: dup, key: key, path: path, calls: 1}
	select {
	case id.jobs <- j:
	default:
		unix.Close(dup)
		id.dropped.Add(1)
		id.log.Warn("large file not identified: background backlog full", "size", key.size, "backlog", cap(id.jobs))
		return fmt.Errorf("identify %s: %w", path, ErrBacklogFull)
	}
	id.inflight[key] = j
	id.deferred.Add(1)
	return ErrDeferred
}

// Serve runs the background worker that hashes large files, one at a
// time, until ctx is cancelled. Cancelling ctx also interrupts the file
// being hashed. It then closes every waiting file, answers their callers
// with ErrStopped, and returns ctx.Err(). Serve may run once.
func (id *Identifier) Serve(ctx context.Context) error {
	for {
		if ctx.Err() != nil {
			id.stop()
			return ctx.Err()
		}
		select {
		case <-ctx.Done():
		case j := <-id.jobs:
			id.run(ctx, j)
		}
	}
}

func (id *Identifier) run(ctx context.Context, j *job) {
	defer unix.Close(j.fd)
	f, key, err := id.compute(ctx, j.fd, j.key)
	if err == nil {
		id.background.Add(1)
		f.Path, f.PackageManaged = pathOrUnknown(id.anon.Anonymize(j.path)), PackageManaged(j.path)
		id.cache.put(key, f, j.path)
	} else {
		id.refused.Add(1)
		err = fmt.Errorf("identify %s: %w", j.path, err)
		id.log.Debug("large file not identified", "err", err)
	}
	id.finish(j, Result{Facts: f, Err: err})
}

// finish removes j from inflight and delivers its result.
func (id *Identifier) finish(j *job, r Result) {
	id.mu.Lock()
	delete(id.inflight, j.key)
	r.Calls = j.calls
	id.mu.Unlock()
	if id.opts.OnDeferred != nil {
		id.opts.OnDeferred(r)
	}
}

func (id *Identifier) stop() {
	id.mu.Lock()
	id.stopped = true
	id.mu.Unlock()
	for {
		select {
		case j := <-id.jobs:
			unix.Close(j.fd)
			id.finish(j, Result{Err: fmt.Errorf("identify %s: %w", j.path, ErrStopped)})
		default:
			return
		}
	}
}

// Stats returns the counters; it is cheap.
func (id *Identifier) Stats() Stats {
	return Stats{
		Hits:       id.hits.Load(),
		Misses:     id.misses.Load(),
		Deferred:   id.deferred.Load(),
		Background: id.background.Load(),
		Dropped:    id.dropped.Load(),
		Refused:    id.refused.Load(),
		Cached:     id.cache.len(),
	}
}

// hashChunk is the read size while hashing; buffers are pooled.
const hashChunk = 256 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, hashChunk); return &b }}

// headLen is how much of the start of a file decides its kind and script
// interpreter (the kernel's BINPRM_BUF_SIZE).
const headLen = 256

// compute reads the facts of the file behind fd, except its path. When
// the file changes while it is read (its size, mtime or ctime differ
// afterwards, or it ends early), it is read once more; a second change
// gives ErrChanged. It returns the key of the version it read.
func (id *Identifier) compute(ctx context.Context, fd int, key fileKey) (Facts, fileKey, error) {
	for attempt := 0; ; attempt++ {
		f, err := readFacts(ctx, fd, key.size, id.anon)
		if id.afterRead != nil {
			id.afterRead()
		}
		if err != nil && !errors.Is(err, ErrChanged) {
			return Facts{}, key, err
		}
		var st unix.Stat_t
		if serr := unix.Fstat(fd, &st); serr != nil {
			return Facts{}, key, fmt.Errorf("stat after hashing: %w", serr)
		}
		now := keyOf(&st)
		if err == nil && now == key {
			return f, key, nil
		}
		if attempt == 1 {
			return Facts{}, key, ErrChanged
		}
		id.log.Debug("file changed while hashed, reading again", "size", now.size)
		key = now
		if key.size > id.opts.MaxSize {
			return Facts{}, key, ErrTooLarge
		}
	}
}

// readFacts hashes exactly size bytes of fd from offset 0 with pread and
// reads the kind, ELF facts and script interpreter. A file that ends
// early or continues past size gives ErrChanged.
func readFacts(ctx context.Context, fd int, size int64, anon *Anonymizer) (Facts, error) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	h := sha256.New()
	var head [headLen]byte
	nhead := 0
	var off int64
	for off <= size {
		if err := ctx.Err(); err != nil {
			return Facts{}, err
		}
		want := buf
		if rest := size - off; rest < int64(len(want)) {
			want = want[:rest+1] // one more byte tells a grown file
		}
		n, err := preadFull(fd, want, off)
		if err != nil {
			return Facts{}, fmt.Errorf("read at %d: %w", off, err)
		}
		if off+int64(n) > size {
			return Facts{}, ErrChanged
		}
		if nhead < headLen {
			nhead += copy(head[nhead:], want[:n])
		}
		h.Write(want[:n])
		off += int64(n)
		if n < len(want) {
			break
		}
	}
	if off != size {
		return Facts{}, ErrChanged
	}
	var sum [sha256.Size]byte
	f := Facts{SHA256: hex.EncodeToString(h.Sum(sum[:0])), Size: size, Kind: "other"}
	switch {
	case isELF(head[:nhead]):
		f.Kind = "elf"
		e := ParseELF(fdReader(fd), size)
		if interp := anon.Anonymize(e.Interpreter); interp == "" && e.Interpreter != "" && e.Malformed == "" {
			e.Malformed = "PT_INTERP is not an absolute path"
		}
		e.Interpreter = anon.Anonymize(e.Interpreter)
		f.ELF = e
	case nhead >= 2 && head[0] == '#' && head[1] == '!':
		f.Kind = "script"
		f.Interpreter = ScriptInterpreter(head[:nhead], anon)
	}
	return f, nil
}

// preadFull reads into b at off until b is full or the file ends.
func preadFull(fd int, b []byte, off int64) (int, error) {
	n := 0
	for n < len(b) {
		m, err := unix.Pread(fd, b[n:], off+int64(n))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return n, err
		}
		if m == 0 {
			break
		}
		n += m
	}
	return n, nil
}

// fdReader reads a descriptor with pread, leaving its offset alone.
type fdReader int

func (r fdReader) ReadAt(b []byte, off int64) (int, error) {
	n, err := preadFull(int(r), b, off)
	if err == nil && n < len(b) {
		err = io.EOF
	}
	return n, err
}

// ScriptInterpreter returns the interpreter named on the #! line at the
// start of head, anonymised. Arguments are left out, except the program
// name given to /usr/bin/env ("/usr/bin/env python3"), when it is a plain
// name. Control characters are replaced.
func ScriptInterpreter(head []byte, anon *Anonymizer) string {
	if len(head) < 2 || head[0] != '#' || head[1] != '!' {
		return ""
	}
	line := head[2:]
	if i := bytes.IndexByte(line, '\n'); i >= 0 {
		line = line[:i]
	}
	fields := strings.Fields(string(line))
	if len(fields) == 0 {
		return ""
	}
	interp := cString([]byte(fields[0]))
	if anon != nil {
		interp = anon.Anonymize(interp)
	}
	if strings.HasSuffix(interp, "/env") && len(fields) > 1 && plainName(fields[1]) {
		interp += " " + fields[1]
	}
	return interp
}

// plainName reports whether s is a program name without a path or flag.
func plainName(s string) bool {
	if s == "" || s[0] == '-' || len(s) > 64 {
		return false
	}
	for _, c := range s {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-' || c == '+'
		if !ok {
			return false
		}
	}
	return true
}

// pathOrUnknown is p, or wire.UnknownPath when the file's path could not
// be learned (the cloud needs one on every record).
func pathOrUnknown(p string) string {
	if p == "" {
		return wire.UnknownPath
	}
	return p
}
