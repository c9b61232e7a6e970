package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"strings"
	"text/tabwriter"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/agent/safetext"
)

// cmdAllow manages the local exceptions: programs allowed on this computer
// whatever the Security Network says (administrators only).
func cmdAllow(ctx context.Context, r *runner, args []string) error {
	var reason, remove string
	var list, asJSON bool
	fs := flag.NewFlagSet("allow", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&reason, "reason", "", "")
	fs.StringVar(&remove, "remove", "", "")
	fs.BoolVar(&list, "list", false, "")
	fs.BoolVar(&asJSON, "json", false, "")
	// The hash may come before or after the flags.
	var hashes []string
	for rest := args; ; {
		if err := fs.Parse(rest); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return errHelp
			}
			return r.flagError("allow", args, err)
		}
		if fs.NArg() == 0 {
			break
		}
		if fs.Arg(0) == "help" {
			return errHelp
		}
		hashes = append(hashes, fs.Arg(0))
		rest = fs.Args()[1:]
	}
	switch {
	case list:
		if len(hashes) > 0 || remove != "" || reason != "" {
			return &usageError{cmd: "allow", msg: r.p.Sprintf("allow: --list takes no SHA-256, --remove or --reason")}
		}
		l, err := r.client.Exceptions(ctx)
		if err != nil {
			return r.wrap(err)
		}
		if asJSON {
			return printJSON(r.env.Stdout, l)
		}
		return r.printExceptions(l.Exceptions)
	case remove != "":
		if len(hashes) > 0 || reason != "" {
			return &usageError{cmd: "allow", msg: r.p.Sprintf("allow: --remove takes the SHA-256 and nothing else")}
		}
		if _, err := r.client.SetException(ctx, api.ExceptionRequest{SHA256: remove, Remove: true}); err != nil {
			return r.wrap(err)
		}
		r.p.Fprintf(r.env.Stdout, "Exception removed: the Security Network's verdict on %s applies again.\n", safetext.Line(strings.ToLower(remove)))
		return nil
	}
	if len(hashes) != 1 {
		return &usageError{cmd: "allow", msg: r.p.Sprintf("allow: give one SHA-256 (as `cloudprotect blocked` shows it) and --reason TEXT")}
	}
	if strings.TrimSpace(reason) == "" {
		return &usageError{cmd: "allow", msg: r.p.Sprintf("allow: say why with --reason TEXT; it is kept with the exception")}
	}
	l, err := r.client.SetException(ctx, api.ExceptionRequest{SHA256: hashes[0], Reason: reason})
	if err != nil {
		return r.wrap(err)
	}
	r.p.Fprintf(r.env.Stdout, "Allowed on this computer: %s runs whatever the Security Network says (exceptions: %d).\n",
		safetext.Line(strings.ToLower(hashes[0])), len(l.Exceptions))
	return nil
}

func (r *runner) printExceptions(list []api.Exception) error {
	if len(list) == 0 {
		r.p.Fprintf(r.env.Stdout, "No exceptions: the Security Network's verdicts apply to every program.\n")
		return nil
	}
	tw := tabwriter.NewWriter(r.env.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", r.p.Sprintf("SHA-256"), r.p.Sprintf("ADDED"), r.p.Sprintf("BY UID"), r.p.Sprintf("REASON"))
	for _, e := range list {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\n", e.SHA256, e.Added.Local().Format("2006-01-02 15:04"), e.UID, safetext.Line(e.Reason))
	}
	return tw.Flush()
}

// cmdBlocked lists the programs that were blocked, newest first: the
// alerts whose action was a block, with the whole SHA-256 that
// `cloudprotect allow` takes.
func cmdBlocked(ctx context.Context, r *runner, args []string) error {
	var asJSON bool
	if err := r.parseFlags("blocked", args, func(fs *flag.FlagSet) { fs.BoolVar(&asJSON, "json", false, "") }); err != nil {
		return err
	}
	l, err := r.alerts(ctx)
	if err != nil {
		return err
	}
	var blocks []api.Alert
	for _, a := range l.Alerts {
		if a.Action == api.AlertActionBlocked {
			blocks = append(blocks, a)
		}
	}
	if asJSON {
		return printJSON(r.env.Stdout, api.AlertList{Alerts: blocks})
	}
	if len(blocks) == 0 {
		r.p.Fprintf(r.env.Stdout, "No program was blocked.\n")
		return nil
	}
	tw := tabwriter.NewWriter(r.env.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", r.p.Sprintf("TIME"), r.p.Sprintf("PATH"), r.p.Sprintf("SHA-256"), r.p.Sprintf("VERDICT FROM"))
	for _, a := range blocks {
		when := ""
		if !a.Time.IsZero() {
			when = a.Time.Local().Format("2006-01-02 15:04:05")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", when, safetext.Line(a.Path), safetext.Line(a.SHA256), sourceName(r, a.Source))
	}
	return tw.Flush()
}

// alerts fetches the recent alerts the caller may see.
func (r *runner) alerts(ctx context.Context) (api.AlertList, error) {
	l, err := r.client.Alerts(ctx)
	var ae *localapi.APIError
	if errors.As(err, &ae) && ae.StatusCode == http.StatusNotFound {
		return l, &hintError{err: r.p.Error("this agent keeps no alert history"), hint: r.p.Sprintf("update cloudprotect; until then alerts appear only as notifications")}
	}
	if err != nil {
		return l, r.wrap(err)
	}
	return l, nil
}

// sourceName says where a verdict came from.
func sourceName(r *runner, s string) string {
	switch s {
	case "analyst":
		return r.p.Sprintf("an analyst of the Security Network")
	case "feed":
		return r.p.Sprintf("a threat feed of the Security Network")
	case "prevalence":
		return r.p.Sprintf("the Security Network's reports")
	case "":
		return r.p.Sprintf("the Security Network")
	}
	return safetext.Line(s)
}
