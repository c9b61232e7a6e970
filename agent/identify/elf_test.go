package identify

import (
	"bytes"
	"encoding/binary"
	"flag"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the ELF fixtures in testdata/")

// elfSpec describes a hand-made 64-bit little-endian x86_64 ELF.
type elfSpec struct {
	typ     uint16
	interp  string
	buildID []byte
	pieFlag bool
}

// buildELF lays out: ELF header, program headers, then the segments.
func buildELF(s elfSpec) []byte {
	le := binary.LittleEndian
	type seg struct {
		typ  uint32
		data []byte
	}
	var segs []seg
	if s.interp != "" {
		segs = append(segs, seg{ptInterp, append([]byte(s.interp), 0)})
	}
	if s.buildID != nil {
		var n []byte
		n = le.AppendUint32(n, 4)
		n = le.AppendUint32(n, uint32(len(s.buildID)))
		n = le.AppendUint32(n, ntGNUBuild)
		n = append(n, "GNU\x00"...)
		n = append(n, s.buildID...)
		for len(n)%4 != 0 {
			n = append(n, 0)
		}
		segs = append(segs, seg{ptNote, n})
	}
	if s.pieFlag {
		var d []byte
		d = le.AppendUint64(d, dtFlags1)
		d = le.AppendUint64(d, df1PIE)
		d = le.AppendUint64(d, dtNull)
		d = le.AppendUint64(d, 0)
		segs = append(segs, seg{ptDynamic, d})
	}
	h := make([]byte, elf64HeaderLen)
	copy(h, elfMagic[:])
	h[4], h[5], h[6] = 2, 1, 1
	le.PutUint16(h[16:], s.typ)
	le.PutUint16(h[18:], 62)
	le.PutUint32(h[20:], 1)
	le.PutUint64(h[32:], elf64HeaderLen)
	le.PutUint16(h[52:], elf64HeaderLen)
	le.PutUint16(h[54:], elf64PhdrLen)
	le.PutUint16(h[56:], uint16(len(segs)))
	off := uint64(elf64HeaderLen + elf64PhdrLen*len(segs))
	var phdrs, data []byte
	for _, sg := range segs {
		ph := make([]byte, elf64PhdrLen)
		le.PutUint32(ph[0:], sg.typ)
		le.PutUint64(ph[8:], off)
		le.PutUint64(ph[32:], uint64(len(sg.data)))
		le.PutUint64(ph[40:], uint64(len(sg.data)))
		le.PutUint64(ph[48:], 4)
		phdrs = append(phdrs, ph...)
		data = append(data, sg.data...)
		off += uint64(len(sg.data))
	}
	return append(append(h, phdrs...), data...)
}

var testBuildID = []byte{0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}

// mutate returns a copy of b with f applied.
func mutate(b []byte, f func([]byte) []byte) []byte {
	return f(bytes.Clone(b))
}

// elfFixtures are the files under testdata/, named after what they
// reproduce, with the facts they must give. Run with -update to rewrite
// them.
func elfFixtures() []struct {
	name string
	data []byte
	want ELF
} {
	le := binary.LittleEndian
	pie := buildELF(elfSpec{typ: etDyn, interp: "/lib64/ld-linux-x86-64.so.2", buildID: testBuildID})
	phdr := func(i int) int { return elf64HeaderLen + i*elf64PhdrLen }
	return []struct {
		name string
		data []byte
		want ELF
	}{
		{"dynamic-pie-with-build-id.elf", pie,
			ELF{Machine: "x86_64", Type: "dyn", PIE: true, Interpreter: "/lib64/ld-linux-x86-64.so.2", BuildID: "deadbeef0102030405060708090a0b0c0d0e0f10"}},
		{"static-exec.elf", buildELF(elfSpec{typ: 2}),
			ELF{Machine: "x86_64", Type: "exec", Static: true}},
		{"static-pie-dt-flags-1.elf", buildELF(elfSpec{typ: etDyn, pieFlag: true}),
			ELF{Machine: "x86_64", Type: "dyn", Static: true, PIE: true}},
		{"truncated-in-header.elf", pie[:40],
			ELF{Static: true, Malformed: "ELF header at offset 0 length 64 lies outside the 40-byte file"}},
		{"truncated-in-segments.elf", pie[:phdr(1)+10],
			ELF{Machine: "x86_64", Type: "dyn", Static: true, Malformed: "program header table at offset 64 length 112 lies outside the 130-byte file"}},
		{"phoff-huge.elf", mutate(pie, func(b []byte) []byte { le.PutUint64(b[32:], 1<<63); return b }),
			ELF{Machine: "x86_64", Type: "dyn", Static: true, Malformed: "program header table at offset 9223372036854775808 length 112 lies outside the 240-byte file"}},
		{"phnum-huge.elf", mutate(pie, func(b []byte) []byte { le.PutUint16(b[56:], 60000); return b }),
			ELF{Machine: "x86_64", Type: "dyn", Static: true, Malformed: "60000 program headers exceed the limit of 512"}},
		{"phnum-xnum.elf", mutate(pie, func(b []byte) []byte { le.PutUint16(b[56:], 0xffff); return b }),
			ELF{Machine: "x86_64", Type: "dyn", Static: true, Malformed: "program header count in section 0 (PN_XNUM) is not supported"}},
		{"phentsize-small.elf", mutate(pie, func(b []byte) []byte { le.PutUint16(b[54:], 8); return b }),
			ELF{Machine: "x86_64", Type: "dyn", Static: true, Malformed: "program header size 8 is smaller than 56"}},
		{"interp-filesz-huge.elf", mutate(pie, func(b []byte) []byte { le.PutUint64(b[phdr(0)+32:], 1<<40); return b }),
			ELF{Machine: "x86_64", Type: "dyn", Static: true, Malformed: "PT_INTERP of 1099511627776 bytes is out of range"}},
		{"interp-offset-past-end.elf", mutate(pie, func(b []byte) []byte { le.PutUint64(b[phdr(0)+8:], ^uint64(0)-2); return b }),
			ELF{Machine: "x86_64", Type: "dyn", Static: true, Malformed: "PT_INTERP at offset 18446744073709551613 length 28 lies outside the 240-byte file"}},
		{"note-namesz-overflow.elf", mutate(pie, func(b []byte) []byte {
			le.PutUint32(b[elf64HeaderLen+2*elf64PhdrLen+28:], 0xfffffffd)
			return b
		}),
			ELF{Machine: "x86_64", Type: "dyn", PIE: true, Interpreter: "/lib64/ld-linux-x86-64.so.2", Malformed: "note name of 4294967293 bytes overruns PT_NOTE"}},
		{"build-id-oversized.elf", buildELF(elfSpec{typ: 2, buildID: bytes.Repeat([]byte{1}, 100)}),
			ELF{Machine: "x86_64", Type: "exec", Static: true, Malformed: "build ID of 100 bytes is out of range"}},
		{"bad-class.elf", mutate(pie, func(b []byte) []byte { b[4] = 9; return b }),
			ELF{Static: true, Malformed: "unknown ELF class 9"}},
		{"unknown-machine.elf", mutate(pie, func(b []byte) []byte { le.PutUint16(b[18:], 9999); return b }),
			ELF{Machine: "machine-9999", Type: "dyn", PIE: true, Interpreter: "/lib64/ld-linux-x86-64.so.2", BuildID: "deadbeef0102030405060708090a0b0c0d0e0f10"}},
		{"interp-control-chars.elf", buildELF(elfSpec{typ: etDyn, interp: "/lib/ld\x1b[31m.so"}),
			ELF{Machine: "x86_64", Type: "dyn", PIE: true, Interpreter: "/lib/ld?[31m.so"}},
	}
}

func TestParseELFFixtures(t *testing.T) {
	t.Parallel()
	for _, tc := range elfFixtures() {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path := filepath.Join("testdata", tc.name)
			if *update {
				if err := os.WriteFile(path, tc.data, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("read fixture (run with -update to create it): %v", err)
			}
			got := ParseELF(bytes.NewReader(data), int64(len(data)))
			if *got != tc.want {
				t.Errorf("ParseELF:\n got %+v\nwant %+v", *got, tc.want)
			}
		})
	}
}

// TestParseELFReal parses binaries the toolchain and the system produced.
func TestParseELFReal(t *testing.T) {
	t.Parallel()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	paths := []string{exe, "/bin/sh", "/usr/bin/env"}
	for _, p := range paths {
		t.Run(filepath.Base(p), func(t *testing.T) {
			t.Parallel()
			data, err := os.ReadFile(p)
			if err != nil {
				t.Skipf("no %s: %v", p, err)
			}
			got := ParseELF(bytes.NewReader(data), int64(len(data)))
			if got.Malformed != "" || got.Machine == "" || got.Type == "" {
				t.Errorf("ParseELF(%s) = %+v", p, *got)
			}
			if !got.Static && !strings.HasPrefix(got.Interpreter, "/") {
				t.Errorf("ParseELF(%s): dynamic without interpreter: %+v", p, *got)
			}
			t.Logf("%s: %+v", p, *got)
		})
	}
}

// FuzzELF feeds the parser mutations of the fixtures: it must never panic,
// and always say something about what it read.
func FuzzELF(f *testing.F) {
	entries, err := os.ReadDir("testdata")
	if err != nil {
		f.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".elf") {
			b, err := os.ReadFile(filepath.Join("testdata", e.Name()))
			if err != nil {
				f.Fatal(err)
			}
			f.Add(b)
		}
	}
	f.Add(manyDynamic(512))
	f.Add(manyNotes(16))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := &countingReaderAt{r: bytes.NewReader(data)}
		var got *ELF
		alloc := allocated(func() { got = ParseELF(r, int64(len(data))) })
		if got == nil {
			t.Fatal("nil result")
		}
		if len(got.Interpreter) > maxInterpLen || len(got.BuildID) > 2*maxBuildIDLen {
			t.Fatalf("unbounded field: %+v", got)
		}
		if r.n > MaxParseBytes {
			t.Fatalf("read %d bytes of a %d-byte file; the bound is %d", r.n, len(data), MaxParseBytes)
		}
		if alloc > maxParseAlloc {
			t.Fatalf("allocated %d bytes parsing a %d-byte file; the bound is %d", alloc, len(data), maxParseAlloc)
		}
	})
}

// maxParseAlloc bounds what parsing one file may allocate: what it reads
// and a little for the results.
const maxParseAlloc = MaxParseBytes + 16<<10

// countingReaderAt counts the bytes read through it.
type countingReaderAt struct {
	r io.ReaderAt
	n int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(p, off)
	c.n += int64(n)
	return n, err
}

// allocated returns the bytes fn allocated on the heap.
func allocated(fn func()) uint64 {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	fn()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// withSegments builds an ELF of n program headers of type typ, each
// covering the same segment of size bytes made by fill.
func withSegments(typ uint32, n, size int, fill func([]byte)) []byte {
	le := binary.LittleEndian
	h := make([]byte, elf64HeaderLen)
	copy(h, elfMagic[:])
	h[4], h[5], h[6] = 2, 1, 1
	le.PutUint16(h[16:], etDyn)
	le.PutUint16(h[18:], 62)
	le.PutUint32(h[20:], 1)
	le.PutUint64(h[32:], elf64HeaderLen)
	le.PutUint16(h[52:], elf64HeaderLen)
	le.PutUint16(h[54:], elf64PhdrLen)
	le.PutUint16(h[56:], uint16(n))
	off := uint64(elf64HeaderLen + elf64PhdrLen*n)
	out := h
	for range n {
		ph := make([]byte, elf64PhdrLen)
		le.PutUint32(ph[0:], typ)
		le.PutUint64(ph[8:], off)
		le.PutUint64(ph[32:], uint64(size))
		le.PutUint64(ph[48:], 4)
		out = append(out, ph...)
	}
	seg := make([]byte, size)
	fill(seg)
	return append(out, seg...)
}

// manyDynamic is a file of n PT_DYNAMIC headers over one 64 KiB segment
// of entries that are not DT_NULL: each header made the parser read
// (and allocate) the whole segment again.
func manyDynamic(n int) []byte {
	return withSegments(ptDynamic, n, maxDynamicBytes, func(b []byte) {
		for i := 0; i+16 <= len(b); i += 16 {
			binary.LittleEndian.PutUint64(b[i:], 1) // DT_NEEDED
		}
	})
}

// manyNotes is a file of n PT_NOTE headers over one 64 KiB segment of
// notes that are not the build ID.
func manyNotes(n int) []byte {
	return withSegments(ptNote, n, maxNoteSegment, func(b []byte) {
		for i := 0; i+16 <= len(b); i += 16 {
			binary.LittleEndian.PutUint32(b[i:], 4)
			binary.LittleEndian.PutUint32(b[i+4:], 0)
			binary.LittleEndian.PutUint32(b[i+8:], 1)
			copy(b[i+12:], "XYZ\x00")
		}
	})
}

// A hostile file cannot make parsing it cost more than a small constant,
// whatever its headers say: 512 PT_DYNAMIC headers over a 64 KiB segment
// (32 MiB of reads before the bound), 16 PT_NOTE headers over one.
func TestParseELFBounded(t *testing.T) {
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"512 PT_DYNAMIC", manyDynamic(512)},
		{"16 PT_NOTE", manyNotes(16)},
		{"one PT_DYNAMIC", manyDynamic(1)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &countingReaderAt{r: bytes.NewReader(tc.data)}
			var got *ELF
			alloc := allocated(func() { got = ParseELF(r, int64(len(tc.data))) })
			t.Logf("%d-byte file: read %d bytes, allocated %d; malformed: %q", len(tc.data), r.n, alloc, got.Malformed)
			if r.n > MaxParseBytes || alloc > maxParseAlloc {
				t.Errorf("read %d bytes and allocated %d; the bounds are %d and %d", r.n, alloc, MaxParseBytes, maxParseAlloc)
			}
		})
	}
}

// BenchmarkParseELF compares a real program's headers with the hostile
// files of TestParseELFBounded.
func BenchmarkParseELF(b *testing.B) {
	real, err := os.ReadFile("/bin/sh")
	if err != nil {
		b.Skip(err)
	}
	for _, bc := range []struct {
		name string
		data []byte
	}{
		{"real", real},
		{"512-dynamic", manyDynamic(512)},
		{"16-notes", manyNotes(16)},
	} {
		b.Run(bc.name, func(b *testing.B) {
			r := bytes.NewReader(bc.data)
			b.ReportAllocs()
			for b.Loop() {
				ParseELF(r, int64(len(bc.data)))
			}
		})
	}
}
