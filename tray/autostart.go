package tray

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// AutostartName is the file name of the tray's XDG autostart entry.
const AutostartName = "cloudprotect-tray.desktop"

// Autostart reads and writes the tray's XDG autostart entry.
//
// The entry the session uses is the first of
// ConfigHome/autostart/NAME.desktop and DIR/autostart/NAME.desktop for each
// of ConfigDirs; it starts the tray unless it says Hidden=true or
// X-GNOME-Autostart-enabled=false. Turning autostart on or off therefore
// writes or removes the user's file, overriding a system entry with
// Hidden=true when one would otherwise start the tray.
type Autostart struct {
	ConfigHome string   // $XDG_CONFIG_HOME, or ~/.config
	ConfigDirs []string // $XDG_CONFIG_DIRS, or /etc/xdg
	Exec       string   // the command line the entry runs
}

// AutostartFromEnv returns the autostart entry of the current user, from
// $XDG_CONFIG_HOME and $XDG_CONFIG_DIRS, running exec.
func AutostartFromEnv(exec string) (Autostart, error) {
	a := Autostart{Exec: exec, ConfigHome: os.Getenv("XDG_CONFIG_HOME")}
	if a.ConfigHome == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return a, fmt.Errorf("find autostart folder: %w", err)
		}
		a.ConfigHome = filepath.Join(home, ".config")
	}
	for _, d := range filepath.SplitList(os.Getenv("XDG_CONFIG_DIRS")) {
		if filepath.IsAbs(d) {
			a.ConfigDirs = append(a.ConfigDirs, d)
		}
	}
	if len(a.ConfigDirs) == 0 {
		a.ConfigDirs = []string{"/etc/xdg"}
	}
	return a, nil
}

// UserFile is the path of the user's entry.
func (a Autostart) UserFile() string {
	return filepath.Join(a.ConfigHome, "autostart", AutostartName)
}

// Enabled reports whether the session will start the tray at login.
func (a Autostart) Enabled() (bool, error) {
	if a.ConfigHome == "" {
		return false, errors.New("read autostart entry: no configuration folder")
	}
	on, found, err := readEntry(a.UserFile())
	if err != nil || found {
		return on, err
	}
	return a.systemEnabled()
}

// systemEnabled reports whether a system entry starts the tray.
func (a Autostart) systemEnabled() (bool, error) {
	for _, d := range a.ConfigDirs {
		on, found, err := readEntry(filepath.Join(d, "autostart", AutostartName))
		if err != nil || found {
			return on, err
		}
	}
	return false, nil
}

// Set turns starting at login on or off.
func (a Autostart) Set(on bool) error {
	if a.ConfigHome == "" {
		return errors.New("set autostart: no configuration folder")
	}
	sys, err := a.systemEnabled()
	if err != nil {
		return fmt.Errorf("set autostart: %w", err)
	}
	switch {
	case on && sys, !on && !sys:
		// The system entries alone give the wanted state.
		if err := os.Remove(a.UserFile()); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("set autostart: %w", err)
		}
		return nil
	case on:
		return a.write(false)
	default:
		return a.write(true)
	}
}

func (a Autostart) write(hidden bool) error {
	var b strings.Builder
	b.WriteString("[Desktop Entry]\n")
	b.WriteString("Type=Application\n")
	b.WriteString("Name=Cloud protection\n")
	b.WriteString("Name[de]=Cloud-Schutz\n")
	b.WriteString("Name[ru]=Облачная защита\n")
	b.WriteString("Comment=Cloud protection status and Security Network participation\n")
	b.WriteString("Comment[de]=Zustand des Cloud-Schutzes und Teilnahme am Security Network\n")
	b.WriteString("Comment[ru]=Состояние облачной защиты и участие в Security Network\n")
	fmt.Fprintf(&b, "Exec=%s\n", a.Exec)
	b.WriteString("Icon=cloudprotect\n")
	b.WriteString("Terminal=false\n")
	b.WriteString("Categories=Utility;Security;\n")
	if hidden {
		b.WriteString("Hidden=true\n")
	} else {
		b.WriteString("X-GNOME-Autostart-enabled=true\n")
	}
	dir := filepath.Dir(a.UserFile())
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("set autostart: %w", err)
	}
	if err := writeAtomic(a.UserFile(), []byte(b.String())); err != nil {
		return fmt.Errorf("set autostart: %w", err)
	}
	return nil
}

// readEntry reads an autostart entry: found is false when there is no file;
// on is false when the entry is hidden or disabled.
func readEntry(path string) (on, found bool, err error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, false, nil
	}
	if err != nil {
		return false, false, fmt.Errorf("read autostart entry: %w", err)
	}
	defer f.Close()
	on = true
	inEntry := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "[") {
			inEntry = line == "[Desktop Entry]"
			continue
		}
		if !inEntry {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		switch {
		case k == "Hidden" && v == "true":
			on = false
		case k == "X-GNOME-Autostart-enabled" && v == "false":
			on = false
		}
	}
	if err := sc.Err(); err != nil {
		return false, true, fmt.Errorf("read autostart entry: %w", err)
	}
	return on, true, nil
}

// writeAtomic writes a file by writing a temporary file beside it, syncing
// it and renaming it over the old one.
func writeAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
