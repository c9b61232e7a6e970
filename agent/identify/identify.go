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
	DefaultCacheBytes   = 4 << 20
	DefaultMaxInline    = 64 << 20
	DefaultMaxSize      = 2 << 30
)

// Errors of Identify. Test them with errors.Is.
var (
	// ErrDeferred means the file is larger than Options.MaxInline and not
	// known yet: it is to be hashed in the background by the returned Job.
	ErrDeferred = errors.New("identify: large file to hash in the background")
	// ErrNotRegular means the file is not a regular file (FIFO, device,
	// socket, directory); it is never read.
	ErrNotRegular = errors.New("identify: not a regular file")
	// ErrTooLarge means the file is larger than Options.MaxSize.
	ErrTooLarge = errors.New("identify: file too large")
	// ErrChanged means the file changed twice while it was being hashed.
	ErrChanged = errors.New("identify: file changed while hashed")
)

// Options configure an Identifier. The zero value gives the defaults.
type Options struct {
	// CacheEntries caps the cache of file versions (default 16,384).
	CacheEntries int
	// CacheBytes caps the memory the cache's facts and paths take
	// (default 4 MiB), whatever the length of the paths.
	CacheBytes int
	// MaxInline is the largest file Identify hashes on the caller's
	// goroutine (default 64 MiB); larger ones give a Job.
	MaxInline int64
	// MaxSize is the largest file identified at all (default 2 GiB).
	MaxSize int64
	// Anonymizer anonymises paths; nil means NewAnonymizer(nil). The agent
	// passes SystemAnonymizer().
	Anonymizer *Anonymizer
	// CachePath is the file the cache is kept in across restarts (see
	// Load and Save); empty keeps it in memory only.
	CachePath string
	// Logger receives debug and warning messages; nil discards them.
	Logger *slog.Logger
}

// Stats counts what an Identifier did.
type Stats struct {
	Hits       uint64 `json:"hits"`       // answered from the cache
	Misses     uint64 `json:"misses"`     // hashed on the caller's goroutine
	Deferred   uint64 `json:"deferred"`   // large files handed out as a Job
	Background uint64 `json:"background"` // large files hashed by a Job
	Refused    uint64 `json:"refused"`    // not regular, too large, changed, unreadable
	Cached     int    `json:"cached"`     // entries in the cache
	Loaded     int    `json:"loaded"`     // entries read from CachePath at start
}

// Identifier identifies files and remembers the facts of file versions it
// has seen. Large files are hashed by a Job that the caller runs where it
// likes. It is safe for concurrent use.
type Identifier struct {
	opts  Options
	anon  *Anonymizer
	log   *slog.Logger
	cache *cache

	hits, misses, deferred, background, refused atomic.Uint64
	loaded                                      atomic.Int64

	// persistMu serialises Load, Save and Forget.
	persistMu sync.Mutex

	afterRead func() // test hook: runs after each read of a file
}

// Job hashes one large file version away from the caller. Run it once,
// or Close it.
type Job struct {
	id   *Identifier
	fd   int // a duplicate owned by the job
	key  Key
	path string
}

// New returns an Identifier.
func New(opts Options) *Identifier {
	if opts.CacheEntries <= 0 {
		opts.CacheEntries = DefaultCacheEntries
	}
	if opts.CacheBytes <= 0 {
		opts.CacheBytes = DefaultCacheBytes
	}
	if opts.MaxInline <= 0 {
		opts.MaxInline = DefaultMaxInline
	}
	if opts.MaxSize <= 0 {
		opts.MaxSize = DefaultMaxSize
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
		opts:  opts,
		anon:  anon,
		log:   log,
		cache: newCache(opts.CacheEntries, opts.CacheBytes),
	}
}

// IdentifyFile returns the facts of the file open at fd. It reads through
// fd with pread only, so its offset is untouched, and it never reads a
// file that is not regular. A file version seen before costs one fstat
// and a map lookup; path, which gives the file's path as the exec source
// saw it, is called only for a file version not seen before (or seen
// under no path). A file larger than Options.MaxInline and not seen
// before gives ErrDeferred and a Job, which holds its own descriptor: the
// caller may close fd at once. The returned Facts.ELF is shared with the
// cache and must not be modified.
func (id *Identifier) IdentifyFile(fd int, path func() string) (Facts, *Job, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		id.refused.Add(1)
		return Facts{}, nil, fmt.Errorf("identify: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		id.refused.Add(1)
		return Facts{}, nil, ErrNotRegular
	}
	key := keyOf(&st)
	if f, ok := id.cache.get(key); ok {
		id.hits.Add(1)
		return f, nil, nil
	}
	p := path()
	if st.Size > id.opts.MaxSize {
		id.refused.Add(1)
		return Facts{}, nil, fmt.Errorf("identify %s: %d bytes: %w", p, st.Size, ErrTooLarge)
	}
	if st.Size > id.opts.MaxInline {
		dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			id.refused.Add(1)
			return Facts{}, nil, fmt.Errorf("identify %s: duplicate descriptor: %w", p, err)
		}
		id.deferred.Add(1)
		return Facts{}, &Job{id: id, fd: dup, key: key, path: p}, ErrDeferred
	}
	id.misses.Add(1)
	f, key, err := id.compute(context.Background(), fd, key)
	if err != nil {
		id.refused.Add(1)
		return Facts{}, nil, fmt.Errorf("identify %s: %w", p, err)
	}
	f.Path, f.PackageManaged = pathOrUnknown(id.anon.Anonymize(p)), PackageManaged(p)
	id.cache.put(key, f, p)
	return f, nil, nil
}

// Identify is IdentifyFile for an open file whose path is known.
func (id *Identifier) Identify(f *os.File, path string) (Facts, *Job, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return Facts{}, nil, fmt.Errorf("identify %s: %w", path, err)
	}
	var facts Facts
	var job *Job
	cerr := rc.Control(func(fd uintptr) {
		facts, job, err = id.IdentifyFile(int(fd), func() string { return path })
	})
	if cerr != nil {
		return Facts{}, nil, fmt.Errorf("identify %s: %w", path, cerr)
	}
	return facts, job, err
}

// IdentifyPath is Identify for a path. Only a regular file is opened (with
// O_NONBLOCK, so a FIFO swapped in at the last moment cannot block).
func (id *Identifier) IdentifyPath(path string) (Facts, *Job, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return Facts{}, nil, fmt.Errorf("identify %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		id.refused.Add(1)
		return Facts{}, nil, fmt.Errorf("identify %s: %w", path, ErrNotRegular)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return Facts{}, nil, fmt.Errorf("identify %s: %w", path, err)
	}
	defer unix.Close(fd)
	return id.IdentifyFile(fd, func() string { return path })
}

// Key is the file version a Job hashes: jobs with equal keys hash the
// same bytes, so a caller waiting for one may drop the others.
func (j *Job) Key() Key { return j.key }

// Path is the path the file was seen under when the job was made.
func (j *Job) Path() string { return j.path }

// Run hashes the file, remembers its facts and releases the job's
// descriptor. Cancelling ctx interrupts the hashing. The Facts carry
// the path of the job.
func (j *Job) Run(ctx context.Context) (Facts, error) {
	defer j.Close()
	id := j.id
	f, key, err := id.compute(ctx, j.fd, j.key)
	if err != nil {
		id.refused.Add(1)
		return Facts{}, fmt.Errorf("identify %s: %w", j.path, err)
	}
	id.background.Add(1)
	f.Path, f.PackageManaged = pathOrUnknown(id.anon.Anonymize(j.path)), PackageManaged(j.path)
	id.cache.put(key, f, j.path)
	return f, nil
}

// Close releases the job's descriptor without hashing. Later calls do
// nothing.
func (j *Job) Close() {
	if j.fd >= 0 {
		unix.Close(j.fd)
		j.fd = -1
	}
}

// Stats returns the counters; it is cheap.
func (id *Identifier) Stats() Stats {
	return Stats{
		Hits:       id.hits.Load(),
		Misses:     id.misses.Load(),
		Deferred:   id.deferred.Load(),
		Background: id.background.Load(),
		Refused:    id.refused.Load(),
		Cached:     id.cache.len(),
		Loaded:     int(id.loaded.Load()),
	}
}

// IsLoader reports whether f is a dynamic loader (ld.so): the kernel
// opens it for execution beside every dynamically linked program, so
// seeing it says nothing about which program ran. It is a shared object
// without an interpreter of its own and not a static PIE program.
func IsLoader(f Facts) bool {
	return f.ELF != nil && f.ELF.Type == "dyn" && f.ELF.Static && !f.ELF.PIE
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
func (id *Identifier) compute(ctx context.Context, fd int, key Key) (Facts, Key, error) {
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
