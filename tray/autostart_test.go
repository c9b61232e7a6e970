package tray

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const (
	entryOn     = "[Desktop Entry]\nType=Application\nExec=cloudprotect-tray\n"
	entryHidden = "[Desktop Entry]\nType=Application\nExec=cloudprotect-tray\nHidden=true\n"
	entryGnome  = "[Desktop Entry]\nExec=cloudprotect-tray\nX-GNOME-Autostart-enabled=false\n"
	entryOther  = "[Desktop Entry]\nExec=cloudprotect-tray\n[Desktop Action x]\nHidden=true\n"
)

func newAutostart(t *testing.T, user, system string) Autostart {
	t.Helper()
	dir := t.TempDir()
	a := Autostart{
		ConfigHome: filepath.Join(dir, "home"),
		ConfigDirs: []string{filepath.Join(dir, "xdg1"), filepath.Join(dir, "xdg2")},
		Exec:       "/usr/bin/cloudprotect-tray",
	}
	put := func(path, content string) {
		if content == "" {
			return
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	put(a.UserFile(), user)
	put(filepath.Join(a.ConfigDirs[1], "autostart", AutostartName), system)
	return a
}

func TestAutostartEnabled(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, user, system string
		want               bool
	}{
		{"nothing", "", "", false},
		{"user entry", entryOn, "", true},
		{"system entry", "", entryOn, true},
		{"system entry hidden", "", entryHidden, false},
		{"user hides system entry", entryHidden, entryOn, false},
		{"user enables hidden system entry", entryOn, entryHidden, true},
		{"gnome disabled", entryGnome, "", false},
		{"hidden outside the entry group", entryOther, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			a := newAutostart(t, tt.user, tt.system)
			got, err := a.Enabled()
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("Enabled = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestAutostartSet(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, user, system string
		on                 bool
		wantUser           string // "" means no user file; otherwise a substring
	}{
		{"turn on", "", "", true, "Exec=/usr/bin/cloudprotect-tray"},
		{"turn off", entryOn, "", false, ""},
		{"turn off over system entry", "", entryOn, false, "Hidden=true"},
		{"turn on over system entry", entryHidden, entryOn, true, ""},
		{"turn on over hidden system entry", "", entryHidden, true, "X-GNOME-Autostart-enabled=true"},
		{"turn off over hidden system entry", entryOn, entryHidden, false, ""},
		{"on when already on", entryOn, "", true, "Exec=/usr/bin/cloudprotect-tray"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			a := newAutostart(t, tt.user, tt.system)
			if err := a.Set(tt.on); err != nil {
				t.Fatal(err)
			}
			got, err := a.Enabled()
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.on {
				t.Errorf("after Set(%v), Enabled = %v", tt.on, got)
			}
			b, err := os.ReadFile(a.UserFile())
			switch {
			case tt.wantUser == "" && err == nil:
				t.Errorf("user file left behind:\n%s", b)
			case tt.wantUser != "" && err != nil:
				t.Errorf("no user file: %v", err)
			case tt.wantUser != "" && !strings.Contains(string(b), tt.wantUser):
				t.Errorf("user file lacks %q:\n%s", tt.wantUser, b)
			}
			left, _ := filepath.Glob(filepath.Join(filepath.Dir(a.UserFile()), ".*"))
			if len(left) > 0 {
				t.Errorf("temporary files left: %v", left)
			}
		})
	}
}

func TestAutostartFromEnv(t *testing.T) {
	t.Setenv("XDG_CONFIG_HOME", "/h/cfg")
	t.Setenv("XDG_CONFIG_DIRS", "/a:relative:/b")
	a, err := AutostartFromEnv("x")
	if err != nil {
		t.Fatal(err)
	}
	if a.UserFile() != "/h/cfg/autostart/cloudprotect-tray.desktop" || strings.Join(a.ConfigDirs, ":") != "/a:/b" {
		t.Errorf("got %+v", a)
	}
	t.Setenv("XDG_CONFIG_DIRS", "")
	a, _ = AutostartFromEnv("x")
	if strings.Join(a.ConfigDirs, ":") != "/etc/xdg" {
		t.Errorf("default config dirs %v", a.ConfigDirs)
	}
}
