// Package setup puts cloudprotect on a computer and takes it off again: the
// programs, the agent's systemd unit, the tray's autostart entry, the
// icons, the desktop entry, the example policy and the manual pages, all
// rendered from the files in package dist. `cloudprotect install` and
// `cloudprotect uninstall` use it, and so does the Debian package, whose
// tree is staged by the same code.
//
// Installing compares each file with what is already there and writes only
// what differs, so a second run changes nothing. Participation in the
// Security Network is recorded only when the caller passes a decision; the
// agent owns the consent record, so it is asked first, and the record is
// written through package consent only when no agent answers.
package setup

import (
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"image/png"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"text/template"

	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/dist"
	"github.com/cloudprotect/cloudprotect/icons"
)

// Programs are the commands installed, in the order they are listed.
var Programs = []string{"cloudprotectd", "cloudprotect", "cloudprotect-tray"}

// Fixed places, the same whatever the prefix.
const (
	// AutostartPath starts the tray at every user's login.
	AutostartPath = "/etc/xdg/autostart/cloudprotect-tray.desktop"
	// PolicyExamplePath is the example beside the administrator's policy.
	PolicyExamplePath = "/etc/cloudprotect/policy.json.example"
	// PolicyDir holds the administrator's policy.
	PolicyDir = "/etc/cloudprotect"
	// StateDir is the system agent's state: consent record and queue.
	StateDir = "/var/lib/cloudprotect"
	// UnitName is the agent's systemd unit.
	UnitName = "cloudprotectd.service"
	// IconName is the application icon's name in the icon theme.
	IconName = "cloudprotect"
)

// Layout says where an installation goes.
type Layout struct {
	// Root is the folder the installation's absolute paths are under: "/"
	// for the running system, or a staging folder for packaging and tests.
	Root string
	// Prefix holds the programs, icons, desktop entry, documentation and
	// manual pages: /usr/local for `cloudprotect install`, /usr for the
	// package.
	Prefix string
}

// DefaultPrefix is where `cloudprotect install` puts its files.
const DefaultPrefix = "/usr/local"

// Check cleans the layout and reports a mistake in it.
func (l *Layout) Check() error {
	if l.Root == "" {
		l.Root = "/"
	}
	if l.Prefix == "" {
		l.Prefix = DefaultPrefix
	}
	if !filepath.IsAbs(l.Root) {
		abs, err := filepath.Abs(l.Root)
		if err != nil {
			return fmt.Errorf("resolve root: %w", err)
		}
		l.Root = abs
	}
	l.Root = filepath.Clean(l.Root)
	if !path.IsAbs(l.Prefix) {
		return &PrefixError{Prefix: l.Prefix}
	}
	l.Prefix = path.Clean(l.Prefix)
	if l.Prefix == "/" {
		return &PrefixError{Prefix: l.Prefix}
	}
	return nil
}

// Staging reports whether the layout installs somewhere other than the
// running system.
func (l Layout) Staging() bool { return l.Root != "/" }

// BinDir is where the programs go.
func (l Layout) BinDir() string { return path.Join(l.Prefix, "bin") }

// UnitDir is where the systemd unit goes: the vendor folder for /usr
// (/lib/systemd/system), the local one for /usr/local, and the
// administrator's /etc/systemd/system for any other prefix, since systemd
// looks nowhere else.
func (l Layout) UnitDir() string {
	switch l.Prefix {
	case "/usr":
		return "/lib/systemd/system"
	case "/usr/local":
		return "/usr/local/lib/systemd/system"
	}
	return "/etc/systemd/system"
}

// UnitPath is the systemd unit's path.
func (l Layout) UnitPath() string { return path.Join(l.UnitDir(), UnitName) }

// DocDir is where the documentation goes.
func (l Layout) DocDir() string { return path.Join(l.Prefix, "share", "doc", "cloudprotect") }

// OnDisk returns where the installation path p is under the root.
func (l Layout) OnDisk(p string) string { return filepath.Join(l.Root, filepath.FromSlash(p)) }

// File is one file of an installation.
type File struct {
	// Path is where it goes, absolute, without the root.
	Path string
	// Mode is its permission bits.
	Mode fs.FileMode
	// Conffile marks a file under /etc that a package must list as a
	// conffile.
	Conffile bool
	// data returns the content.
	data func() ([]byte, error)
}

// Data returns the file's content.
func (f File) Data() ([]byte, error) { return f.data() }

func bytesFile(p string, mode fs.FileMode, b []byte) File {
	return File{Path: p, Mode: mode, Conffile: strings.HasPrefix(p, "/etc/"), data: func() ([]byte, error) { return b, nil }}
}

// Manifest lists every file of an installation with layout l, the programs
// taken from binDir. It reads nothing from binDir: a missing program is
// reported when its content is needed (see CheckPrograms).
func Manifest(l Layout, binDir string) ([]File, error) {
	vars := struct{ BinDir string }{BinDir: l.BinDir()}
	var files []File
	for _, name := range Programs {
		src := filepath.Join(binDir, name)
		files = append(files, File{Path: path.Join(l.BinDir(), name), Mode: 0o755,
			data: func() ([]byte, error) { return os.ReadFile(src) }})
	}
	for _, t := range []struct{ src, dst string }{
		{"systemd/" + UnitName, l.UnitPath()},
		{"xdg/cloudprotect-tray.desktop", AutostartPath},
		{"applications/cloudprotect.desktop", path.Join(l.Prefix, "share", "applications", "cloudprotect.desktop")},
	} {
		b, err := render(t.src, vars)
		if err != nil {
			return nil, err
		}
		files = append(files, bytesFile(t.dst, 0o644, b))
	}
	example, err := dist.FS.ReadFile("policy/policy.json.example")
	if err != nil {
		return nil, fmt.Errorf("read example policy: %w", err)
	}
	files = append(files, bytesFile(PolicyExamplePath, 0o644, example))

	iconFiles, err := iconManifest(l)
	if err != nil {
		return nil, err
	}
	files = append(files, iconFiles...)

	for _, m := range []struct{ name, section string }{
		{"cloudprotect.1", "1"}, {"cloudprotectd.8", "8"}, {"cloudprotect-tray.1", "1"},
	} {
		b, err := dist.FS.ReadFile("man/" + m.name)
		if err != nil {
			return nil, fmt.Errorf("read manual page: %w", err)
		}
		gz, err := Gzip(b)
		if err != nil {
			return nil, err
		}
		files = append(files, bytesFile(path.Join(l.Prefix, "share", "man", "man"+m.section, m.name+".gz"), 0o644, gz))
	}

	copyright, err := dist.FS.ReadFile("debian/copyright")
	if err != nil {
		return nil, fmt.Errorf("read copyright: %w", err)
	}
	files = append(files,
		bytesFile(path.Join(l.DocDir(), "copyright"), 0o644, copyright),
		bytesFile(path.Join(l.DocDir(), "statement.md"), 0o644, []byte(consent.Statement())),
	)
	return files, nil
}

// iconManifest puts the application icon (the "participating" cloud) and
// every status icon into the hicolor theme, at each size the icons package
// has, plus the scalable drawings.
func iconManifest(l Layout) ([]File, error) {
	theme := path.Join(l.Prefix, "share", "icons", "hicolor")
	var files []File
	add := func(dir, name string, b []byte) {
		files = append(files, bytesFile(path.Join(theme, dir, name), 0o644, b))
	}
	for _, size := range icons.Sizes {
		dir := fmt.Sprintf("%dx%d", size, size)
		for _, st := range icons.States {
			b := icons.PNG(st, size)
			if b == nil {
				continue
			}
			cfg, err := png.DecodeConfig(bytes.NewReader(b))
			if err != nil {
				return nil, fmt.Errorf("read icon %s at %d pixels: %w", st, size, err)
			}
			if cfg.Width != size || cfg.Height != size {
				continue // not drawn at this size: the theme scales another
			}
			if st == icons.Participating {
				add(dir+"/apps", IconName+".png", b)
			}
			add(dir+"/status", IconName+"-"+string(st)+".png", b)
		}
	}
	for _, st := range icons.States {
		b := icons.SVG(st)
		if b == nil {
			continue
		}
		if st == icons.Participating {
			add("scalable/apps", IconName+".svg", b)
		}
		add("scalable/status", IconName+"-"+string(st)+".svg", b)
	}
	if len(files) == 0 {
		return nil, errors.New("no icons to install: the icons package holds no images")
	}
	return files, nil
}

func render(name string, data any) ([]byte, error) {
	src, err := dist.FS.ReadFile(name)
	if err != nil {
		return nil, fmt.Errorf("read template %s: %w", name, err)
	}
	t, err := template.New(name).Option("missingkey=error").Parse(string(src))
	if err != nil {
		return nil, fmt.Errorf("parse template %s: %w", name, err)
	}
	var b bytes.Buffer
	if err := t.Execute(&b, data); err != nil {
		return nil, fmt.Errorf("render template %s: %w", name, err)
	}
	return b.Bytes(), nil
}

// Gzip compresses b as manual pages and changelogs are: at the best
// compression, with no name or time in the header, so the same input
// always gives the same bytes.
func Gzip(b []byte) ([]byte, error) {
	var out bytes.Buffer
	w, err := gzip.NewWriterLevel(&out, gzip.BestCompression)
	if err != nil {
		return nil, err
	}
	if _, err := w.Write(b); err != nil {
		return nil, fmt.Errorf("compress: %w", err)
	}
	if err := w.Close(); err != nil {
		return nil, fmt.Errorf("compress: %w", err)
	}
	return out.Bytes(), nil
}

// CheckPrograms reports the programs missing from binDir.
func CheckPrograms(binDir string) error {
	if missing := MissingPrograms(binDir); len(missing) > 0 {
		return fmt.Errorf("%s not found in %s", strings.Join(missing, ", "), binDir)
	}
	return nil
}

// MissingPrograms lists the programs that are not in binDir.
func MissingPrograms(binDir string) []string {
	var missing []string
	for _, name := range Programs {
		fi, err := os.Stat(filepath.Join(binDir, name))
		if err != nil || !fi.Mode().IsRegular() {
			missing = append(missing, name)
		}
	}
	return missing
}

// PrefixError is a prefix that cannot be installed to: not absolute, or /.
type PrefixError struct{ Prefix string }

func (e *PrefixError) Error() string {
	if e.Prefix == "/" {
		return "the prefix cannot be / itself: use /usr or /usr/local"
	}
	return fmt.Sprintf("the prefix %q is not an absolute path", e.Prefix)
}
