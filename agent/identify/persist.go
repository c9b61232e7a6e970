package identify

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cloudprotect/cloudprotect/agent/internal/atomicfile"
	"github.com/cloudprotect/cloudprotect/wire"
)

// The identification cache on disk (Options.CachePath), so that a restart
// does not hash every program again.
//
// # Format
//
// Text, one JSON value per line:
//
//	cloudprotect identification cache 1
//	{"fs":[{"dev":…,"type":…,"fsid":[…,…],"root":"/"}, …]}
//	{"dev":…,"ino":…,"size":…,"mtime":…,"ctime":…,"facts":{…}}   (one per entry)
//	{"entries":N,"sha256":"…"}
//
// The last line counts the entries and holds the SHA-256 of every byte
// before it. Entries are keyed like the cache in memory (device, inode,
// size, mtime and ctime, in nanoseconds), so a file changed since is a
// miss. Only files on filesystems whose inode numbers and ctimes the
// kernel keeps (ext2/3/4, XFS, Btrfs, F2FS, bcachefs, ZFS) are kept; the
// "fs" line names each device's filesystem type, ID and root, and at
// load the entries of a device that no longer holds that filesystem (a
// device number given to another disk since) are left out. Paths are
// kept only anonymised, as sent.
//
// # Damage
//
// The file is replaced whole (temporary file, fsync, rename). A file that
// does not read back exactly (truncated, bytes changed, a header or a
// version this agent does not write, an entry that does not decode or
// holds facts the cloud would refuse, more entries than the cache holds)
// is ignored with a warning and replaced at the next save: the programs
// are hashed again, nothing else is lost.

// Persistence defaults.
const (
	// SaveEvery is how often Serve saves a cache that changed.
	SaveEvery = 10 * time.Minute
	// maxCacheLine bounds one line of the file.
	maxCacheLine = 64 << 10
	cacheHeader  = "cloudprotect identification cache 1"
)

// ErrCacheDamaged wraps why a cache file was ignored.
var ErrCacheDamaged = errors.New("identification cache damaged")

// persistableFS lists the filesystem types (statfs f_type) whose inode
// numbers and ctimes identify a file version across restarts.
var persistableFS = map[int64]string{
	0xEF53:     "ext",
	0x58465342: "xfs",
	0x9123683E: "btrfs",
	0xF2F52010: "f2fs",
	0xca451a4e: "bcachefs",
	0x2fc12fc1: "zfs",
}

type fsLine struct {
	FS []fsInfo `json:"fs"`
}

type fsInfo struct {
	Dev  uint64   `json:"dev"`
	Type int64    `json:"type"`
	FSID [2]int32 `json:"fsid"`
	Root string   `json:"root"`
}

type entryLine struct {
	Dev   uint64 `json:"dev"`
	Ino   uint64 `json:"ino"`
	Size  int64  `json:"size"`
	Mtime int64  `json:"mtime"`
	Ctime int64  `json:"ctime"`
	Facts Facts  `json:"facts"`
}

type trailerLine struct {
	Entries int    `json:"entries"`
	SHA256  string `json:"sha256"`
}

// Serve keeps the cache on disk: it loads CachePath, saves it every
// SaveEvery while it changes, and once more when ctx is cancelled; it
// returns ctx.Err(). Without a CachePath it only waits.
func (id *Identifier) Serve(ctx context.Context) error {
	if id.opts.CachePath == "" {
		<-ctx.Done()
		return ctx.Err()
	}
	if err := id.Load(); err != nil {
		id.log.Warn("identification cache ignored; programs are identified again", "path", id.opts.CachePath, "err", err)
	}
	t := time.NewTicker(SaveEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			if err := id.Save(); err != nil {
				id.log.Warn("save identification cache", "err", err)
			}
			return ctx.Err()
		case <-t.C:
			if err := id.Save(); err != nil {
				id.log.Warn("save identification cache", "err", err)
			}
		}
	}
}

// Load reads CachePath into the cache. A missing file is no error; a
// damaged one gives an error wrapping ErrCacheDamaged and loads nothing.
func (id *Identifier) Load() error {
	id.persistMu.Lock()
	defer id.persistMu.Unlock()
	f, err := os.Open(id.opts.CachePath)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("load identification cache: %w", err)
	}
	defer f.Close()
	entries, roots, err := readCache(f, id.opts.CacheEntries)
	if err != nil {
		return fmt.Errorf("load identification cache: %w: %w", ErrCacheDamaged, err)
	}
	for _, e := range entries {
		id.cache.put(e.key, e.facts, roots[e.key.dev])
	}
	id.cache.clean()
	id.loaded.Store(int64(len(entries)))
	id.log.Info("identification cache loaded", "entries", len(entries))
	return nil
}

type loadedEntry struct {
	key   Key
	facts Facts
}

// readCache reads and checks a whole cache file; it returns the entries
// of the devices that still hold the filesystem they were saved from, and
// the root of each such filesystem.
func readCache(r io.Reader, maxEntries int) ([]loadedEntry, map[uint64]string, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	sum := sha256.New()
	lineNo := 0
	next := func() ([]byte, error) {
		line, err := br.ReadSlice('\n')
		if err == bufio.ErrBufferFull || len(line) > maxCacheLine {
			return nil, fmt.Errorf("line %d longer than %d bytes", lineNo+1, maxCacheLine)
		}
		if err == io.EOF {
			return nil, fmt.Errorf("truncated after line %d", lineNo)
		}
		if err != nil {
			return nil, err
		}
		lineNo++
		return line, nil
	}
	line, err := next()
	if err != nil {
		return nil, nil, err
	}
	if string(bytes.TrimSuffix(line, []byte("\n"))) != cacheHeader {
		return nil, nil, fmt.Errorf("not an identification cache of this version (header %.60q)", line)
	}
	sum.Write(line)
	line, err = next()
	if err != nil {
		return nil, nil, err
	}
	var fsl fsLine
	if err := strictJSON(line, &fsl); err != nil {
		return nil, nil, fmt.Errorf("line %d: %w", lineNo, err)
	}
	sum.Write(line)
	roots := checkFilesystems(fsl.FS)
	var out []loadedEntry
	n := 0
	for {
		line, err = next()
		if err != nil {
			return nil, nil, err
		}
		if bytes.HasPrefix(line, []byte(`{"entries":`)) {
			break
		}
		sum.Write(line)
		var e entryLine
		if err := strictJSON(line, &e); err != nil {
			return nil, nil, fmt.Errorf("line %d: %w", lineNo, err)
		}
		if err := checkEntry(&e); err != nil {
			return nil, nil, fmt.Errorf("line %d: %w", lineNo, err)
		}
		if n++; n > maxEntries {
			return nil, nil, fmt.Errorf("more than %d entries", maxEntries)
		}
		if roots[e.Dev] != "" {
			out = append(out, loadedEntry{key: Key{dev: e.Dev, ino: e.Ino, size: e.Size, mtime: e.Mtime, ctime: e.Ctime}, facts: e.Facts})
		}
	}
	var tr trailerLine
	if err := strictJSON(line, &tr); err != nil {
		return nil, nil, fmt.Errorf("line %d: %w", lineNo, err)
	}
	if tr.Entries != n {
		return nil, nil, fmt.Errorf("the file says %d entries and holds %d", tr.Entries, n)
	}
	if got := hex.EncodeToString(sum.Sum(nil)); got != tr.SHA256 {
		return nil, nil, fmt.Errorf("checksum %s does not match the contents (%s)", tr.SHA256, got)
	}
	if rest, _ := br.Peek(1); len(rest) > 0 {
		return nil, nil, errors.New("bytes after the last line")
	}
	return out, roots, nil
}

// strictJSON decodes one line, refusing unknown fields.
func strictJSON(line []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("more than one value")
	}
	return nil
}

// checkEntry refuses facts the agent would not have made: the cache is
// trusted to answer for files, so what it holds must be what identifying
// them would give, in a form the cloud accepts.
func checkEntry(e *entryLine) error {
	f := &e.Facts
	switch {
	case !wire.ValidSHA256(f.SHA256):
		return errors.New("entry's SHA-256 is not 64 lowercase hex digits")
	case f.Size != e.Size || e.Size < 0:
		return errors.New("entry's size does not match its key")
	case f.Kind != wire.KindELF && f.Kind != wire.KindScript && f.Kind != "other":
		return fmt.Errorf("entry's kind %q is unknown", f.Kind)
	case (f.Kind == wire.KindELF) != (f.ELF != nil):
		return errors.New("entry's ELF facts do not match its kind")
	case wire.SanitizePath(f.Path) != f.Path:
		return errors.New("entry's path is not one the agent sends")
	}
	return nil
}

// checkFilesystems returns the roots of the devices that still hold the
// filesystem they were saved from: same device number at the root, same
// type and filesystem ID.
func checkFilesystems(fss []fsInfo) map[uint64]string {
	ok := make(map[uint64]string, len(fss))
	for _, f := range fss {
		var st unix.Stat_t
		var sfs unix.Statfs_t
		if unix.Stat(f.Root, &st) != nil || uint64(st.Dev) != f.Dev || unix.Statfs(f.Root, &sfs) != nil {
			continue
		}
		if int64(sfs.Type) == f.Type && sfs.Fsid.Val == f.FSID && persistableFS[f.Type] != "" {
			ok[f.Dev] = f.Root
		}
	}
	return ok
}

// Save writes the cache to CachePath when it changed since the last save
// or load. Only entries of persistable filesystems are written.
func (id *Identifier) Save() error {
	id.persistMu.Lock()
	defer id.persistMu.Unlock()
	ents, paths, dirty := id.cache.snapshot()
	if !dirty {
		return nil
	}
	fss := make(map[uint64]fsInfo)
	for dev, p := range paths {
		if info, ok := filesystemOf(dev, p); ok {
			fss[dev] = info
		}
	}
	if err := writeCache(id.opts.CachePath, ents, fss); err != nil {
		id.cache.markDirty()
		return err
	}
	return nil
}

// filesystemOf describes the filesystem of dev, found from a path on it,
// if its type is persistable.
func filesystemOf(dev uint64, path string) (fsInfo, bool) {
	var sfs unix.Statfs_t
	if path == "" || unix.Statfs(path, &sfs) != nil || persistableFS[int64(sfs.Type)] == "" {
		return fsInfo{}, false
	}
	// The root: the topmost folder above path on the same device.
	root := path
	for {
		var st unix.Stat_t
		if unix.Stat(root, &st) != nil || uint64(st.Dev) != dev {
			return fsInfo{}, false
		}
		parent := filepath.Dir(root)
		var pst unix.Stat_t
		if parent == root || unix.Stat(parent, &pst) != nil || uint64(pst.Dev) != dev {
			break
		}
		root = parent
	}
	return fsInfo{Dev: dev, Type: int64(sfs.Type), FSID: sfs.Fsid.Val, Root: root}, true
}

// writeCache replaces path with the entries of the given filesystems.
func writeCache(path string, ents []cacheEntry, fss map[uint64]fsInfo) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("save identification cache: %w", err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	sum := sha256.New()
	bw := bufio.NewWriterSize(io.MultiWriter(f, sum), 64<<10)
	var list []fsInfo
	for _, fi := range fss {
		list = append(list, fi)
	}
	if err := writeLines(bw, sum, ents, fss, list); err != nil {
		return fmt.Errorf("save identification cache: %w", err)
	}
	if err := f.Chmod(0o600); err != nil {
		return fmt.Errorf("save identification cache: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("save identification cache: sync: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("save identification cache: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("save identification cache: %w", err)
	}
	if d, derr := os.Open(dir); derr == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

func writeLines(bw *bufio.Writer, sum hash.Hash, ents []cacheEntry, fss map[uint64]fsInfo, list []fsInfo) error {
	enc := json.NewEncoder(bw)
	if _, err := bw.WriteString(cacheHeader + "\n"); err != nil {
		return err
	}
	if err := enc.Encode(fsLine{FS: list}); err != nil {
		return err
	}
	n := 0
	for _, e := range ents {
		if _, ok := fss[e.key.dev]; !ok {
			continue
		}
		if err := enc.Encode(entryLine{Dev: e.key.dev, Ino: e.key.ino, Size: e.key.size, Mtime: e.key.mtime, Ctime: e.key.ctime, Facts: e.facts}); err != nil {
			return err
		}
		n++
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	// The checksum covers every byte written so far; the trailer is not
	// hashed (bw is flushed, so sum has seen them all).
	tr, err := json.Marshal(trailerLine{Entries: n, SHA256: hex.EncodeToString(sum.Sum(nil))})
	if err != nil {
		return err
	}
	if _, err := bw.Write(append(tr, '\n')); err != nil {
		return err
	}
	return bw.Flush()
}

// Forget empties the cache and wipes its file: what it held was learnt
// while the person participated.
func (id *Identifier) Forget() error {
	id.persistMu.Lock()
	defer id.persistMu.Unlock()
	id.cache.reset()
	id.loaded.Store(0)
	if id.opts.CachePath == "" {
		return nil
	}
	return atomicfile.Wipe(id.opts.CachePath)
}
