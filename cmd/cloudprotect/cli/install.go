package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

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
	if err := parseFlags("install", args, r.env, func(fs *flag.FlagSet) {
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
		return &usageError{"install: give at most one of --participate, --no-participate and --no-consent"}
	}
	if err := l.Check(); err != nil {
		return &usageError{"install: " + err.Error()}
	}
	if err := needRoot(l, "install"); err != nil {
		return err
	}
	if !l.Staging() && setup.Packaged(l) {
		return &hintError{
			err:  errors.New("cloudprotect is installed by its Debian package here"),
			hint: "upgrade it with apt, or remove it first (sudo apt remove cloudprotect)",
		}
	}
	if binDir == "" {
		exe, err := os.Executable()
		if err == nil {
			exe, err = filepath.EvalSymlinks(exe)
		}
		if err != nil {
			return fmt.Errorf("find the programs to install: %w", err)
		}
		binDir = filepath.Dir(exe)
	}
	if err := setup.CheckPrograms(binDir); err != nil {
		return &hintError{err: err, hint: "build them with `make build` and run bin/cloudprotect install, or say where they are with --bin-dir"}
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
		return &hintError{err: fmt.Errorf("install: %w", err), hint: "fix the cause above and run the same command again: what is already in place is kept"}
	}
	where := l.Prefix
	if l.Staging() {
		where = filepath.Join(l.Root, l.Prefix)
	}
	if len(res.Written) == 0 {
		fmt.Fprintf(out, "cloudprotect is already installed in %s: nothing changed.\n", where)
	} else {
		fmt.Fprintf(out, "Installed cloudprotect in %s (%d files written).\n", where, len(res.Written))
	}
	fmt.Fprintln(out, res.Service.Note)
	switch {
	case res.Consent != nil:
		how := "by the agent"
		if res.Consent.Through == setup.ThroughFile {
			how = "in " + res.Consent.Where + " (no agent was running; it reads the record when it starts)"
		}
		fmt.Fprintf(out, "Participation in the Security Network: %s, recorded %s.\n", res.Consent.State, how)
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
		return nil, "Participation in the Security Network was not asked about (--no-consent): nothing is collected until someone agrees.", nil
	}
	cur, err := setup.CurrentConsent(ctx, l)
	if err != nil {
		return nil, "", &hintError{err: err, hint: "check the agent (cloudprotect status) and its state folder " + setup.StateDir}
	}
	if cur.Locked {
		msg := fmt.Sprintf("Participation in the Security Network is %s, set by the administrator's policy %s: not asked.", cur.State, cur.Policy)
		if participate || noParticipate {
			msg += " The policy wins over --participate and --no-participate."
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
			return nil, fmt.Sprintf("Participation in the Security Network: already %s; unchanged.", want), nil
		}
		if participate {
			return &yes, "", nil
		}
		return &no, "", nil
	case cur.Decided():
		return nil, fmt.Sprintf("Participation in the Security Network: already %s (via %s); not asked again. "+
			"Change it with `cloudprotect participate` or `cloudprotect leave`.", cur.State, cur.Via), nil
	case r.env.IsTerminal == nil || !r.env.IsTerminal():
		return nil, "Participation in the Security Network is not decided: there was no terminal to ask on, and neither " +
			"--participate nor --no-participate was given. Nothing is collected until someone agrees: the tray asks at " +
			"the next login, or run `cloudprotect participate`.", nil
	}
	fmt.Fprintf(r.env.Stdout, "%s\n(statement version %d)\n\n", strings.TrimRight(consent.Statement(), "\n"), consent.StatementVersion)
	ok, err := r.confirm(Question, "--participate")
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
	if err := parseFlags("uninstall", args, r.env, func(fs *flag.FlagSet) {
		fs.StringVar(&l.Root, "root", "/", "")
		fs.StringVar(&l.Prefix, "prefix", setup.DefaultPrefix, "")
		fs.BoolVar(&purge, "purge", false, "")
		fs.BoolVar(&yes, "yes", false, "")
	}); err != nil {
		return err
	}
	if err := l.Check(); err != nil {
		return &usageError{"uninstall: " + err.Error()}
	}
	if err := needRoot(l, "uninstall"); err != nil {
		return err
	}
	if !l.Staging() && setup.Packaged(l) {
		return &hintError{
			err:  errors.New("cloudprotect is installed by its Debian package here"),
			hint: "remove it with sudo apt remove cloudprotect (apt purge also deletes its state)",
		}
	}
	if purge && !yes {
		ok, err := r.confirm("Also delete the consent record and the statistics not sent yet ("+setup.StateDir+")? "+
			"What the Security Network already received stays there unless you ran `cloudprotect leave` first", "--yes")
		if err != nil {
			return err
		}
		if !ok {
			fmt.Fprintln(r.env.Stdout, "Nothing changed.")
			return nil
		}
	}
	res, err := setup.Uninstall(ctx, setup.UninstallOptions{Layout: l, Stop: !l.Staging(), Purge: purge})
	if err != nil {
		return &hintError{err: fmt.Errorf("uninstall: %w", err), hint: "fix the cause above and run the same command again"}
	}
	out := r.env.Stdout
	if !l.Staging() {
		fmt.Fprintln(out, res.Service.Note)
	}
	if len(res.Removed) == 0 {
		fmt.Fprintf(out, "cloudprotect is not installed in %s: no files to remove.\n", l.Prefix)
	} else {
		fmt.Fprintf(out, "Removed cloudprotect from %s (%d files).\n", l.Prefix, len(res.Removed))
	}
	if res.Purged {
		fmt.Fprintf(out, "Deleted the agent's state (%s): the consent record and the statistics not sent yet.\n", setup.StateDir)
	} else {
		fmt.Fprintf(out, "The agent's state (%s) is kept; `cloudprotect uninstall --purge` deletes it.\n", setup.StateDir)
	}
	if res.PolicyKept != "" {
		fmt.Fprintf(out, "The administrator's policy %s is kept.\n", res.PolicyKept)
	}
	return nil
}

// needRoot refuses to change the running system without root.
func needRoot(l setup.Layout, name string) error {
	if l.Staging() || os.Geteuid() == 0 {
		return nil
	}
	return &hintError{
		err:  fmt.Errorf("%s changes the system and needs root", name),
		hint: fmt.Sprintf("run it with sudo: sudo cloudprotect %s (or --root DIR to work in a staging folder)", name),
	}
}
