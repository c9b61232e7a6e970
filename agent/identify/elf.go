package identify

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"strconv"
)

// Bounds of the ELF parser. Every read it makes is at most one of these,
// whatever the headers claim, and all its reads of one file together are
// at most maxRead bytes: the work and the memory one file can cost are a
// small constant (MaxParseBytes), however many headers it has. A real
// program needs a few KiB.
const (
	maxRead         = 128 << 10 // bytes read of one file, in all
	maxProgHeaders  = 512       // real executables have about 15
	maxPhdrTable    = 64 << 10  // bytes of program header table read
	maxInterpLen    = 4096      // PATH_MAX
	maxNoteSegment  = 64 << 10  // bytes of one PT_NOTE segment read
	maxDynamicBytes = 64 << 10  // bytes of PT_DYNAMIC read
	maxBuildIDLen   = 64        // NT_GNU_BUILD_ID is 20 bytes (SHA-1) in practice
	elfIdentLen     = 16
	elf64HeaderLen  = 64
	elf32HeaderLen  = 52
	elf64PhdrLen    = 56
	elf32PhdrLen    = 32
)

// MaxParseBytes bounds what ParseELF reads of a file and, give or take a
// few hundred bytes of results, what it allocates.
const MaxParseBytes = maxRead

// ELF constants (from the System V ABI; debug/elf is not used because it
// allocates by header counts).
const (
	ptDynamic  = 2
	ptInterp   = 3
	ptNote     = 4
	etDyn      = 3
	ntGNUBuild = 3
	dtNull     = 0
	dtFlags1   = 0x6ffffffb
	df1PIE     = 0x08000000
)

var elfMagic = [4]byte{0x7f, 'E', 'L', 'F'}

var elfMachines = map[uint16]string{
	2:   "sparc",
	3:   "i386",
	8:   "mips",
	20:  "ppc",
	21:  "ppc64",
	22:  "s390x",
	40:  "arm",
	43:  "sparcv9",
	50:  "ia64",
	62:  "x86_64",
	183: "aarch64",
	243: "riscv",
	258: "loongarch",
}

var elfTypes = map[uint16]string{
	1: "rel",
	2: "exec",
	3: "dyn",
	4: "core",
}

// isELF reports whether head starts with the ELF magic.
func isELF(head []byte) bool {
	return len(head) >= 4 && [4]byte(head[:4]) == elfMagic
}

// elfParser reads an ELF file through r, never past size, with bounded
// reads. Its fields are the facts found so far.
type elfParser struct {
	r    io.ReaderAt
	size int64
	bo   binary.ByteOrder
	is64 bool
	out  ELF

	hasInterp  bool
	hasDynamic bool
	pieFlag    bool
	// left is what may still be read of the file (maxRead in all).
	left uint64
}

// ParseELF reads the ELF facts of the file behind r, whose size is size.
// It never panics and never allocates more than a few hundred KiB whatever
// the headers say: a header it cannot trust ends the parse, and
// ELF.Malformed says why. The other fields then hold what was read before.
func ParseELF(r io.ReaderAt, size int64) *ELF {
	p := &elfParser{r: r, size: size, left: maxRead}
	if err := p.parse(); err != nil {
		p.out.Malformed = err.Error()
	}
	p.out.Static = !p.hasInterp
	p.out.PIE = p.out.Type == "dyn" && (p.hasInterp || p.pieFlag)
	return &p.out
}

// read returns n bytes at off, or an error when they lie outside the file
// or would take the parser's reads beyond maxRead.
func (p *elfParser) read(what string, off, n uint64) ([]byte, error) {
	if off > uint64(p.size) || n > uint64(p.size)-off {
		return nil, fmt.Errorf("%s at offset %d length %d lies outside the %d-byte file", what, off, n, p.size)
	}
	if n > p.left {
		return nil, fmt.Errorf("%s of %d bytes would take the headers read beyond %d bytes", what, n, maxRead)
	}
	p.left -= n
	buf := make([]byte, n)
	if _, err := p.r.ReadAt(buf, int64(off)); err != nil {
		return nil, fmt.Errorf("read %s: %w", what, err)
	}
	return buf, nil
}

func (p *elfParser) parse() error {
	ident, err := p.read("ELF identification", 0, elfIdentLen)
	if err != nil {
		return err
	}
	if [4]byte(ident[:4]) != elfMagic {
		return fmt.Errorf("bad ELF magic")
	}
	switch ident[4] {
	case 1:
		p.is64 = false
	case 2:
		p.is64 = true
	default:
		return fmt.Errorf("unknown ELF class %d", ident[4])
	}
	switch ident[5] {
	case 1:
		p.bo = binary.LittleEndian
	case 2:
		p.bo = binary.BigEndian
	default:
		return fmt.Errorf("unknown ELF data encoding %d", ident[5])
	}
	if ident[6] != 1 {
		return fmt.Errorf("unknown ELF version %d", ident[6])
	}

	hdrLen := uint64(elf32HeaderLen)
	if p.is64 {
		hdrLen = elf64HeaderLen
	}
	h, err := p.read("ELF header", 0, hdrLen)
	if err != nil {
		return err
	}
	typ := p.bo.Uint16(h[16:])
	mach := p.bo.Uint16(h[18:])
	p.out.Type = nameOr(elfTypes, typ, "type-")
	p.out.Machine = nameOr(elfMachines, mach, "machine-")

	var phoff uint64
	var phentsize, phnum uint16
	minPhent := uint16(elf32PhdrLen)
	if p.is64 {
		phoff = p.bo.Uint64(h[32:])
		phentsize = p.bo.Uint16(h[54:])
		phnum = p.bo.Uint16(h[56:])
		minPhent = elf64PhdrLen
	} else {
		phoff = uint64(p.bo.Uint32(h[28:]))
		phentsize = p.bo.Uint16(h[42:])
		phnum = p.bo.Uint16(h[44:])
	}
	if phnum == 0 {
		return nil // a relocatable object or a core without segments
	}
	if phnum == 0xffff {
		return fmt.Errorf("program header count in section 0 (PN_XNUM) is not supported")
	}
	if phnum > maxProgHeaders {
		return fmt.Errorf("%d program headers exceed the limit of %d", phnum, maxProgHeaders)
	}
	if phentsize < minPhent {
		return fmt.Errorf("program header size %d is smaller than %d", phentsize, minPhent)
	}
	tableLen := uint64(phnum) * uint64(phentsize)
	if tableLen > maxPhdrTable {
		return fmt.Errorf("program header table of %d bytes exceeds the limit of %d", tableLen, maxPhdrTable)
	}
	table, err := p.read("program header table", phoff, tableLen)
	if err != nil {
		return err
	}

	// The interpreter and the dynamic flags decide static and PIE; the
	// notes, read after them, give the build ID.
	type segment struct{ off, size, align uint64 }
	var notes []segment
	for i := range int(phnum) {
		ph := table[i*int(phentsize):]
		var ptype uint32
		var off, filesz, align uint64
		if p.is64 {
			ptype = p.bo.Uint32(ph[0:])
			off = p.bo.Uint64(ph[8:])
			filesz = p.bo.Uint64(ph[32:])
			align = p.bo.Uint64(ph[48:])
		} else {
			ptype = p.bo.Uint32(ph[0:])
			off = uint64(p.bo.Uint32(ph[4:]))
			filesz = uint64(p.bo.Uint32(ph[16:]))
			align = uint64(p.bo.Uint32(ph[28:]))
		}
		switch ptype {
		case ptInterp:
			if p.hasInterp {
				return fmt.Errorf("more than one PT_INTERP")
			}
			if filesz == 0 || filesz > maxInterpLen {
				return fmt.Errorf("PT_INTERP of %d bytes is out of range", filesz)
			}
			b, err := p.read("PT_INTERP", off, filesz)
			if err != nil {
				return err
			}
			p.hasInterp = true
			p.out.Interpreter = cString(b)
		case ptDynamic:
			if p.hasDynamic {
				return fmt.Errorf("more than one PT_DYNAMIC")
			}
			p.hasDynamic = true
			if err := p.dynamic(off, filesz); err != nil {
				return err
			}
		case ptNote:
			if len(notes) < 16 {
				notes = append(notes, segment{off, filesz, align})
			}
		}
	}
	for _, n := range notes {
		if p.out.BuildID != "" {
			break
		}
		if err := p.note(n.off, n.size, n.align); err != nil {
			return err
		}
	}
	return nil
}

// dynamic looks for DT_FLAGS_1 in the PT_DYNAMIC segment.
func (p *elfParser) dynamic(off, size uint64) error {
	if size > maxDynamicBytes {
		size = maxDynamicBytes
	}
	b, err := p.read("PT_DYNAMIC", off, size)
	if err != nil {
		return err
	}
	ent := 8
	if p.is64 {
		ent = 16
	}
	for len(b) >= ent {
		var tag, val uint64
		if p.is64 {
			tag, val = p.bo.Uint64(b), p.bo.Uint64(b[8:])
		} else {
			tag, val = uint64(p.bo.Uint32(b)), uint64(p.bo.Uint32(b[4:]))
		}
		if tag == dtNull {
			break
		}
		if tag == dtFlags1 && val&df1PIE != 0 {
			p.pieFlag = true
		}
		b = b[ent:]
	}
	return nil
}

// note looks for NT_GNU_BUILD_ID in one PT_NOTE segment.
func (p *elfParser) note(off, size, align uint64) error {
	if size > maxNoteSegment {
		size = maxNoteSegment
	}
	b, err := p.read("PT_NOTE", off, size)
	if err != nil {
		return err
	}
	pad := uint64(4)
	if align == 8 {
		pad = 8
	}
	for uint64(len(b)) >= 12 {
		namesz := uint64(p.bo.Uint32(b[0:]))
		descsz := uint64(p.bo.Uint32(b[4:]))
		typ := p.bo.Uint32(b[8:])
		// Name and descriptor are padded so that each starts at a multiple
		// of the alignment, counted from the start of the note.
		total := uint64(len(b))
		if namesz > total-12 {
			return fmt.Errorf("note name of %d bytes overruns PT_NOTE", namesz)
		}
		descOff := alignUp(12+namesz, pad)
		if descOff > total || descsz > total-descOff {
			return fmt.Errorf("note descriptor of %d bytes overruns PT_NOTE", descsz)
		}
		name := b[12 : 12+namesz]
		desc := b[descOff : descOff+descsz]
		if typ == ntGNUBuild && string(cStringBytes(name)) == "GNU" {
			if descsz == 0 || descsz > maxBuildIDLen {
				return fmt.Errorf("build ID of %d bytes is out of range", descsz)
			}
			p.out.BuildID = hex.EncodeToString(desc)
			return nil
		}
		next := alignUp(descOff+descsz, pad)
		if next >= total {
			break
		}
		b = b[next:]
	}
	return nil
}

// alignUp rounds n up to a multiple of a (a power of two), saturating
// instead of overflowing.
func alignUp(n, a uint64) uint64 {
	if n > ^uint64(0)-a {
		return ^uint64(0)
	}
	return (n + a - 1) &^ (a - 1)
}

func nameOr(names map[uint16]string, v uint16, prefix string) string {
	if s, ok := names[v]; ok {
		return s
	}
	return prefix + strconv.Itoa(int(v))
}

// cStringBytes returns b up to its first NUL.
func cStringBytes(b []byte) []byte {
	for i, c := range b {
		if c == 0 {
			return b[:i]
		}
	}
	return b
}

// cString returns b up to its first NUL as a string, with bytes that are
// not printable ASCII replaced, so a hostile header cannot smuggle control
// characters into logs or the statement.
func cString(b []byte) string {
	b = cStringBytes(b)
	out := make([]byte, len(b))
	for i, c := range b {
		if c < 0x20 || c > 0x7e {
			c = '?'
		}
		out[i] = c
	}
	return string(out)
}
