package setup

import (
	"context"
	"crypto/md5"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/cloudprotect/cloudprotect/dist"
)

// DebOptions describe a Debian package.
type DebOptions struct {
	// BinDir holds the programs.
	BinDir string
	// Version is the package's Debian version (see DebVersion).
	Version string
	// Arch is the Debian architecture (see DebArch).
	Arch string
	// Maintainer is "Name <address>"; empty uses DefaultMaintainer.
	Maintainer string
	// Date is the changelog entry's date; zero means now.
	Date time.Time
}

// DefaultMaintainer signs packages built without a maintainer.
const DefaultMaintainer = "cloudprotect developers <cloudprotect@users.noreply.github.com>"

// PackageName is the Debian package's name.
const PackageName = "cloudprotect"

// DebFileName is the package file's conventional name.
func (o DebOptions) DebFileName() string {
	return fmt.Sprintf("%s_%s_%s.deb", PackageName, o.Version, o.Arch)
}

var debVersionOK = regexp.MustCompile(`^[0-9][A-Za-z0-9.+~]*-[A-Za-z0-9.+~]+$`)

// DebVersion turns a version as `git describe --tags --always --dirty`
// prints it into a Debian version: "v1.2.0" becomes "1.2.0-1",
// "v1.2.0-3-gabc1234" "1.2.0+git3.gabc1234-1", and a bare commit
// "abc1234-dirty" "0~gitabc1234.dirty-1", so that tagged releases sort
// after the builds that preceded them.
func DebVersion(describe string) string {
	v := strings.TrimPrefix(strings.TrimSpace(describe), "v")
	if v == "" {
		v = "0"
	}
	clean := func(s string) string {
		return strings.Map(func(r rune) rune {
			switch {
			case r >= '0' && r <= '9', r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r == '.', r == '+', r == '~':
				return r
			}
			return '.'
		}, s)
	}
	var up string
	if v[0] >= '0' && v[0] <= '9' {
		base, rest, found := strings.Cut(v, "-")
		up = clean(base)
		if found {
			up += "+git" + clean(rest)
		}
	} else {
		up = "0~git" + clean(v)
	}
	return up + "-1"
}

// DebArch maps a Go architecture to Debian's name for it.
func DebArch(goarch string) string {
	switch goarch {
	case "386":
		return "i386"
	case "arm":
		return "armhf"
	case "ppc64le":
		return "ppc64el"
	case "mips64le":
		return "mips64el"
	case "mipsle":
		return "mipsel"
	}
	return goarch
}

// StageDeb builds the package's tree in stage: the installation with
// prefix /usr, the changelog, and DEBIAN/ with control, conffiles,
// md5sums and the maintainer scripts. The maintainer scripts enable and
// start the service but never decide about participation.
func StageDeb(stage string, o DebOptions) error {
	if !debVersionOK.MatchString(o.Version) {
		return fmt.Errorf("stage package: version %q is not a Debian version with a revision (such as 1.2.0-1)", o.Version)
	}
	if o.Arch == "" {
		return fmt.Errorf("stage package: no architecture")
	}
	if o.Maintainer == "" {
		o.Maintainer = DefaultMaintainer
	}
	if o.Date.IsZero() {
		o.Date = time.Now()
	}
	l := Layout{Root: stage, Prefix: "/usr"}
	if err := l.Check(); err != nil {
		return err
	}
	if _, err := Install(context.Background(), InstallOptions{Layout: l, BinDir: o.BinDir, ForPackage: true}); err != nil {
		return fmt.Errorf("stage package: %w", err)
	}
	files, err := Manifest(l, o.BinDir)
	if err != nil {
		return err
	}

	changelog, err := render("debian/changelog", map[string]string{
		"Version": o.Version, "Maintainer": o.Maintainer, "Date": o.Date.Format(time.RFC1123Z),
	})
	if err != nil {
		return err
	}
	gz, err := Gzip(changelog)
	if err != nil {
		return err
	}
	overrides, err := dist.FS.ReadFile("lintian/" + PackageName)
	if err != nil {
		return fmt.Errorf("stage package: %w", err)
	}
	extra := []File{
		bytesFile(path.Join(l.DocDir(), "changelog.Debian.gz"), 0o644, gz),
		bytesFile(path.Join("/usr/share/lintian/overrides", PackageName), 0o644, overrides),
	}
	for _, f := range extra {
		if _, err := mkdirs(stage, path.Dir(f.Path)); err != nil {
			return err
		}
	}
	if _, err := Apply(stage, extra); err != nil {
		return fmt.Errorf("stage package: %w", err)
	}
	files = append(files, extra...)
	depends, err := libcDepends(o.BinDir)
	if err != nil {
		return fmt.Errorf("stage package: %w", err)
	}

	control := filepath.Join(stage, "DEBIAN")
	if _, err := mkdirs(stage, "/DEBIAN"); err != nil {
		return err
	}
	var size int64
	var conffiles, sums strings.Builder
	sort.Slice(files, func(i, j int) bool { return files[i].Path < files[j].Path })
	dirs := map[string]bool{}
	for _, f := range files {
		b, err := f.Data()
		if err != nil {
			return fmt.Errorf("stage package: %w", err)
		}
		size += (int64(len(b)) + 1023) / 1024
		for d := path.Dir(f.Path); d != "/"; d = path.Dir(d) {
			dirs[d] = true
		}
		if f.Conffile {
			fmt.Fprintln(&conffiles, f.Path)
		} else {
			fmt.Fprintf(&sums, "%x  %s\n", md5.Sum(b), strings.TrimPrefix(f.Path, "/"))
		}
	}
	size += int64(len(dirs)) // dpkg counts a folder as one KiB
	ctl, err := render("debian/control", map[string]any{
		"Version": o.Version, "Arch": o.Arch, "Maintainer": o.Maintainer, "InstalledSize": size,
		"Depends": depends,
	})
	if err != nil {
		return err
	}
	meta := []File{
		bytesFile("/control", 0o644, ctl),
		bytesFile("/conffiles", 0o644, []byte(conffiles.String())),
		bytesFile("/md5sums", 0o644, []byte(sums.String())),
	}
	for _, s := range []string{"preinst", "postinst", "prerm", "postrm"} {
		b, err := dist.FS.ReadFile("debian/" + s)
		if err != nil {
			return fmt.Errorf("stage package: %w", err)
		}
		meta = append(meta, bytesFile("/"+s, 0o755, b))
	}
	if _, err := Apply(control, meta); err != nil {
		return fmt.Errorf("stage package: %w", err)
	}
	return nil
}

// BuildDeb stages the package in a temporary folder and builds it with
// dpkg-deb into outDir, files owned by root. It returns the package's path.
func BuildDeb(ctx context.Context, o DebOptions, outDir string) (string, error) {
	stage, err := os.MkdirTemp("", "cloudprotect-deb-")
	if err != nil {
		return "", fmt.Errorf("build package: %w", err)
	}
	defer os.RemoveAll(stage)
	root := filepath.Join(stage, "root")
	if err := StageDeb(root, o); err != nil {
		return "", err
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return "", fmt.Errorf("build package: %w", err)
	}
	out := filepath.Join(outDir, o.DebFileName())
	cmd := exec.CommandContext(ctx, "dpkg-deb", "--build", "--root-owner-group", root, out)
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build package: dpkg-deb: %v: %s", err, strings.TrimSpace(string(b)))
	}
	return out, nil
}

// libcDepends returns the dependency on the C library that the programs
// need: the newest GLIBC_ symbol version any of them imports, or "" when
// they are statically linked.
func libcDepends(binDir string) (string, error) {
	var newest []int
	for _, name := range Programs {
		f, err := elf.Open(filepath.Join(binDir, name))
		if err != nil {
			return "", fmt.Errorf("read %s: %w", name, err)
		}
		syms, err := f.DynamicSymbols()
		f.Close()
		if err != nil {
			continue // no dynamic symbols: statically linked
		}
		for _, s := range syms {
			v, ok := strings.CutPrefix(s.Version, "GLIBC_")
			if !ok {
				continue
			}
			if n := versionParts(v); n != nil && slices.Compare(n, newest) > 0 {
				newest = n
			}
		}
	}
	if newest == nil {
		return "", nil
	}
	parts := make([]string, len(newest))
	for i, n := range newest {
		parts[i] = strconv.Itoa(n)
	}
	return fmt.Sprintf("libc6 (>= %s)", strings.Join(parts, ".")), nil
}

func versionParts(v string) []int {
	var out []int
	for _, p := range strings.Split(v, ".") {
		n, err := strconv.Atoi(p)
		if err != nil {
			return nil
		}
		out = append(out, n)
	}
	return out
}
