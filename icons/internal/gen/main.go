// Command gen redraws the tray icons from their SVG sources: it rasterises
// icons/src/*.svg with rsvg-convert into icons/png, packs Windows icons into
// icons/ico and, with -sheet, renders a contact sheet of every state and
// size on light and dark panels for the documentation.
//
// Run it from the module root with `make icons` (go run ./icons/internal/gen).
// A state may have a pixel-tuned drawing for 16 px, src/STATE-16.svg; every
// other size is drawn from src/STATE.svg.
package main

import (
	"bytes"
	"encoding/base64"
	"flag"
	"fmt"
	"image"
	"image/draw"
	"image/png"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/cloudprotect/cloudprotect/icons/internal/ico"
)

// Keep these in step with package icons.
var (
	states   = []string{"participating", "declined", "undecided", "limited", "unreachable", "threat"}
	sizes    = []int{16, 22, 24, 32, 48, 64, 256}
	icoSizes = []int{16, 24, 32, 48, 64, 256}
)

func main() {
	dir := flag.String("dir", "icons", "the icons package directory")
	sheet := flag.String("sheet", "", "also write a contact sheet PNG to this path")
	flag.Parse()
	if err := run(*dir, *sheet); err != nil {
		fmt.Fprintf(os.Stderr, "gen: error: %v\n", err)
		if strings.Contains(err.Error(), "rsvg-convert") {
			fmt.Fprintln(os.Stderr, "gen: hint: install librsvg2-bin (Debian) for rsvg-convert")
		}
		os.Exit(1)
	}
}

func run(dir, sheet string) error {
	if _, err := exec.LookPath("rsvg-convert"); err != nil {
		return fmt.Errorf("find rsvg-convert: %w", err)
	}
	for _, d := range []string{"png", "ico"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
	}
	rendered := map[string]map[int][]byte{}
	for _, st := range states {
		rendered[st] = map[int][]byte{}
		for _, size := range sizes {
			src := filepath.Join(dir, "src", st+".svg")
			if small := filepath.Join(dir, "src", fmt.Sprintf("%s-%d.svg", st, size)); exists(small) {
				src = small
			}
			b, err := rasterise(src, size)
			if err != nil {
				return err
			}
			rendered[st][size] = b
			if err := os.WriteFile(filepath.Join(dir, "png", fmt.Sprintf("%s-%d.png", st, size)), b, 0o644); err != nil {
				return err
			}
		}
		var pngs [][]byte
		for _, size := range icoSizes {
			pngs = append(pngs, rendered[st][size])
		}
		var out bytes.Buffer
		if err := ico.Encode(&out, pngs); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, "ico", st+".ico"), out.Bytes(), 0o644); err != nil {
			return err
		}
	}
	if sheet != "" {
		return contactSheet(sheet, rendered)
	}
	return nil
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// rasterise renders an SVG at size×size and re-encodes it with Go's encoder
// so the committed files do not depend on the rasteriser's PNG writer.
func rasterise(src string, size int) ([]byte, error) {
	cmd := exec.Command("rsvg-convert", "-w", fmt.Sprint(size), "-h", fmt.Sprint(size), "-f", "png", src)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	raw, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("rsvg-convert %s: %w: %s", src, err, strings.TrimSpace(stderr.String()))
	}
	img, err := png.Decode(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("decode %s at %d px: %w", src, size, err)
	}
	nrgba := image.NewNRGBA(img.Bounds())
	draw.Draw(nrgba, nrgba.Bounds(), img, img.Bounds().Min, draw.Src)
	var out bytes.Buffer
	enc := png.Encoder{CompressionLevel: png.BestCompression}
	if err := enc.Encode(&out, nrgba); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// contactSheet shows every state at panel sizes, enlarged without smoothing
// so each pixel can be judged, on a light, a dark and a coloured panel.
func contactSheet(path string, rendered map[string]map[int][]byte) error {
	panels := []struct{ name, bg, fg string }{
		{"light panel", "#f2f2f2", "#222"},
		{"dark panel", "#2b2b2b", "#eee"},
		{"coloured panel", "#3465a4", "#fff"},
	}
	labels := map[string]string{
		"participating": "on, participating",
		"declined":      "not participating",
		"undecided":     "needs your answer",
		"limited":       "limited",
		"unreachable":   "agent not running",
		"threat":        "new detection",
	}
	show := []struct{ size, zoom int }{{16, 4}, {22, 3}, {24, 3}, {16, 1}, {22, 1}, {24, 1}, {48, 1}}
	const colW, rowH, labelW, head = 560, 110, 150, 30
	w := labelW + colW
	h := head + len(panels)*(len(states)*rowH/2+40)
	var svg strings.Builder
	fmt.Fprintf(&svg, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="DejaVu Sans, sans-serif" font-size="13">`, w, h)
	fmt.Fprintf(&svg, `<rect width="%d" height="%d" fill="#fff"/>`, w, h)
	fmt.Fprintf(&svg, `<text x="10" y="20" font-weight="bold">cloudprotect tray icons: 16, 22, 24 px enlarged, then 16, 22, 24, 48 px at actual size</text>`)
	y := head
	for _, p := range panels {
		ph := len(states)*rowH/2 + 30
		fmt.Fprintf(&svg, `<rect x="0" y="%d" width="%d" height="%d" fill="%s"/>`, y, w, ph, p.bg)
		fmt.Fprintf(&svg, `<text x="10" y="%d" fill="%s" font-style="italic">%s</text>`, y+18, p.fg, p.name)
		ry := y + 28
		for _, st := range states {
			fmt.Fprintf(&svg, `<text x="10" y="%d" fill="%s">%s</text>`, ry+30, p.fg, labels[st])
			x := labelW
			for _, s := range show {
				b, err := enlarge(rendered[st][s.size], s.zoom)
				if err != nil {
					return err
				}
				px := s.size * s.zoom
				fmt.Fprintf(&svg, `<image x="%d" y="%d" width="%d" height="%d" href="data:image/png;base64,%s"/>`,
					x, ry+(64-px)/2+2, px, px, base64.StdEncoding.EncodeToString(b))
				x += px + 14
			}
			ry += rowH / 2
		}
		y += ph + 10
	}
	svg.WriteString(`</svg>`)
	tmp, err := os.CreateTemp("", "sheet-*.svg")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.WriteString(svg.String()); err != nil {
		return err
	}
	tmp.Close()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	cmd := exec.Command("rsvg-convert", "-f", "png", "-o", path, tmp.Name())
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("rsvg-convert contact sheet: %w: %s", err, out)
	}
	return nil
}

// enlarge scales a PNG by an integer factor, repeating pixels.
func enlarge(b []byte, zoom int) ([]byte, error) {
	if zoom == 1 {
		return b, nil
	}
	img, err := png.Decode(bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	r := img.Bounds()
	out := image.NewNRGBA(image.Rect(0, 0, r.Dx()*zoom, r.Dy()*zoom))
	for y := 0; y < out.Rect.Dy(); y++ {
		for x := 0; x < out.Rect.Dx(); x++ {
			out.Set(x, y, img.At(r.Min.X+x/zoom, r.Min.Y+y/zoom))
		}
	}
	var buf bytes.Buffer
	err = png.Encode(&buf, out)
	return buf.Bytes(), err
}
