package setup

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/testenv"
	"github.com/cloudprotect/cloudprotect/dist"
)

func TestDebVersion(t *testing.T) {
	t.Parallel()
	tests := []struct{ name, describe, want string }{
		{"release tag", "v1.2.0", "1.2.0-1"},
		{"after a tag", "v1.2.0-3-gabc1234", "1.2.0+git3.gabc1234-1"},
		{"after a tag, dirty", "v1.2.0-3-gabc1234-dirty", "1.2.0+git3.gabc1234.dirty-1"},
		{"no tag yet", "abc1234", "0~gitabc1234-1"},
		{"no tag, dirty", "abc1234-dirty", "0~gitabc1234.dirty-1"},
		{"empty", "", "0-1"},
		{"odd characters", "v1.0_rc1", "1.0.rc1-1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := DebVersion(tt.describe)
			if got != tt.want {
				t.Errorf("DebVersion(%q) = %q, want %q", tt.describe, got, tt.want)
			}
			if !debVersionOK.MatchString(got) {
				t.Errorf("%q is not accepted by StageDeb", got)
			}
		})
	}
	// Builds after a tag sort after it and before the next one.
	if _, err := exec.LookPath("dpkg"); err == nil {
		for _, pair := range [][2]string{{"v1.2.0", "v1.2.0-3-gabc1234"}, {"abc1234", "v0.1.0"}, {"v1.2.0-3-gabc1234", "v1.2.1"}} {
			a, b := DebVersion(pair[0]), DebVersion(pair[1])
			if err := exec.Command("dpkg", "--compare-versions", a, "lt", b).Run(); err != nil {
				t.Errorf("%s does not sort before %s", a, b)
			}
		}
	}
}

// Every Go module linked into the programs is named in the copyright file.
func TestCopyrightNamesEveryModule(t *testing.T) {
	t.Parallel()
	gobin := testenv.NeedCommand(t, "go", "golang")
	out, err := exec.Command(gobin, "list", "-deps", "-f", "{{with .Module}}{{.Path}}{{end}}",
		"../../cloudprotectd", "..", "../../cloudprotect-tray").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	copyright, err := dist.FS.ReadFile("debian/copyright")
	if err != nil {
		t.Fatal(err)
	}
	for _, mod := range slices.Compact(slices.Sorted(slices.Values(strings.Fields(string(out))))) {
		if mod == "github.com/cloudprotect/cloudprotect" {
			continue
		}
		mod = regexp.MustCompile(`/v[0-9]+$`).ReplaceAllString(mod, "")
		if !bytes.Contains(copyright, []byte("\nFiles: "+mod+"/*\n")) {
			t.Errorf("module %s is linked into the programs but not named in dist/debian/copyright", mod)
		}
	}
}

// buildPrograms builds the real programs as `make deb` does.
func buildPrograms(t *testing.T) string {
	t.Helper()
	gobin := testenv.NeedCommand(t, "go", "golang")
	dir := t.TempDir()
	cmd := exec.Command(gobin, "build", "-trimpath", "-buildmode=pie", "-ldflags", "-s -w", "-o", dir+"/",
		"../../cloudprotectd", "..", "../../cloudprotect-tray")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the programs: %v\n%s", err, out)
	}
	return dir
}

func TestDebPackage(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("builds the programs and the package: not in -short")
	}
	dpkgDeb := testenv.NeedCommand(t, "dpkg-deb", "dpkg")
	lintian := testenv.NeedCommand(t, "lintian", "lintian")
	bin := buildPrograms(t)
	opts := DebOptions{BinDir: bin, Version: "1.2.3-1", Arch: DebArch(runtime.GOARCH),
		Date: time.Date(2026, 11, 28, 10, 0, 0, 0, time.UTC)}
	out := t.TempDir()
	deb, err := BuildDeb(context.Background(), opts, out)
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Base(deb) != "cloudprotect_1.2.3-1_"+opts.Arch+".deb" {
		t.Errorf("package file %s", deb)
	}

	t.Run("content", func(t *testing.T) {
		list, err := exec.Command(dpkgDeb, "--contents", deb).Output()
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]string{}
		for _, line := range strings.Split(strings.TrimSpace(string(list)), "\n") {
			f := strings.Fields(line)
			if len(f) < 6 {
				t.Fatalf("odd line %q", line)
			}
			if f[1] != "root/root" {
				t.Errorf("%s is owned by %s, want root/root", f[5], f[1])
			}
			got[strings.TrimPrefix(f[5], ".")] = f[0]
		}
		want := map[string]string{}
		for p, mode := range wantFiles("/usr", "/lib/systemd/system") {
			want[p] = "-" + mode.Perm().String()[1:]
		}
		want["/usr/share/doc/cloudprotect/changelog.Debian.gz"] = "-rw-r--r--"
		want["/usr/share/lintian/overrides/cloudprotect"] = "-rw-r--r--"
		for p, mode := range got {
			if strings.HasSuffix(p, "/") {
				if mode != "drwxr-xr-x" {
					t.Errorf("folder %s is %s", p, mode)
				}
				continue
			}
			switch wm, ok := want[p]; {
			case !ok:
				t.Errorf("unexpected %s in the package", p)
			case mode != wm:
				t.Errorf("%s is %s, want %s", p, mode, wm)
			}
		}
		for p := range want {
			if _, ok := got[p]; !ok {
				t.Errorf("%s missing from the package", p)
			}
		}
	})

	t.Run("control", func(t *testing.T) {
		dir := t.TempDir()
		if out, err := exec.Command(dpkgDeb, "--control", deb, dir).CombinedOutput(); err != nil {
			t.Fatalf("%v %s", err, out)
		}
		control, _ := os.ReadFile(filepath.Join(dir, "control"))
		for _, field := range []string{"Package: cloudprotect", "Version: 1.2.3-1", "Architecture: " + opts.Arch, "Maintainer: "} {
			if !bytes.Contains(control, []byte("\n"+field)) && !bytes.HasPrefix(control, []byte(field)) {
				t.Errorf("control lacks %q:\n%s", field, control)
			}
		}
		conffiles, _ := os.ReadFile(filepath.Join(dir, "conffiles"))
		if want := AutostartPath + "\n" + PolicyExamplePath + "\n"; !sameLines(string(conffiles), want) {
			t.Errorf("conffiles %q, want %q", conffiles, want)
		}
		for _, script := range []string{"postinst", "prerm", "postrm"} {
			p := filepath.Join(dir, script)
			if out, err := exec.Command("sh", "-n", p).CombinedOutput(); err != nil {
				t.Errorf("%s: %v %s", script, err, out)
			}
			b, _ := os.ReadFile(p)
			// Participation is the person's: no script records it.
			for _, word := range []string{"consent.json", "cloudprotect participate", "cloudprotect install",
				"--participate", "/v1/participation", "cloudprotectd.sock"} {
				if bytes.Contains(b, []byte(word)) {
					t.Errorf("%s has %q: maintainer scripts never decide about participation", script, word)
				}
			}
		}
		postinst, _ := os.ReadFile(filepath.Join(dir, "postinst"))
		if !bytes.Contains(postinst, []byte("deb-systemd-helper enable")) || regexp.MustCompile(`(?m)^\s*\S*cloudprotect\s`).Match(postinst) {
			t.Errorf("postinst should enable the service and run no cloudprotect command:\n%s", postinst)
		}
		postrm, _ := os.ReadFile(filepath.Join(dir, "postrm"))
		if !bytes.Contains(postrm, []byte("rm -rf /var/lib/cloudprotect")) {
			t.Errorf("postrm purge does not remove the state:\n%s", postrm)
		}
	})

	t.Run("lintian", func(t *testing.T) {
		cmd := exec.Command(lintian, "--fail-on", "error", "--tag-display-limit", "0", deb)
		out, err := cmd.CombinedOutput()
		t.Logf("lintian:\n%s", out)
		if err != nil || regexp.MustCompile(`(?m)^E: `).Match(out) {
			t.Errorf("lintian found errors: %v", err)
		}
	})
}

func sameLines(a, b string) bool {
	x, y := strings.Fields(a), strings.Fields(b)
	slices.Sort(x)
	slices.Sort(y)
	return slices.Equal(x, y)
}

// The maintainer scripts enable the service through deb-systemd-helper,
// which works without a running systemd, and say what they could not start.
// (postrm purge deletes /var/lib/cloudprotect, so it is not run here.)
func TestMaintainerScripts(t *testing.T) {
	t.Parallel()
	if _, err := os.Stat("/run/systemd/system"); err == nil {
		t.Skip("systemd runs here: the scripts would start and stop the real service")
	}
	tests := []struct {
		script    string
		args      []string
		wantCalls string
		wantOut   string
	}{
		{"postinst", []string{"configure"}, "deb-systemd-helper unmask cloudprotectd.service\n" +
			"deb-systemd-helper --quiet was-enabled cloudprotectd.service\n" +
			"deb-systemd-helper enable cloudprotectd.service\n", "systemd is not running here, so cloudprotectd was not started"},
		{"postinst", []string{"configure", "1.0-1"}, "deb-systemd-helper unmask cloudprotectd.service\n" +
			"deb-systemd-helper --quiet was-enabled cloudprotectd.service\n" +
			"deb-systemd-helper enable cloudprotectd.service\n", ""},
		{"postinst", []string{"triggered"}, "", ""},
		{"prerm", []string{"remove"}, "", ""},
		{"prerm", []string{"upgrade", "1.1-1"}, "", ""},
		{"postrm", []string{"remove"}, "deb-systemd-helper mask cloudprotectd.service\n", ""},
	}
	for _, tt := range tests {
		t.Run(tt.script+" "+strings.Join(tt.args, " "), func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			log := filepath.Join(dir, "calls")
			for _, helper := range []string{"deb-systemd-helper", "deb-systemd-invoke", "systemctl"} {
				fake := "#!/bin/sh\necho " + helper + " \"$@\" >>" + log + "\n"
				if err := os.WriteFile(filepath.Join(dir, helper), []byte(fake), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			script, err := dist.FS.ReadFile("debian/" + tt.script)
			if err != nil {
				t.Fatal(err)
			}
			p := filepath.Join(dir, tt.script)
			os.WriteFile(p, script, 0o755)
			cmd := exec.Command(p, tt.args...)
			cmd.Env = append(os.Environ(), "PATH="+dir+":/usr/bin:/bin")
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			calls, _ := os.ReadFile(log)
			if string(calls) != tt.wantCalls {
				t.Errorf("calls:\n%s\nwant:\n%s", calls, tt.wantCalls)
			}
			if !strings.Contains(string(out), tt.wantOut) {
				t.Errorf("output %q lacks %q", out, tt.wantOut)
			}
		})
	}
}

// The package refuses to install over a copy that `cloudprotect install`
// put in place, saying how to remove it; an administrator's copy of the
// package's own unit does not stop it.
func TestPreinstRefusesAnInstalledCopy(t *testing.T) {
	t.Parallel()
	script, err := dist.FS.ReadFile("debian/preinst")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, unit, exec string
		wantErr          bool
	}{
		{"nothing there", "", "", false},
		{"cloudprotect install in /usr/local", "/usr/local/lib/systemd/system", "/usr/local/bin/cloudprotectd", true},
		{"cloudprotect install in /opt", "/etc/systemd/system", "/opt/cp/bin/cloudprotectd", true},
		{"the administrator's copy of the package's unit", "/etc/systemd/system", "/usr/bin/cloudprotectd", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			root := t.TempDir()
			if tt.unit != "" {
				dir := filepath.Join(root, tt.unit)
				os.MkdirAll(dir, 0o755)
				unit := "[Service]\nExecStart=" + tt.exec + " --flag\n"
				if err := os.WriteFile(filepath.Join(dir, UnitName), []byte(unit), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			p := filepath.Join(t.TempDir(), "preinst")
			os.WriteFile(p, script, 0o755)
			cmd := exec.Command(p, "install")
			cmd.Env = append(os.Environ(), "DPKG_ROOT="+root)
			out, err := cmd.CombinedOutput()
			if (err != nil) != tt.wantErr {
				t.Fatalf("preinst install: %v\n%s", err, out)
			}
			if tt.wantErr && !strings.Contains(string(out), "sudo "+strings.TrimSuffix(tt.exec, "d")+" uninstall") {
				t.Errorf("message does not say how to remove the copy:\n%s", out)
			}
		})
	}
}
