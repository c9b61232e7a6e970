package ico

import (
	"bytes"
	"errors"
	"image"
	"image/color"
	"image/png"
	"testing"
)

func pngOf(t *testing.T, size int) []byte {
	t.Helper()
	img := image.NewNRGBA(image.Rect(0, 0, size, size))
	img.Set(0, 0, color.NRGBA{R: 255, A: 255})
	var b bytes.Buffer
	if err := png.Encode(&b, img); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func TestRoundTrip(t *testing.T) {
	t.Parallel()
	sizes := []int{16, 24, 32, 48, 256}
	var pngs [][]byte
	for _, s := range sizes {
		pngs = append(pngs, pngOf(t, s))
	}
	var out bytes.Buffer
	if err := Encode(&out, pngs); err != nil {
		t.Fatal(err)
	}
	es, err := Entries(out.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != len(sizes) {
		t.Fatalf("got %d entries, want %d", len(es), len(sizes))
	}
	for i, e := range es {
		if e.Width != sizes[i] || e.Height != sizes[i] {
			t.Errorf("entry %d is %d×%d, want %d", i, e.Width, e.Height, sizes[i])
		}
		if got := out.Bytes()[e.Offset : e.Offset+e.Size]; !bytes.Equal(got, pngs[i]) {
			t.Errorf("entry %d does not hold the PNG it was given", i)
		}
	}
}

func TestEncodeRejects(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		pngs [][]byte
	}{
		{"no images", nil},
		{"not a png", [][]byte{[]byte("GIF89a")}},
		{"too large", [][]byte{pngOf(t, 257)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if err := Encode(&bytes.Buffer{}, tt.pngs); err == nil {
				t.Fatal("Encode succeeded, want an error")
			}
		})
	}
}

func TestEntriesRejects(t *testing.T) {
	t.Parallel()
	var good bytes.Buffer
	if err := Encode(&good, [][]byte{pngOf(t, 16)}); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"cursor type", append([]byte{0, 0, 2, 0}, good.Bytes()[4:]...)},
		{"directory cut short", good.Bytes()[:10]},
		{"image cut short", good.Bytes()[:good.Len()-1]},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if _, err := Entries(tt.b); !errors.Is(err, ErrFormat) {
				t.Fatalf("Entries = %v, want ErrFormat", err)
			}
		})
	}
}
