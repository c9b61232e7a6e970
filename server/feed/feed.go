// Package feed reads the files analysts import as verdict feeds: plain
// lists of SHA-256 hashes, one a line, and CSV files with a "sha256_hash"
// column, as public malware hash exports publish them (their header may
// itself be a "#" comment line).
package feed

import (
	"bufio"
	"encoding/csv"
	"fmt"
	"io"
	"strings"

	"github.com/cloudprotect/cloudprotect/wire"
)

// MaxHashes bounds the hashes one feed file may hold.
const MaxHashes = 5_000_000

// maxLine bounds one line of a feed file.
const maxLine = 64 << 10

// Read reads a feed file. A plain list holds one SHA-256 a line, hex in
// either case (returned lowercase), surrounding spaces ignored; blank
// lines and text from "#" to the end of a line are comments. A CSV file
// has a header line naming a "sha256_hash" (or "sha256") column, possibly
// commented out with "#"; every later line that is not a comment is a
// record whose column holds a SHA-256. A bad line is an error naming
// name:line and what to do; nothing of the file is returned then.
func Read(name string, r io.Reader) ([]string, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), maxLine)
	var (
		out    []string
		column = -1 // the hash column once a CSV header was read
	)
	for n := 1; sc.Scan(); n++ {
		raw := strings.TrimSpace(strings.TrimPrefix(sc.Text(), "\ufeff"))
		if raw == "" {
			continue
		}
		if raw[0] == '#' {
			if column < 0 && len(out) == 0 {
				if i, ok := header(strings.TrimSpace(strings.TrimLeft(raw, "#"))); ok {
					column = i
				}
			}
			continue
		}
		if column < 0 && len(out) == 0 && strings.ContainsAny(raw, ",\"") {
			i, ok := header(raw)
			if !ok {
				return nil, fmt.Errorf("%s:%d: a CSV line before any header with a sha256_hash column: add the header line, or give one SHA-256 a line", name, n)
			}
			column = i
			continue
		}
		var h string
		if column >= 0 {
			fields, err := parseCSVLine(raw)
			if err != nil {
				return nil, fmt.Errorf("%s:%d: not a CSV record: %v", name, n, err)
			}
			if column >= len(fields) {
				return nil, fmt.Errorf("%s:%d: the record has %d fields, the sha256_hash column is field %d", name, n, len(fields), column+1)
			}
			h = fields[column]
		} else {
			h = raw
			if i := strings.IndexByte(h, '#'); i >= 0 {
				h = h[:i]
			}
		}
		h = strings.ToLower(strings.TrimSpace(h))
		if !wire.ValidSHA256(h) {
			return nil, fmt.Errorf("%s:%d: not a SHA-256 (64 hex digits): %q", name, n, short(h, 80))
		}
		if len(out) == MaxHashes {
			return nil, fmt.Errorf("%s:%d: more than %d hashes: split the file", name, n, MaxHashes)
		}
		out = append(out, h)
	}
	if err := sc.Err(); err != nil {
		if err == bufio.ErrTooLong {
			return nil, fmt.Errorf("read %s: a line is longer than %d bytes: is it a hash list or a CSV export?", name, maxLine)
		}
		return nil, fmt.Errorf("read %s: %w", name, err)
	}
	return out, nil
}

// header reports the index of the hash column if line is a CSV header.
func header(line string) (int, bool) {
	if !strings.Contains(line, ",") {
		return 0, false
	}
	fields, err := parseCSVLine(line)
	if err != nil {
		return 0, false
	}
	for i, f := range fields {
		f = strings.ToLower(strings.TrimSpace(f))
		if f == "sha256_hash" || f == "sha256" {
			return i, true
		}
	}
	return 0, false
}

func parseCSVLine(line string) ([]string, error) {
	cr := csv.NewReader(strings.NewReader(line))
	cr.TrimLeadingSpace = true
	cr.LazyQuotes = true
	cr.FieldsPerRecord = -1
	return cr.Read()
}

func short(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
