package icons

import (
	"bytes"
	"image/png"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/cloudprotect/cloudprotect/icons/internal/ico"
)

func TestPNGSizes(t *testing.T) {
	t.Parallel()
	for _, st := range States {
		for _, size := range Sizes {
			b := PNG(st, size)
			if b == nil {
				t.Fatalf("PNG(%s, %d) is missing", st, size)
			}
			cfg, err := png.DecodeConfig(bytes.NewReader(b))
			if err != nil {
				t.Fatalf("PNG(%s, %d): %v", st, size, err)
			}
			if cfg.Width != size || cfg.Height != size {
				t.Errorf("PNG(%s, %d) is %d×%d", st, size, cfg.Width, cfg.Height)
			}
		}
	}
}

func TestPNGPicksNearestLarger(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		ask, want int
	}{
		{"exact", 22, 22},
		{"between", 20, 22},
		{"tiny", 1, 16},
		{"huge", 1024, 256},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg, err := png.DecodeConfig(bytes.NewReader(PNG(Participating, tt.ask)))
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Width != tt.want {
				t.Errorf("PNG(%d) gave %d px, want %d", tt.ask, cfg.Width, tt.want)
			}
		})
	}
}

func TestUnknownState(t *testing.T) {
	t.Parallel()
	if PNG("nonsense", 16) != nil || ICO("nonsense") != nil || SVG("nonsense") != nil {
		t.Fatal("an unknown state returned an image")
	}
}

func TestICO(t *testing.T) {
	t.Parallel()
	for _, st := range States {
		b := ICO(st)
		es, err := ico.Entries(b)
		if err != nil {
			t.Fatalf("ICO(%s): %v", st, err)
		}
		var got []int
		for _, e := range es {
			img := b[e.Offset : e.Offset+e.Size]
			cfg, err := png.DecodeConfig(bytes.NewReader(img))
			if err != nil || cfg.Width != e.Width {
				t.Errorf("ICO(%s) entry %d×%d holds a bad image: %v", st, e.Width, e.Height, err)
			}
			got = append(got, e.Width)
		}
		if len(got) == 0 || got[0] != 16 || got[len(got)-1] != 256 {
			t.Errorf("ICO(%s) sizes %v, want 16 to 256", st, got)
		}
	}
}

func TestSVG(t *testing.T) {
	t.Parallel()
	for _, st := range States {
		if !bytes.Contains(SVG(st), []byte("<svg")) {
			t.Errorf("SVG(%s) is not an SVG drawing", st)
		}
	}
}

// TestGeneratedUpToDate redraws the icons when rsvg-convert is installed and
// checks the committed images match their sources.
func TestGeneratedUpToDate(t *testing.T) {
	if _, err := exec.LookPath("rsvg-convert"); err != nil {
		t.Skip("rsvg-convert not installed (Debian librsvg2-bin); cannot check the generated icons")
	}
	dir := t.TempDir()
	if err := copyDir("src", filepath.Join(dir, "src")); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "run", "./internal/gen", "-dir", dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("gen: %v\n%s", err, out)
	}
	for _, st := range States {
		for _, size := range Sizes {
			name := filepath.Join("png", string(st)+"-"+itoa(size)+".png")
			if !sameFile(t, name, filepath.Join(dir, name)) {
				t.Errorf("%s is out of date with src/; run make icons", name)
			}
		}
		name := filepath.Join("ico", string(st)+".ico")
		if !sameFile(t, name, filepath.Join(dir, name)) {
			t.Errorf("%s is out of date with src/; run make icons", name)
		}
	}
}
