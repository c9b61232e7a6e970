package tray

import (
	"bytes"
	"image"
	"image/color"
	"image/png"
	"testing"

	"github.com/cloudprotect/cloudprotect/icons"
)

// What fyne.io/systray v1.12.2 does with the bytes it is given (the
// conversion in its argbForImage): the low byte of each 16-bit
// premultiplied channel. SystrayPNG's output must come out of it as the
// committed icon, semi-transparent edges included; the end-to-end test
// reads the real IconPixmap over D-Bus.
func TestSystrayPNG(t *testing.T) {
	t.Parallel()
	for _, st := range icons.States {
		for _, size := range []int{16, 22, PanelIconSize} {
			want := decode(t, icons.PNG(st, size))
			got := decode(t, SystrayPNG(icons.PNG(st, size)))
			semi := 0
			b := want.Bounds()
			for y := b.Min.Y; y < b.Max.Y; y++ {
				for x := b.Min.X; x < b.Max.X; x++ {
					w := color.NRGBAModel.Convert(want.At(x, y)).(color.NRGBA)
					r, g, bl, a := got.At(x, y).RGBA()
					if w.A != 0 && w.A != 0xff {
						semi++
					}
					if byte(a) != w.A || (w.A != 0 && (byte(r) != w.R || byte(g) != w.G || byte(bl) != w.B)) {
						t.Fatalf("%s %dpx (%d,%d): systray sends %02x%02x%02x α%02x, the icon is %02x%02x%02x α%02x",
							st, size, x, y, byte(r), byte(g), byte(bl), byte(a), w.R, w.G, w.B, w.A)
					}
				}
			}
			if semi == 0 {
				t.Errorf("%s %dpx has no semi-transparent pixel: the test proves nothing", st, size)
			}
		}
	}
}

func decode(t *testing.T, b []byte) image.Image {
	t.Helper()
	img, err := png.Decode(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	return img
}
