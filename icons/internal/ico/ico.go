// Package ico writes and reads Windows icon (.ico) containers whose images
// are stored as PNG, the form Windows Vista and later load directly.
package ico

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"image/png"
	"io"
)

// Entry describes one image of an icon file.
type Entry struct {
	Width, Height int // in pixels; 256 is stored as 0 in the directory
	Offset, Size  int // where the PNG data lies in the file
}

const (
	headerLen = 6
	entryLen  = 16
)

// Encode writes an icon file holding the given PNG images, in the order
// given. Every image must be a PNG of at most 256×256 pixels.
func Encode(w io.Writer, pngs [][]byte) error {
	if len(pngs) == 0 || len(pngs) > 0xffff {
		return fmt.Errorf("encode icon: %d images", len(pngs))
	}
	var buf bytes.Buffer
	hdr := [headerLen]byte{}
	binary.LittleEndian.PutUint16(hdr[2:], 1) // type 1: icon
	binary.LittleEndian.PutUint16(hdr[4:], uint16(len(pngs)))
	buf.Write(hdr[:])
	offset := headerLen + entryLen*len(pngs)
	for i, p := range pngs {
		cfg, err := png.DecodeConfig(bytes.NewReader(p))
		if err != nil {
			return fmt.Errorf("encode icon: image %d: %w", i, err)
		}
		if cfg.Width < 1 || cfg.Width > 256 || cfg.Height < 1 || cfg.Height > 256 {
			return fmt.Errorf("encode icon: image %d is %d×%d, want at most 256×256", i, cfg.Width, cfg.Height)
		}
		var e [entryLen]byte
		e[0] = byte(cfg.Width % 256) // 256 is written as 0
		e[1] = byte(cfg.Height % 256)
		// e[2] colour count and e[3] reserved stay 0.
		binary.LittleEndian.PutUint16(e[4:], 1)  // colour planes
		binary.LittleEndian.PutUint16(e[6:], 32) // bits per pixel
		binary.LittleEndian.PutUint32(e[8:], uint32(len(p)))
		binary.LittleEndian.PutUint32(e[12:], uint32(offset))
		buf.Write(e[:])
		offset += len(p)
	}
	for _, p := range pngs {
		buf.Write(p)
	}
	_, err := w.Write(buf.Bytes())
	return err
}

// ErrFormat is wrapped by every error about a malformed icon file.
var ErrFormat = errors.New("not an icon file")

// Entries reads the directory of an icon file and checks that every entry
// points inside the file.
func Entries(b []byte) ([]Entry, error) {
	if len(b) < headerLen || binary.LittleEndian.Uint16(b[0:]) != 0 || binary.LittleEndian.Uint16(b[2:]) != 1 {
		return nil, fmt.Errorf("read icon: %w: bad header", ErrFormat)
	}
	n := int(binary.LittleEndian.Uint16(b[4:]))
	if len(b) < headerLen+entryLen*n {
		return nil, fmt.Errorf("read icon: %w: directory of %d entries cut short", ErrFormat, n)
	}
	out := make([]Entry, 0, n)
	for i := range n {
		e := b[headerLen+entryLen*i:]
		en := Entry{
			Width:  int(e[0]),
			Height: int(e[1]),
			Size:   int(binary.LittleEndian.Uint32(e[8:])),
			Offset: int(binary.LittleEndian.Uint32(e[12:])),
		}
		if en.Width == 0 {
			en.Width = 256
		}
		if en.Height == 0 {
			en.Height = 256
		}
		if en.Offset < headerLen+entryLen*n || en.Size <= 0 || en.Offset+en.Size > len(b) {
			return nil, fmt.Errorf("read icon: %w: entry %d points outside the file", ErrFormat, i)
		}
		out = append(out, en)
	}
	return out, nil
}
