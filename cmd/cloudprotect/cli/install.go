package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/cmd/cloudprotect/setup"
)

// cmdInstall installs cloudprotect and, unless told otherwise, asks the
// person whether to participate in the Security Network.
func cmdInstall(ctx context.Context, r *runner, args []string) error {
	var (
		l                          setup.Layout
		binDir                     string
		participate, noParticipate bool
		noConsent, noStart         bool
	)
	if err := r.parseFlags("install", args, func(fs *flag.FlagSet) {
		fs.StringVar(&l.Root, "root", "/", "")
		fs.StringVar(&l.Prefix, "prefix", setup.DefaultPrefix, "")
		fs.StringVar(&binDir, "bin-dir", "", "")
		fs.BoolVar(&participate, "participate", false, "")
		fs.BoolVar(&noParticipate, "no-participate", false, "")
		fs.BoolVar(&noConsent, "no-consent", false, "")
		fs.BoolVar(&noStart, "no-start", false, "")
	}); err != nil {
		return err
	}
	n := 0
	for _, set := range []bool{participate, noParticipate, noConsent} {
		if set {
			n++
		}
	}
	if n > 1 {
		return &usageError{cmd: "install", msg: r.p.Sprintf("install: give at most one of --participate, --no-participate and --no-consent")}
	}
	if err := l.Check(); err != nil {
		return &usageError{cmd: "install", msg: r.p.Sprintf("install: %s", r.layoutError(err))}
	}
	if err := r.needRoot(l, "install"); err != nil {
		return err
	}
	if !l.Staging() && setup.Packaged(l) {
		return &hintError{
			err:  r.p.Error("cloudprotect is installed by its Debian package here"),
			hint: r.p.Sprintf("upgrade it with apt, or remove it first (sudo apt remove cloudprotect)"),
		}
	}
	if binDir == "" {
		exe, err := os.Executable()
		if err == nil {
			exe, err = filepath.EvalSymlinks(exe)
		}
		if err != nil {
			return r.p.Wrap(err, "find the programs to install: %s", err.Error())
		}
		binDir = filepath.Dir(exe)
	}
	if err := setup.CheckPrograms(binDir); err != nil {
		return &hintError{err: r.p.Wrap(err, "%s not found in %s", strings.Join(setup.MissingPrograms(binDir), ", "), binDir), hint: r.p.Sprintf("build them with `make build` and run bin/cloudprotect install, or say where they are with --bin-dir")}
	}

	out := r.env.Stdout
	decision, undecidedWhy, err := r.installDecision(ctx, l, participate, noParticipate, noConsent)
	if err != nil {
		return err
	}
	res, err := setup.Install(ctx, setup.InstallOptions{
		Layout:   l,
		BinDir:   binDir,
		Start:    !noStart && !l.Staging(),
		Decision: decision,
		UID:      os.Getuid(),
	})
	if err != nil {
		return &hintError{err: r.p.Wrap(err, "install: %s", err.Error()), hint: r.p.Sprintf("fix the cause above and run the same command again: what is already in place is kept")}
	}
	where := l.Prefix
	if l.Staging() {
		where = filepath.Join(l.Root, l.Prefix)
	}
	if len(res.Written) == 0 {
		r.p.Fprintf(out, "cloudprotect is already installed in %s: nothing changed.\n", where)
	} else {
		r.p.Fprintf(out, "Installed cloudprotect in %s (%d files written).\n", where, len(res.Written))
	}
	fmt.Fprintln(out, r.serviceNote(res.Service))
	switch {
	case res.Consent != nil:
		state := stateName(r.p, api.State(res.Consent.State))
		if res.Consent.Through == setup.ThroughFile {
			r.p.Fprintf(out, "Participation in the Security Network: %s, recorded in %s (no agent was running; it reads the record when it starts).\n", state, res.Consent.Where)
		} else {
			r.p.Fprintf(out, "Participation in the Security Network: %s, recorded by the agent.\n", state)
		}
	case undecidedWhy != "":
		fmt.Fprintln(out, undecidedWhy)
	}
	return nil
}

// installDecision finds what install should record about participation:
// the flag's answer, the person's answer on the terminal, or nothing
// (with a sentence saying why).
func (r *runner) installDecision(ctx context.Context, l setup.Layout, participate, noParticipate, noConsent bool) (*bool, string, error) {
	if noConsent {
		return nil, r.p.Sprintf("Participation in the Security Network was not asked about (--no-consent): nothing is collected until someone agrees."), nil
	}
	cur, err := setup.CurrentConsent(ctx, l)
	if err != nil {
		return nil, "", &hintError{err: err, hint: r.p.Sprintf("check the agent (cloudprotect status) and its state folder %s", setup.StateDir)}
	}
	if cur.Locked {
		msg := r.p.Sprintf("Participation in the Security Network is %s, set by the administrator's policy %s: not asked.", stateName(r.p, api.State(cur.State)), cur.Policy)
		if participate || noParticipate {
			msg += " " + r.p.Sprintf("The policy wins over --participate and --no-participate.")
		}
		return nil, msg, nil
	}
	yes, no := true, false
	switch {
	case participate || noParticipate:
		want := consent.Declined
		if participate {
			want = consent.Participating
		}
		if cur.State == want && !cur.Paused {
			return nil, r.p.Sprintf("Participation in the Security Network: already %s; unchanged.", stateName(r.p, api.State(want))), nil
		}
		if participate {
			return &yes, "", nil
		}
		return &no, "", nil
	case cur.Decided():
		return nil, r.p.Sprintf("Participation in the Security Network: already %s (chosen through %s); not asked again. "+
			"Change it with `cloudprotect participate` or `cloudprotect leave`.", stateName(r.p, api.State(cur.State)), viaName(r.p, string(cur.Via))), nil
	case r.env.IsTerminal == nil || !r.env.IsTerminal():
		return nil, r.p.Sprintf("Participation in the Security Network is not decided: there was no terminal to ask on, and neither " +
			"--participate nor --no-participate was given. Nothing is collected until someone agrees: the tray asks at " +
			"the next login, or run `cloudprotect participate`."), nil
	}
	st := consent.StatementIn(r.p.Lang())
	r.p.Fprintf(r.env.Stdout, "%s\n(Security Network Statement version %d)\n", strings.TrimRight(st.Text, "\n"), consent.StatementVersion)
	fmt.Fprintln(r.env.Stdout)
	ok, err := r.confirm(r.p.Sprintf("I agree to participate in the Security Network"), "--participate")
	if err != nil {
		return nil, "", err
	}
	if ok {
		return &yes, "", nil
	}
	return &no, "", nil
}

// cmdUninstall removes what install put in place; --purge also deletes
// the agent's state.
func cmdUninstall(ctx context.Context, r *runner, args []string) error {
	var (
		l          setup.Layout
		purge, yes bool
	)
	if err := r.parseFlags("uninstall", args, func(fs *flag.FlagSet) {
		fs.StringVar(&l.Root, "root", "/", "")
		fs.StringVar(&l.Prefix, "prefix", setup.DefaultPrefix, "")
		fs.BoolVar(&purge, "purge", false, "")
		fs.BoolVar(&yes, "yes", false, "")
	}); err != nil {
		return err
	}
	if err := l.Check(); err != nil {
		return &usageError{cmd: "uninstall", msg: r.p.Sprintf("uninstall: %s", r.layoutError(err))}
	}
	if err := r.needRoot(l, "uninstall"); err != nil {
		return err
	}
	if !l.Staging() && setup.Packaged(l) {
		return &hintError{
			err:  r.p.Error("cloudprotect is installed by its Debian package here"),
			hint: r.p.Sprintf("remove it with sudo apt remove cloudprotect (apt purge also deletes its state)"),
		}
	}
	if purge && !yes {
		ok, err := r.confirm(r.p.Sprintf("Also delete the consent record and the statistics not sent yet (%s)? "+
			"What the Security Network already received stays there unless you ran `cloudprotect leave` first", setup.StateDir), "--yes")
		if err != nil {
			return err
		}
		if !ok {
			r.p.Fprintf(r.env.Stdout, "Nothing changed.\n")
			return nil
		}
	}
	res, err := setup.Uninstall(ctx, setup.UninstallOptions{Layout: l, Stop: !l.Staging(), Purge: purge})
	if err != nil {
		return &hintError{err: r.p.Wrap(err, "uninstall: %s", err.Error()), hint: r.p.Sprintf("fix the cause above and run the same command again")}
	}
	out := r.env.Stdout
	if !l.Staging() {
		fmt.Fprintln(out, r.serviceNote(res.Service))
	}
	if len(res.Removed) == 0 {
		r.p.Fprintf(out, "cloudprotect is not installed in %s: no files to remove.\n", l.Prefix)
	} else {
		r.p.Fprintf(out, "Removed cloudprotect from %s (%d files).\n", l.Prefix, len(res.Removed))
	}
	if res.Purged {
		r.p.Fprintf(out, "Deleted the agent's state (%s): the consent record and the statistics not sent yet.\n", setup.StateDir)
	} else {
		r.p.Fprintf(out, "The agent's state (%s) is kept; `cloudprotect uninstall --purge` deletes it.\n", setup.StateDir)
	}
	if res.PolicyKept != "" {
		r.p.Fprintf(out, "The administrator's policy %s is kept.\n", res.PolicyKept)
	}
	return nil
}

// needRoot refuses to change the running system without root.
func (r *runner) needRoot(l setup.Layout, name string) error {
	if l.Staging() || os.Geteuid() == 0 {
		return nil
	}
	return &hintError{
		err:  r.p.Error("%s changes the system and needs root", name),
		hint: r.p.Sprintf("run it with sudo: sudo cloudprotect %s (or --root DIR to work in a staging folder)", name),
	}
}

// layoutError says what is wrong with --root or --prefix.
func (r *runner) layoutError(err error) string {
	var pe *setup.PrefixError
	if errors.As(err, &pe) {
		if pe.Prefix == "/" {
			return r.p.Sprintf("the prefix cannot be / itself: use /usr or /usr/local")
		}
		return r.p.Sprintf("the prefix %q is not an absolute path", pe.Prefix)
	}
	return err.Error()
}

// serviceNote says what happened to the service, and what to do by hand
// when something could not be done.
func (r *runner) serviceNote(o setup.Outcome) string {
	switch o.What {
	case setup.StagedOnly:
		return r.p.Sprintf("Installed under %s: nothing was enabled or started there.", o.Where)
	case setup.NotStarted:
		return r.p.Sprintf("The service was not enabled or started (--no-start); to start the agent now and at every boot: sudo systemctl enable --now %s", setup.UnitName)
	case setup.NoSystemd:
		return r.p.Sprintf("systemd is not running on this computer (it is not process 1), so the cloudprotectd service could not be enabled or started. "+
			"Start the agent with your init system, or by hand as root: sudo %s &", o.Where)
	case setup.Restarted:
		return r.p.Sprintf("The cloudprotectd service was restarted to run the new version; it starts at every boot.")
	case setup.AlreadyRunning:
		return r.p.Sprintf("The cloudprotectd service is enabled and running.")
	case setup.Started:
		return r.p.Sprintf("The cloudprotectd service is enabled and started; it starts at every boot.")
	case setup.NothingStopped:
		return r.p.Sprintf("Nothing was stopped.")
	case setup.NoSystemdStop:
		return r.p.Sprintf("systemd is not running on this computer, so no service was stopped or disabled; if cloudprotectd still runs, stop it (for example: sudo pkill -x cloudprotectd).")
	case setup.NotInstalled:
		return r.p.Sprintf("The cloudprotectd service was not installed in %s.", o.Where)
	case setup.Stopped:
		return r.p.Sprintf("The cloudprotectd service was stopped and disabled.")
	}
	return ""
}
