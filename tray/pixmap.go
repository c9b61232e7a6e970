package tray

import (
	"bytes"
	"image"
	"image/color"
	"image/draw"
	"image/png"
)

// SystrayPNG returns the PNG to hand fyne.io/systray so that the panel
// receives exactly the image in b.
//
// The StatusNotifierItem pixmap is non-premultiplied ARGB32. systray
// (v1.12.2, argbForImage) decodes the PNG and sends the low byte of each
// 16-bit premultiplied channel that color.Color.RGBA returns: right for
// fully opaque and fully transparent pixels, wrong for every edge pixel in
// between. So each pixel is handed over as a 16-bit colour chosen so that
// the low bytes systray keeps are the wanted 8-bit values: alpha 0xFFaa
// (premultiplying by it changes a value by at most one step, so every
// low byte is reachable), and for each channel the smallest 16-bit value
// whose premultiplied result ends in the wanted byte. The result is only
// meant for systray.
func SystrayPNG(b []byte) []byte {
	img, err := png.Decode(bytes.NewReader(b))
	if err != nil {
		return b
	}
	src := image.NewNRGBA(img.Bounds())
	draw.Draw(src, src.Bounds(), img, img.Bounds().Min, draw.Src)
	out := image.NewNRGBA64(src.Bounds())
	for y := src.Rect.Min.Y; y < src.Rect.Max.Y; y++ {
		for x := src.Rect.Min.X; x < src.Rect.Max.X; x++ {
			c := src.NRGBAAt(x, y)
			a := 0xFF00 | uint32(c.A)
			out.SetNRGBA64(x, y, color.NRGBA64{R: channel(c.R, a), G: channel(c.G, a), B: channel(c.B, a), A: uint16(a)})
		}
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, out); err != nil {
		return b
	}
	return buf.Bytes()
}

// channel returns the smallest 16-bit value v with v*a/0xFFFF ending in
// the byte want, as color.NRGBA64's RGBA computes it.
func channel(want uint8, a uint32) uint16 {
	for v := uint32(want); v <= 0xFFFF; v++ {
		if uint8(v*a/0xFFFF) == want {
			return uint16(v)
		}
	}
	return uint16(want)
}
