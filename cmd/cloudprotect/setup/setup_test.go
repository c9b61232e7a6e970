package setup

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/testenv"
	"github.com/cloudprotect/cloudprotect/icons"
)

// fakePrograms writes stand-ins for the programs into a new folder.
func fakePrograms(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, name := range Programs {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("#!/bin/sh\n# "+name+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// tree lists every file and folder under root with its mode.
func tree(t *testing.T, root string) map[string]fs.FileMode {
	t.Helper()
	out := map[string]fs.FileMode{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		out["/"+filepath.ToSlash(rel)] = fi.Mode()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// wantFiles is every file an installation with prefix holds, with its mode.
func wantFiles(prefix, unitDir string) map[string]fs.FileMode {
	want := map[string]fs.FileMode{
		prefix + "/bin/cloudprotectd":                                  0o755,
		prefix + "/bin/cloudprotect":                                   0o755,
		prefix + "/bin/cloudprotect-tray":                              0o755,
		unitDir + "/cloudprotectd.service":                             0o644,
		"/etc/xdg/autostart/cloudprotect-tray.desktop":                 0o644,
		"/etc/cloudprotect/policy.json.example":                        0o644,
		prefix + "/share/applications/cloudprotect.desktop":            0o644,
		prefix + "/share/man/man1/cloudprotect.1.gz":                   0o644,
		prefix + "/share/man/man1/cloudprotect-tray.1.gz":              0o644,
		prefix + "/share/man/man8/cloudprotectd.8.gz":                  0o644,
		prefix + "/share/doc/cloudprotect/copyright":                   0o644,
		prefix + "/share/doc/cloudprotect/statement.md":                0o644,
		prefix + "/share/icons/hicolor/scalable/apps/cloudprotect.svg": 0o644,
	}
	for _, size := range icons.Sizes {
		dir := fmt.Sprintf("%s/share/icons/hicolor/%dx%d", prefix, size, size)
		want[dir+"/apps/cloudprotect.png"] = 0o644
		for _, st := range icons.States {
			want[fmt.Sprintf("%s/status/cloudprotect-%s.png", dir, st)] = 0o644
		}
	}
	for _, st := range icons.States {
		want[fmt.Sprintf("%s/share/icons/hicolor/scalable/status/cloudprotect-%s.svg", prefix, st)] = 0o644
	}
	return want
}

func TestInstallPutsEveryFileInPlace(t *testing.T) {
	t.Parallel()
	bin := fakePrograms(t)
	tests := []struct {
		name, prefix, unitDir string
	}{
		{"local prefix", "/usr/local", "/usr/local/lib/systemd/system"},
		{"package prefix", "/usr", "/lib/systemd/system"},
		{"other prefix", "/opt/cloudprotect", "/etc/systemd/system"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			root := t.TempDir()
			l := Layout{Root: root, Prefix: tt.prefix}
			res, err := Install(context.Background(), InstallOptions{Layout: l, BinDir: bin})
			if err != nil {
				t.Fatal(err)
			}
			want := wantFiles(tt.prefix, tt.unitDir)
			want[(Layout{Prefix: tt.prefix}).FoldersRecord()] = 0o644
			got := tree(t, root)
			for p, mode := range got {
				if mode.IsDir() {
					if mode.Perm() != 0o755 {
						t.Errorf("folder %s has mode %v, want 0755", p, mode.Perm())
					}
					continue
				}
				wm, ok := want[p]
				switch {
				case !ok:
					t.Errorf("unexpected file %s", p)
				case !mode.IsRegular() || mode.Perm() != wm:
					t.Errorf("%s: mode %v, want regular %v", p, mode, wm)
				}
			}
			for p := range want {
				if _, ok := got[p]; !ok {
					t.Errorf("missing %s", p)
				}
			}
			if len(res.Written) != len(want)-1 { // the folders' record is not an installed file
				t.Errorf("wrote %d files, want %d", len(res.Written), len(want)-1)
			}
			if b, _ := os.ReadFile(filepath.Join(root, tt.prefix, "bin", "cloudprotectd")); !bytes.Contains(b, []byte("# cloudprotectd")) {
				t.Errorf("cloudprotectd is not the program from the bin folder: %q", b)
			}
			unit, _ := os.ReadFile(filepath.Join(root, tt.unitDir, UnitName))
			if !bytes.Contains(unit, []byte("\nExecStart="+tt.prefix+"/bin/cloudprotectd\n")) {
				t.Errorf("unit does not run %s/bin/cloudprotectd:\n%s", tt.prefix, unit)
			}
			for _, entry := range []string{AutostartPath, tt.prefix + "/share/applications/cloudprotect.desktop"} {
				b, _ := os.ReadFile(filepath.Join(root, entry))
				if !bytes.Contains(b, []byte("\nExec="+tt.prefix+"/bin/cloudprotect-tray\n")) {
					t.Errorf("%s does not start %s/bin/cloudprotect-tray:\n%s", entry, tt.prefix, b)
				}
			}

			// A second run writes nothing.
			again, err := Install(context.Background(), InstallOptions{Layout: l, BinDir: bin})
			if err != nil || len(again.Written) != 0 {
				t.Fatalf("second install wrote %v (err %v), want nothing", again.Written, err)
			}
		})
	}
}

func TestInstallRepairsOnlyWhatDiffers(t *testing.T) {
	t.Parallel()
	bin := fakePrograms(t)
	root := t.TempDir()
	l := Layout{Root: root, Prefix: "/usr/local"}
	if _, err := Install(context.Background(), InstallOptions{Layout: l, BinDir: bin}); err != nil {
		t.Fatal(err)
	}
	unit := filepath.Join(root, "usr/local/lib/systemd/system", UnitName)
	os.WriteFile(unit, []byte("edited"), 0o644)
	os.Chmod(filepath.Join(root, "usr/local/bin/cloudprotect"), 0o700)
	os.Remove(filepath.Join(root, AutostartPath))
	// A real policy is the administrator's: never touched.
	policy := filepath.Join(root, consent.DefaultPolicyPath)
	os.WriteFile(policy, []byte(`{"participation":"off"}`), 0o600)

	res, err := Install(context.Background(), InstallOptions{Layout: l, BinDir: bin})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(res.Written)
	want := []string{AutostartPath, "/usr/local/bin/cloudprotect", "/usr/local/lib/systemd/system/" + UnitName}
	if !slices.Equal(res.Written, want) {
		t.Errorf("rewrote %v, want %v", res.Written, want)
	}
	if b, _ := os.ReadFile(policy); string(b) != `{"participation":"off"}` {
		t.Errorf("policy changed: %s", b)
	}
}

func TestInstallNeedsThePrograms(t *testing.T) {
	t.Parallel()
	bin := fakePrograms(t)
	os.Remove(filepath.Join(bin, "cloudprotect-tray"))
	root := t.TempDir()
	_, err := Install(context.Background(), InstallOptions{Layout: Layout{Root: root}, BinDir: bin})
	if err == nil || !strings.Contains(err.Error(), "cloudprotect-tray not found") {
		t.Fatalf("err = %v, want the missing program named", err)
	}
	if got := tree(t, root); len(got) != 0 {
		t.Errorf("a failed install left files: %v", got)
	}
}

func TestLayoutCheck(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		l       Layout
		want    Layout
		wantErr string
	}{
		{"defaults", Layout{}, Layout{Root: "/", Prefix: "/usr/local"}, ""},
		{"cleaned", Layout{Root: "/tmp/x/", Prefix: "/usr//"}, Layout{Root: "/tmp/x", Prefix: "/usr"}, ""},
		{"relative prefix", Layout{Prefix: "usr"}, Layout{}, "not an absolute path"},
		{"prefix is root", Layout{Prefix: "/"}, Layout{}, "cannot be /"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := tt.l
			err := l.Check()
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || l != tt.want {
				t.Fatalf("got %+v %v, want %+v", l, err, tt.want)
			}
		})
	}
}

// The unit has the hardening the agent is designed for, and only the
// capabilities its exec source needs.
func TestUnitHardening(t *testing.T) {
	t.Parallel()
	b, err := render("systemd/"+UnitName, struct{ BinDir string }{"/usr/bin"})
	if err != nil {
		t.Fatal(err)
	}
	unit := string(b)
	for _, line := range []string{
		"ExecStart=/usr/bin/cloudprotectd",
		"StateDirectory=cloudprotect",
		"StateDirectoryMode=0700",
		"RuntimeDirectory=cloudprotect",
		"CapabilityBoundingSet=CAP_SYS_ADMIN CAP_DAC_READ_SEARCH CAP_SYS_PTRACE",
		"NoNewPrivileges=yes",
		"ProtectSystem=strict",
		"ProtectHome=read-only",
		"PrivateTmp=yes",
		"ProtectKernelTunables=yes",
		"ProtectKernelModules=yes",
		"ProtectControlGroups=yes",
		"RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
		"SystemCallArchitectures=native",
		"SystemCallFilter=@system-service fanotify_init fanotify_mark",
		"SystemCallFilter=~@resources @swap @reboot @module @raw-io @clock @cpu-emulation @debug @obsolete",
		"PrivateDevices=yes",
		"ProtectProc=invisible",
		"ProcSubset=pid",
		"WantedBy=multi-user.target",
	} {
		if !strings.Contains(unit, "\n"+line+"\n") {
			t.Errorf("unit lacks %q", line)
		}
	}
	// PrivateUsers and ~@privileged break fanotify (checked under a real
	// systemd, see docs/SECURITY.md).
	for _, bad := range []string{"AmbientCapabilities", "User=", "PrivateUsers", "~@privileged"} {
		if strings.Contains(unit, "\n"+bad) {
			t.Errorf("unit sets %s", bad)
		}
	}
}

func TestSystemdAcceptsTheUnit(t *testing.T) {
	t.Parallel()
	analyze := testenv.NeedCommand(t, "systemd-analyze", "systemd")
	bin := fakePrograms(t)
	root := t.TempDir()
	l := Layout{Root: root, Prefix: "/usr/local"}
	if _, err := Install(context.Background(), InstallOptions{Layout: l, BinDir: bin}); err != nil {
		t.Fatal(err)
	}
	unit, err := os.ReadFile(l.OnDisk(l.UnitPath()))
	if err != nil {
		t.Fatal(err)
	}
	// systemd-analyze checks that ExecStart exists on this machine: point
	// it at the staged program.
	staged := bytes.ReplaceAll(unit, []byte("ExecStart=/usr/local/bin/"), []byte("ExecStart="+filepath.Join(root, "usr/local/bin")+"/"))
	dir := t.TempDir()
	path := filepath.Join(dir, UnitName)
	if err := os.WriteFile(path, staged, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", "--man=no", path).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

func TestDesktopEntriesValidate(t *testing.T) {
	t.Parallel()
	validate := testenv.NeedCommand(t, "desktop-file-validate", "desktop-file-utils")
	bin := fakePrograms(t)
	root := t.TempDir()
	l := Layout{Root: root, Prefix: "/usr"}
	if _, err := Install(context.Background(), InstallOptions{Layout: l, BinDir: bin}); err != nil {
		t.Fatal(err)
	}
	for _, entry := range []string{AutostartPath, "/usr/share/applications/cloudprotect.desktop"} {
		t.Run(path.Base(path.Dir(entry)), func(t *testing.T) {
			out, err := exec.Command(validate, l.OnDisk(entry)).CombinedOutput()
			if err != nil || len(bytes.TrimSpace(out)) > 0 {
				t.Errorf("desktop-file-validate %s: %v\n%s", entry, err, out)
			}
		})
	}
}

func TestPolicyExampleIsAValidPolicy(t *testing.T) {
	t.Parallel()
	bin := fakePrograms(t)
	root := t.TempDir()
	l := Layout{Root: root}
	if _, err := Install(context.Background(), InstallOptions{Layout: l, BinDir: bin}); err != nil {
		t.Fatal(err)
	}
	p, err := consent.LoadPolicy(l.OnDisk(PolicyExamplePath))
	if err != nil {
		t.Fatal(err)
	}
	if p.Locked() {
		t.Errorf("the example policy decides for the person: %+v", p)
	}
}

// fakeSystemctl records the systemctl commands run.
type fakeSystemctl struct {
	calls  []string
	active bool
}

func (f *fakeSystemctl) run(_ context.Context, args ...string) error {
	f.calls = append(f.calls, strings.Join(args, " "))
	if args[0] == "is-active" && !f.active {
		return errors.New("inactive")
	}
	return nil
}

func TestServiceStart(t *testing.T) {
	t.Parallel()
	bin := fakePrograms(t)
	tests := []struct {
		name        string
		noSystemd   bool
		start       bool
		active      bool
		installed   bool // the files are already in place
		changeAgent bool // a new cloudprotectd replaces the installed one
		wantCalls   []string
		wantRunning bool
		wantNote    ServiceNote
	}{
		{name: "no systemd: completes and says what it could not start", noSystemd: true, start: true,
			wantNote: NoSystemd},
		{name: "not asked to start", start: false, wantNote: StagedOnly},
		{name: "first install", start: true,
			wantCalls:   []string{"is-active --quiet " + UnitName, "daemon-reload", "enable --now " + UnitName},
			wantRunning: true, wantNote: Started},
		{name: "second run", start: true, active: true, installed: true,
			wantCalls:   []string{"is-active --quiet " + UnitName, "enable --now " + UnitName},
			wantRunning: true, wantNote: AlreadyRunning},
		{name: "upgrade restarts the running agent", start: true, active: true, installed: true, changeAgent: true,
			wantCalls:   []string{"is-active --quiet " + UnitName, "daemon-reload", "enable --now " + UnitName, "restart " + UnitName},
			wantRunning: true, wantNote: Restarted},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			root := t.TempDir()
			l := Layout{Root: root}
			progs := bin
			if tt.installed {
				if _, err := Install(context.Background(), InstallOptions{Layout: l, BinDir: bin}); err != nil {
					t.Fatal(err)
				}
			}
			if tt.changeAgent {
				progs = fakePrograms(t)
				os.WriteFile(filepath.Join(progs, "cloudprotectd"), []byte("new version"), 0o755)
			}
			sd := &fakeSystemctl{active: tt.active}
			dir := t.TempDir() // systemd's runtime folder
			if tt.noSystemd {
				dir = filepath.Join(dir, "absent")
			}
			res, err := Install(context.Background(), InstallOptions{Layout: l, BinDir: progs, Start: tt.start,
				Systemd: Systemd{Dir: dir, Command: sd.run}})
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(sd.calls, tt.wantCalls) {
				t.Errorf("systemctl calls %q, want %q", sd.calls, tt.wantCalls)
			}
			if res.Service.Running != tt.wantRunning || res.Service.What != tt.wantNote {
				t.Errorf("service %+v, want running %v and note %d", res.Service, tt.wantRunning, tt.wantNote)
			}
		})
	}
}

func TestRecordConsentWithoutAgent(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		participate bool
		policy      string
		wantState   consent.State
		wantErr     bool
	}{
		{name: "agrees", participate: true, wantState: consent.Participating},
		{name: "declines", participate: false, wantState: consent.Declined},
		{name: "policy forbids", participate: true, policy: `{"participation":"off"}`, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			l := Layout{Root: t.TempDir()}
			if tt.policy != "" {
				os.MkdirAll(l.OnDisk(PolicyDir), 0o755)
				os.WriteFile(l.OnDisk(consent.DefaultPolicyPath), []byte(tt.policy), 0o644)
			}
			rec, err := RecordConsent(context.Background(), l, tt.participate, 1000)
			if tt.wantErr {
				var le *consent.LockedError
				if !errors.As(err, &le) {
					t.Fatalf("err = %v, want a LockedError", err)
				}
				if _, err := os.Stat(RecordPath(l)); err == nil {
					t.Errorf("a refused decision was recorded")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if rec.Through != ThroughFile || rec.State != tt.wantState {
				t.Errorf("recorded %+v, want %s through the file", rec, tt.wantState)
			}
			got, notice, err := consent.NewStore(RecordPath(l), nil, nil).Load()
			if err != nil || notice != "" {
				t.Fatal(err, notice)
			}
			if got.State != tt.wantState || got.Via != consent.ViaInstall || got.UID != 1000 {
				t.Errorf("record %+v, want %s via install by 1000", got, tt.wantState)
			}
			if fi, err := os.Stat(l.OnDisk(StateDir)); err != nil || fi.Mode().Perm() != 0o700 {
				t.Errorf("state folder: %v %v, want mode 0700", fi, err)
			}
			cur, err := CurrentConsent(context.Background(), l)
			if err != nil || cur.State != tt.wantState || cur.Via != "install" || !cur.Decided() {
				t.Errorf("current %+v %v", cur, err)
			}
		})
	}
}

// With systemd, a decision is recorded after the service starts; when the
// agent does not answer in time the record is written and the service is
// restarted to read it.
func TestInstallRecordsAfterStarting(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	sd := &fakeSystemctl{}
	yes := true
	res, err := Install(context.Background(), InstallOptions{Layout: Layout{Root: root}, BinDir: fakePrograms(t), Start: true,
		Systemd: Systemd{Dir: t.TempDir(), Command: sd.run}, Decision: &yes, AgentWait: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if res.Consent == nil || res.Consent.State != consent.Participating || res.Consent.Through != ThroughFile {
		t.Fatalf("consent %+v", res.Consent)
	}
	if last := sd.calls[len(sd.calls)-1]; last != "try-restart "+UnitName {
		t.Errorf("calls %q, want a restart last", sd.calls)
	}
}

func TestUninstall(t *testing.T) {
	t.Parallel()
	for _, purge := range []bool{false, true} {
		t.Run(fmt.Sprintf("purge=%v", purge), func(t *testing.T) {
			t.Parallel()
			root := t.TempDir()
			l := Layout{Root: root}
			// Folders a system has before: they stay.
			for _, d := range []string{"/usr/local/bin", "/usr/local/share/man", "/etc/xdg"} {
				if err := os.MkdirAll(l.OnDisk(d), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			before := tree(t, root)
			yes := true
			if _, err := Install(context.Background(), InstallOptions{Layout: l, BinDir: fakePrograms(t), Decision: &yes}); err != nil {
				t.Fatal(err)
			}
			os.WriteFile(l.OnDisk(consent.DefaultPolicyPath), []byte(`{}`), 0o644)
			sd := &fakeSystemctl{}
			res, err := Uninstall(context.Background(), UninstallOptions{Layout: l, Stop: true, Purge: purge,
				Systemd: Systemd{Dir: t.TempDir(), Command: sd.run}})
			if err != nil {
				t.Fatal(err)
			}
			if want := []string{"disable --now " + UnitName, "daemon-reload"}; !slices.Equal(sd.calls, want) {
				t.Errorf("systemctl calls %q, want %q", sd.calls, want)
			}
			if len(res.Removed) != len(wantFiles("/usr/local", "")) {
				t.Errorf("removed %d files, want %d", len(res.Removed), len(wantFiles("/usr/local", "")))
			}
			if res.PolicyKept != consent.DefaultPolicyPath || res.Purged != purge {
				t.Errorf("result %+v", res)
			}
			var left []string
			for p, mode := range tree(t, root) {
				if !mode.IsDir() {
					left = append(left, p)
				}
			}
			slices.Sort(left)
			want := []string{consent.DefaultPolicyPath}
			if !purge {
				want = append(want, StateDir+"/consent.json")
			}
			if !slices.Equal(left, want) {
				t.Errorf("left %v, want %v", left, want)
			}
			// The folders install created are gone, those that were there
			// stay, and so do those that still hold something.
			for p, mode := range tree(t, root) {
				_, had := before[p]
				if mode.IsDir() && !had && !strings.HasPrefix(consent.DefaultPolicyPath, p+"/") &&
					!(!purge && strings.HasPrefix(StateDir+"/", p+"/")) {
					t.Errorf("empty folder %s left behind", p)
				}
			}
			for p := range before {
				if _, ok := tree(t, root)[p]; !ok {
					t.Errorf("folder %s, there before, was removed", p)
				}
			}

			// Nothing left to remove: a second run is harmless.
			sd.calls = nil
			again, err := Uninstall(context.Background(), UninstallOptions{Layout: l, Stop: true,
				Systemd: Systemd{Dir: t.TempDir(), Command: sd.run}})
			if err != nil || len(again.Removed) != 0 || len(sd.calls) != 0 {
				t.Errorf("second uninstall: %+v %v, calls %q", again, err, sd.calls)
			}
		})
	}
}

func TestUninstallWithoutSystemd(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	l := Layout{Root: root}
	if _, err := Install(context.Background(), InstallOptions{Layout: l, BinDir: fakePrograms(t)}); err != nil {
		t.Fatal(err)
	}
	res, err := Uninstall(context.Background(), UninstallOptions{Layout: l, Stop: true,
		Systemd: Systemd{Dir: filepath.Join(root, "absent"), Command: func(context.Context, ...string) error {
			t.Error("systemctl run without systemd")
			return nil
		}}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Service.What != NoSystemdStop {
		t.Errorf("service %+v, want NoSystemdStop", res.Service)
	}
}
