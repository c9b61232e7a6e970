package setup

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
)

// Systemd enables, starts, stops and disables the agent's service.
type Systemd struct {
	// Dir exists when systemd is the running init system; empty means
	// /run/systemd/system.
	Dir string
	// Command runs systemctl with args; nil runs the real one.
	Command func(ctx context.Context, args ...string) error
}

// Running reports whether systemd manages this computer.
func (s Systemd) Running() bool {
	dir := s.Dir
	if dir == "" {
		dir = "/run/systemd/system"
	}
	fi, err := os.Stat(dir)
	return err == nil && fi.IsDir()
}

func (s Systemd) run(ctx context.Context, args ...string) error {
	if s.Command != nil {
		return s.Command(ctx, args...)
	}
	out, err := exec.CommandContext(ctx, "systemctl", args...).CombinedOutput()
	if err != nil {
		msg := strings.TrimSpace(string(out))
		if msg == "" {
			msg = err.Error()
		}
		return fmt.Errorf("systemctl %s: %s", strings.Join(args, " "), msg)
	}
	return nil
}

// Outcome says what happened to the service.
type Outcome struct {
	// Running is true when the service was left enabled and running.
	Running bool
	// What was done, or what could not be done; the command line says it
	// in the person's language, with Where (a folder or a program) in it.
	What  ServiceNote
	Where string
}

// ServiceNote is what happened to the service.
type ServiceNote int

// What install and uninstall did with the service.
const (
	StagedOnly     ServiceNote = iota + 1 // installed under a staging root (Where); nothing enabled
	NotStarted                            // --no-start
	NoSystemd                             // systemd does not run here; Where is the agent to start by hand
	Restarted                             // restarted to run the new version
	AlreadyRunning                        // enabled and running already
	Started                               // enabled and started
	NothingStopped                        // uninstall without stopping
	NoSystemdStop                         // systemd does not run here: nothing stopped
	NotInstalled                          // no unit in Where
	Stopped                               // stopped and disabled
)

// InstallOptions configure Install.
type InstallOptions struct {
	Layout Layout
	// BinDir holds the programs to install.
	BinDir string
	// Start enables and starts the service where systemd runs.
	Start   bool
	Systemd Systemd
	// Decision, when set, is the person's answer about participating in
	// the Security Network, recorded with via "install". Nil records
	// nothing: the agent stays undecided and collects nothing.
	Decision *bool
	// UID is who answered.
	UID int
	// AgentWait bounds the wait for a service just started to answer on
	// its socket; zero means 10 seconds.
	AgentWait time.Duration
	// ForPackage stages a Debian package: dpkg keeps track of the
	// folders, so they are not recorded.
	ForPackage bool
}

// InstallResult says what Install did.
type InstallResult struct {
	// Written lists the files written; empty when everything was already
	// installed.
	Written []string
	Service Outcome
	// Consent is what was recorded, when a decision was given.
	Consent *Recorded
}

// Install puts the files in place, then enables and starts the service
// (when asked to and systemd runs), then records the decision, if any:
// through the agent when one answers, else directly in the consent record.
func Install(ctx context.Context, o InstallOptions) (InstallResult, error) {
	var res InstallResult
	if err := o.Layout.Check(); err != nil {
		return res, err
	}
	files, err := Manifest(o.Layout, o.BinDir)
	if err != nil {
		return res, err
	}
	if err := CheckPrograms(o.BinDir); err != nil {
		return res, err
	}
	var created []string
	if _, err := mkdirs(o.Layout.Root, "/"); err != nil {
		return res, err
	}
	var dirs []string
	if !o.ForPackage {
		dirs = append(dirs, path.Dir(o.Layout.FoldersRecord()))
	}
	for _, f := range files {
		dirs = append(dirs, path.Dir(f.Path))
	}
	record := func() error {
		if o.ForPackage {
			return nil
		}
		return recordFolders(o.Layout, created)
	}
	for _, d := range dirs {
		c, err := mkdirs(o.Layout.Root, d)
		created = append(created, c...)
		if err != nil {
			record()
			return res, err
		}
	}
	if err := record(); err != nil {
		return res, err
	}
	res.Written, err = Apply(o.Layout.Root, files)
	if err != nil {
		return res, err
	}
	res.Service, err = startService(ctx, o, res.Written)
	if err != nil {
		return res, err
	}
	if o.Decision == nil {
		return res, nil
	}
	if res.Service.Running {
		wait := o.AgentWait
		if wait == 0 {
			wait = 10 * time.Second
		}
		waitAgent(ctx, o.Layout, wait)
	}
	rec, err := RecordConsent(ctx, o.Layout, *o.Decision, o.UID)
	if err != nil {
		return res, err
	}
	res.Consent = &rec
	if rec.Through == ThroughFile && res.Service.Running {
		// The service started but did not answer in time: it reads the
		// record when it starts, so start it again.
		if err := o.Systemd.run(ctx, "try-restart", UnitName); err != nil {
			return res, fmt.Errorf("restart the service to read the consent record: %w", err)
		}
	}
	return res, nil
}

// mkdirs creates dir under root and each missing folder above it with
// mode 0755, whatever the umask: everyone must reach the programs, icons
// and manual pages. It returns the folders it created, as installation
// paths.
func mkdirs(root, dir string) (created []string, err error) {
	p := root
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("create %s: %w", root, err)
	}
	if dir == "/" {
		// The top of a staging root becomes the package's "/".
		if root != "/" {
			if err := os.Chmod(root, 0o755); err != nil {
				return nil, fmt.Errorf("create %s: %w", root, err)
			}
		}
		return nil, nil
	}
	rel := ""
	for _, part := range strings.Split(strings.Trim(dir, "/"), "/") {
		p = p + string(os.PathSeparator) + part
		rel += "/" + part
		if err := os.Mkdir(p, 0o755); err != nil {
			if errors.Is(err, fs.ErrExist) {
				continue
			}
			return created, fmt.Errorf("create %s: %w", p, err)
		}
		created = append(created, rel)
		if err := os.Chmod(p, 0o755); err != nil {
			return created, fmt.Errorf("create %s: %w", p, err)
		}
	}
	return created, nil
}

// FoldersRecord is where install lists the folders it created, so that
// uninstall removes them again, and only them.
//
// On disk: one installation path a line. Install adds to it (a second run
// creates nothing new); a missing or damaged record only means uninstall
// leaves some empty folders behind.
func (l Layout) FoldersRecord() string {
	return path.Join(l.Prefix, "share", "cloudprotect", "installed-folders")
}

// recordFolders adds created to the record of folders install created.
func recordFolders(l Layout, created []string) error {
	p := l.OnDisk(l.FoldersRecord())
	old, _ := os.ReadFile(p)
	seen := map[string]bool{}
	var all []string
	for _, d := range append(strings.Split(string(old), "\n"), created...) {
		if d = strings.TrimSpace(d); d != "" && path.IsAbs(d) && !seen[d] {
			seen[d] = true
			all = append(all, d)
		}
	}
	if len(all) == 0 {
		return nil
	}
	if err := os.WriteFile(p, []byte(strings.Join(all, "\n")+"\n"), 0o644); err != nil {
		return fmt.Errorf("record the folders created: %w", err)
	}
	return nil
}

// removeFolders removes the record and the folders it lists that are
// empty, deepest first: a folder that holds anything else stays.
func removeFolders(l Layout) {
	p := l.OnDisk(l.FoldersRecord())
	b, err := os.ReadFile(p)
	if err != nil {
		return
	}
	os.Remove(p)
	dirs := strings.Fields(string(b))
	slices.SortFunc(dirs, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	for _, d := range dirs {
		if path.IsAbs(d) && path.Clean(d) == d && d != "/" {
			os.Remove(l.OnDisk(d))
		}
	}
}

func startService(ctx context.Context, o InstallOptions, written []string) (Outcome, error) {
	l := o.Layout
	daemon := path.Join(l.BinDir(), "cloudprotectd")
	switch {
	case !o.Start && l.Staging():
		return Outcome{What: StagedOnly, Where: l.Root}, nil
	case !o.Start:
		return Outcome{What: NotStarted}, nil
	case !o.Systemd.Running():
		return Outcome{What: NoSystemd, Where: daemon}, nil
	}
	// Whether it ran before decides whether new files need a restart.
	wasActive := o.Systemd.run(ctx, "is-active", "--quiet", UnitName) == nil
	if len(written) > 0 {
		if err := o.Systemd.run(ctx, "daemon-reload"); err != nil {
			return Outcome{}, fmt.Errorf("reload systemd: %w", err)
		}
	}
	if err := o.Systemd.run(ctx, "enable", "--now", UnitName); err != nil {
		return Outcome{}, fmt.Errorf("enable the service: %w", err)
	}
	restarted := false
	if wasActive && slices.ContainsFunc(written, func(p string) bool {
		return p == daemon || p == l.UnitPath()
	}) {
		if err := o.Systemd.run(ctx, "restart", UnitName); err != nil {
			return Outcome{}, fmt.Errorf("restart the service: %w", err)
		}
		restarted = true
	}
	switch {
	case restarted:
		return Outcome{Running: true, What: Restarted}, nil
	case wasActive:
		return Outcome{Running: true, What: AlreadyRunning}, nil
	}
	return Outcome{Running: true, What: Started}, nil
}

// waitAgent waits until the agent of layout l answers, at most wait.
func waitAgent(ctx context.Context, l Layout, wait time.Duration) bool {
	c := localapi.NewClient(l.OnDisk(localapi.SystemSocket))
	defer c.Close()
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	for {
		if _, err := c.Status(ctx); err == nil {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// UninstallOptions configure Uninstall.
type UninstallOptions struct {
	Layout Layout
	// Stop stops and disables the service where systemd runs.
	Stop    bool
	Systemd Systemd
	// Purge also deletes the agent's state: the consent record and the
	// statistics not sent yet.
	Purge bool
}

// UninstallResult says what Uninstall did.
type UninstallResult struct {
	Removed []string
	Service Outcome
	// Purged is true when the state folder was deleted.
	Purged bool
	// PolicyKept names the administrator's policy when it was left.
	PolicyKept string
}

// Uninstall stops and disables the service where systemd runs, removes
// the installed files and, with Purge, the agent's state.
func Uninstall(ctx context.Context, o UninstallOptions) (UninstallResult, error) {
	var res UninstallResult
	l := o.Layout
	if err := l.Check(); err != nil {
		return res, err
	}
	files, err := Manifest(l, "")
	if err != nil {
		return res, err
	}
	_, unitErr := os.Stat(l.OnDisk(l.UnitPath()))
	switch {
	case !o.Stop:
		res.Service.What = NothingStopped
	case !o.Systemd.Running():
		res.Service.What = NoSystemdStop
	case unitErr != nil:
		res.Service.What, res.Service.Where = NotInstalled, l.UnitDir()
	default:
		if err := o.Systemd.run(ctx, "disable", "--now", UnitName); err != nil {
			return res, fmt.Errorf("stop the service: %w", err)
		}
		res.Service.What = Stopped
	}
	res.Removed, err = Remove(l, files)
	if err != nil {
		return res, err
	}
	if o.Stop && o.Systemd.Running() && len(res.Removed) > 0 {
		if err := o.Systemd.run(ctx, "daemon-reload"); err != nil {
			return res, fmt.Errorf("reload systemd: %w", err)
		}
	}
	if o.Purge {
		if err := os.RemoveAll(l.OnDisk(StateDir)); err != nil {
			return res, fmt.Errorf("delete the agent's state: %w", err)
		}
		res.Purged = true
	}
	removeFolders(l)
	if _, err := os.Stat(l.OnDisk(consent.DefaultPolicyPath)); err == nil {
		res.PolicyKept = consent.DefaultPolicyPath
	}
	return res, nil
}

// Packaged reports whether the Debian package is installed under the
// layout's root: then apt, not these commands, owns the files.
func Packaged(l Layout) bool {
	admin := l.OnDisk("/var/lib/dpkg")
	if _, err := os.Stat(admin); err != nil {
		return false
	}
	out, err := exec.Command("dpkg-query", "--admindir="+admin, "--show", "--showformat=${db:Status-Status}", PackageName).Output()
	if err != nil {
		return false
	}
	switch strings.TrimSpace(string(out)) {
	case "", "not-installed", "config-files":
		return false
	}
	return true
}
