package identify

import (
	"bytes"
	"encoding/binary"
	"flag"
	"os"
	"path/filepath"
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
	f.Fuzz(func(t *testing.T, data []byte) {
		got := ParseELF(bytes.NewReader(data), int64(len(data)))
		if got == nil {
			t.Fatal("nil result")
		}
		if len(got.Interpreter) > maxInterpLen || len(got.BuildID) > 2*maxBuildIDLen {
			t.Fatalf("unbounded field: %+v", got)
		}
	})
}
