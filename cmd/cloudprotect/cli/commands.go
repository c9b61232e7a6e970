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
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/agent/safetext"
	"github.com/cloudprotect/cloudprotect/cmd/internal/version"
	"github.com/cloudprotect/cloudprotect/tray/i18n"
)

func cmdStatus(ctx context.Context, r *runner, args []string) error {
	var asJSON bool
	if err := r.parseFlags("status", args, func(fs *flag.FlagSet) { fs.BoolVar(&asJSON, "json", false, "") }); err != nil {
		return err
	}
	st, err := r.client.Status(ctx)
	if err != nil {
		return r.wrap(err)
	}
	if asJSON {
		return printJSON(r.env.Stdout, st)
	}
	r.printStatus(r.env.Stdout, st)
	return nil
}

// Headline says the state of cloud protection in one line, in the words
// the tray uses for the same state.
func Headline(p *i18n.Printer, st api.Status) string {
	h := i18n.Headline(p, st)
	if st.Participation.Paused {
		h += p.Sprintf(" (version %d); agree to it again to continue", st.Participation.StatementVersion)
	}
	return h
}

// stateName is a participation state in words.
func stateName(p *i18n.Printer, s api.State) string {
	switch s {
	case api.StateParticipating:
		return p.Sprintf("participating")
	case api.StateDeclined:
		return p.Sprintf("not participating")
	case api.StateUndecided:
		return p.Sprintf("not decided")
	}
	return string(s)
}

func viaName(p *i18n.Printer, via string) string {
	switch consent.Via(via) {
	case consent.ViaCLI:
		return p.Sprintf("the command line")
	case consent.ViaTray:
		return p.Sprintf("the tray")
	case consent.ViaInstall:
		return p.Sprintf("the installation")
	case consent.ViaPolicy:
		return p.Sprintf("the administrator's policy")
	}
	return via
}

func (r *runner) printStatus(w io.Writer, st api.Status) {
	p := r.p
	pa := st.Participation
	fmt.Fprintln(w, Headline(p, st))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	row := func(label, value string) { fmt.Fprintf(tw, "%s\t%s\n", label+":", value) }
	state := stateName(p, pa.State)
	if pa.Via != "" && pa.Since != nil {
		state = p.Sprintf("%s (chosen through %s, %s)", state, viaName(p, pa.Via), pa.Since.Local().Format("2006-01-02 15:04"))
	}
	row(p.Sprintf("participation"), state)
	row(p.Sprintf("statement"), p.Sprintf("version %d, accepted: %d", pa.StatementVersion, pa.AcceptedVersion))
	if pa.Locked {
		row(p.Sprintf("policy"), pa.Policy)
	}
	if pa.PolicyError != "" {
		row(p.Sprintf("policy ignored"), safetext.Line(pa.PolicyError)+" ("+pa.Policy+")")
	}
	row(p.Sprintf("protection"), protectionLine(p, st))
	if st.Alerts > 0 {
		row(p.Sprintf("alerts"), p.Sprintf("%d recent: see `cloudprotect alerts`", st.Alerts))
	}
	mode := st.Agent.Mode
	switch mode {
	case "system":
		mode = p.Sprintf("system")
	case "user":
		mode = p.Sprintf("this user only")
	}
	if st.Agent.ExecSource == "" {
		row(p.Sprintf("agent"), p.Sprintf("%s, version %s, not watching programs (nothing is collected)", mode, st.Agent.Version))
	} else {
		row(p.Sprintf("agent"), p.Sprintf("%s, version %s, watching with %s", mode, st.Agent.Version, st.Agent.ExecSource))
	}
	if st.Agent.Limited {
		row(p.Sprintf("limited"), st.Agent.LimitedReason)
	}
	if st.Agent.EventsLost > 0 {
		row(p.Sprintf("events lost"), p.Sprintf("%d of %d", st.Agent.EventsLost, st.Agent.EventsSeen+st.Agent.EventsLost))
	}
	queue := p.Sprintf("nothing waiting to be sent")
	if st.Queue.Pending > 0 {
		queue = p.Sprintf("%d programs waiting to be sent", st.Queue.Pending)
		if next := st.Upload.NextAttempt; next != nil {
			queue += p.Sprintf("; next attempt %s", shortTime(next.Local(), time.Now()))
		}
	}
	if st.Queue.Evicted > 0 {
		queue += p.Sprintf(", dropped because the queue was full: %d", st.Queue.Evicted)
	}
	row(p.Sprintf("queue"), queue)
	u := st.Upload
	server := u.Server
	if server == "" {
		server = p.Sprintf("none configured")
	}
	row(p.Sprintf("server"), server)
	if problem, hint := sendProblem(p, u); problem != "" {
		row(p.Sprintf("sending"), p.Sprintf("stopped: %s", problem))
		if hint != "" {
			row(p.Sprintf("hint"), hint)
		}
	}
	if u.LastUpload != nil {
		row(p.Sprintf("last sent"), p.Sprintf("%s (sent so far: %d)", u.LastUpload.Local().Format("2006-01-02 15:04:05"), u.RecordsSent))
	}
	if u.RecordsRefused > 0 {
		row(p.Sprintf("refused"), p.Sprintf("%d records refused by the server and dropped", u.RecordsRefused))
	}
	if u.LastError != "" {
		row(p.Sprintf("last error"), u.LastError)
	}
	if u.NextAttempt != nil {
		row(p.Sprintf("next attempt"), u.NextAttempt.Local().Format("2006-01-02 15:04:05"))
	}
	if u.DeletionPending {
		row(p.Sprintf("deletion"), p.Sprintf("asked of the server, waiting for its confirmation"))
	}
	tw.Flush()
	if pa.Notice != "" {
		p.Fprintf(w, "\nnote: %s\n", pa.Notice)
	}
}

// sendProblem says why the agent sends nothing, and what to do about it:
// in this language when no server is configured, else in the agent's
// words. Both are "" when it can send.
func sendProblem(p *i18n.Printer, u api.UploadInfo) (problem, hint string) {
	switch {
	case u.Problem == "":
		return "", ""
	case strings.TrimSpace(u.Server) == "":
		return p.Sprintf("nothing is sent until a Security Network server is configured"),
			p.Sprintf("set \"server\" in %s (for example https://securitynetwork.example.org), or start cloudprotectd with --server", consent.DefaultPolicyPath)
	}
	return safetext.Line(u.Problem), safetext.Line(u.ProblemHint)
}

// protectionLine says whether programs are blocked before they run.
func protectionLine(p *i18n.Printer, st api.Status) string {
	pr := st.Protection
	var s string
	switch {
	case pr.Active:
		s = p.Sprintf("blocking programs the Security Network knows to be malicious")
	case pr.Mode == "alert":
		s = p.Sprintf("alerts only: the policy does not allow blocking")
	case pr.Reason != "":
		s = p.Sprintf("not blocking: %s", pr.Reason)
	default:
		s = p.Sprintf("not blocking")
	}
	if pr.Blocked > 0 {
		s += p.Sprintf("; blocked so far: %d", pr.Blocked)
	}
	if pr.Held > 0 {
		s += p.Sprintf("; held for the cloud's answer: %d", pr.Held)
	}
	if b := pr.LastBlock; b != nil {
		s += p.Sprintf(", last %s at %s", safetext.Line(b.Path), b.Time.Local().Format("2006-01-02 15:04"))
	}
	return s
}

func cmdAlerts(ctx context.Context, r *runner, args []string) error {
	var asJSON bool
	if err := r.parseFlags("alerts", args, func(fs *flag.FlagSet) { fs.BoolVar(&asJSON, "json", false, "") }); err != nil {
		return err
	}
	l, err := r.alerts(ctx)
	if err != nil {
		return err
	}
	if asJSON {
		return printJSON(r.env.Stdout, l)
	}
	if len(l.Alerts) == 0 {
		r.p.Fprintf(r.env.Stdout, "No alerts: the Security Network reported no program on this computer as dangerous.\n")
		return nil
	}
	tw := tabwriter.NewWriter(r.env.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.p.Sprintf("TIME"), r.p.Sprintf("WHAT"), r.p.Sprintf("VERDICT"), r.p.Sprintf("SHA-256"), r.p.Sprintf("PATH"))
	for _, a := range l.Alerts {
		when := ""
		if !a.Time.IsZero() {
			when = a.Time.Local().Format("2006-01-02 15:04")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s…\t%s\n", when, actionName(r.p, a.Action), verdictName(r.p, a.Verdict),
			safetext.Line(a.SHA256[:min(16, len(a.SHA256))]), safetext.Line(a.Path))
	}
	return tw.Flush()
}

func actionName(p *i18n.Printer, action string) string {
	if action == api.AlertActionBlocked {
		return p.Sprintf("blocked")
	}
	return p.Sprintf("ran")
}

func verdictName(p *i18n.Printer, v string) string {
	switch v {
	case "malicious":
		return p.Sprintf("malicious")
	case "untrusted":
		return p.Sprintf("untrusted")
	}
	return safetext.Line(v)
}

func cmdStatement(ctx context.Context, r *runner, args []string) error {
	if err := r.parseFlags("statement", args, func(*flag.FlagSet) {}); err != nil {
		return err
	}
	// The text is built in: the statement can be read before anything runs.
	s := consent.StatementIn(r.p.Lang())
	r.p.Fprintf(r.env.Stdout, "%s\n(Security Network Statement version %d)\n", strings.TrimRight(s.Text, "\n"), consent.StatementVersion)
	return nil
}

func cmdParticipate(ctx context.Context, r *runner, args []string) error {
	var yes bool
	if err := r.parseFlags("participate", args, func(fs *flag.FlagSet) { fs.BoolVar(&yes, "yes", false, "") }); err != nil {
		return err
	}
	s, err := r.client.StatementIn(ctx, r.p.Lang())
	if err != nil {
		return r.wrap(err)
	}
	if !yes {
		fmt.Fprintf(r.env.Stdout, "%s\n\n", strings.TrimRight(s.Text, "\n"))
		ok, err := r.confirm(r.p.Sprintf("I agree to participate in the Security Network"), "--yes")
		if err != nil {
			return err
		}
		if !ok {
			r.p.Fprintf(r.env.Stdout, "Nothing changed: you do not participate.\n")
			return nil
		}
	}
	st, err := r.client.SetParticipation(ctx, api.ParticipationRequest{
		Participate: true, StatementVersion: s.Version, Via: string(consent.ViaCLI),
	})
	if err != nil {
		return r.wrap(err)
	}
	r.p.Fprintf(r.env.Stdout, "%s. Thank you for participating in the Security Network (statement version %d).\n",
		Headline(r.p, st), st.Participation.AcceptedVersion)
	return nil
}

func cmdLeave(ctx context.Context, r *runner, args []string) error {
	var yes bool
	if err := r.parseFlags("leave", args, func(fs *flag.FlagSet) { fs.BoolVar(&yes, "yes", false, "") }); err != nil {
		return err
	}
	before, err := r.client.Status(ctx)
	if err != nil {
		return r.wrap(err)
	}
	if before.Participation.State != api.StateParticipating && !before.Participation.Locked {
		r.p.Fprintf(r.env.Stdout, "Nothing changed: you do not participate in the Security Network.\n")
		return nil
	}
	if !yes {
		ok, err := r.confirm(r.p.Sprintf("Stop participating in the Security Network? Statistics not sent yet are deleted, "+
			"and the Security Network is asked to delete what it received"), "--yes")
		if err != nil {
			return err
		}
		if !ok {
			r.p.Fprintf(r.env.Stdout, "Nothing changed.\n")
			return nil
		}
		if before, err = r.client.Status(ctx); err != nil {
			return r.wrap(err)
		}
	}
	st, err := r.client.SetParticipation(ctx, api.ParticipationRequest{Participate: false, Via: string(consent.ViaCLI)})
	if err != nil {
		return r.wrap(err)
	}
	fmt.Fprintf(r.env.Stdout, "%s.\n", Headline(r.p, st))
	q := before.Queue
	if q.Records == 0 {
		r.p.Fprintf(r.env.Stdout, "No statistics were kept on this computer, so none had to be deleted.\n")
	} else {
		r.p.Fprintf(r.env.Stdout, "Deleted from this computer: %d statistics records (not sent yet: %d).\n", q.Records, q.Pending)
	}
	if st.Upload.DeletionPending || before.Upload.Registered {
		r.p.Fprintf(r.env.Stdout, "The Security Network is asked to delete what it received from this computer.\n")
	}
	return nil
}

// shortTime is t as a time of day when it is today, else with its date.
func shortTime(t, now time.Time) string {
	if y, m, d := t.Date(); now.Year() == y && now.Month() == m && now.Day() == d {
		return t.Format("15:04")
	}
	return t.Format("2006-01-02 15:04")
}

func cmdQueue(ctx context.Context, r *runner, args []string) error {
	var asJSON bool
	if err := r.parseFlags("queue", args, func(fs *flag.FlagSet) { fs.BoolVar(&asJSON, "json", false, "") }); err != nil {
		return err
	}
	q, err := r.client.Queue(ctx)
	if err != nil {
		return r.wrap(err)
	}
	if asJSON {
		return printJSON(r.env.Stdout, q)
	}
	if len(q.Records) == 0 {
		r.p.Fprintf(r.env.Stdout, "Nothing is waiting to be sent.\n")
		return nil
	}
	r.p.Fprintf(r.env.Stdout, "Programs waiting to be sent: %d; executions: %d (--json shows every field).\n", q.Totals.Programs, q.Totals.Executions)
	if q.Totals.BatchRecords > 0 {
		r.p.Fprintf(r.env.Stdout, "Marked *: the batch waiting for the cloud's answer, sent again as it is until the cloud confirms it.\n")
	}
	tw := tabwriter.NewWriter(r.env.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "\t%s\t%s\t%s\t%s\t%s\n", r.p.Sprintf("SHA-256"), r.p.Sprintf("RUNS"), r.p.Sprintf("LOADED"), r.p.Sprintf("LAST SEEN"), r.p.Sprintf("PATH"))
	for _, rec := range q.Records {
		loaded := r.p.Sprintf("no")
		if rec.Loaded {
			loaded = r.p.Sprintf("yes")
		}
		mark := ""
		if rec.InBatch {
			mark = "*"
		}
		fmt.Fprintf(tw, "%s\t%s…\t%s\t%s\t%s\t%s\n", mark, rec.SHA256[:min(16, len(rec.SHA256))], r.p.Sprintf("%d", rec.ExecCount), loaded,
			rec.LastSeen.Local().Format(time.DateTime), safetext.Line(rec.Path))
	}
	return tw.Flush()
}

func cmdSend(ctx context.Context, r *runner, args []string) error {
	if err := r.parseFlags("send", args, func(*flag.FlagSet) {}); err != nil {
		return err
	}
	res, err := r.client.Upload(ctx)
	var ae *localapi.APIError
	switch {
	case errors.As(err, &ae) && ae.Upload != nil && (ae.Upload.Sent > 0 || ae.Upload.Refused > 0):
		// What was sent and refused before the error, then the error.
		r.sent(*ae.Upload)
		return err
	case errors.As(err, &ae) && ae.StatusCode == http.StatusConflict:
		// Nothing can be sent: said as status says it, when it says so.
		if st, serr := r.client.Status(ctx); serr == nil {
			if problem, hint := sendProblem(r.p, st.Upload); problem != "" && st.Participation.Collecting {
				return &hintError{err: errors.New(problem), hint: hint}
			}
		}
		return err
	case err != nil:
		return r.wrap(err)
	}
	r.sent(res)
	return nil
}

// sent reports exactly what a send did: the records the server accepted,
// those it refused for good (they were dropped) and why, and what still
// waits.
func (r *runner) sent(res api.UploadResult) {
	r.p.Fprintf(r.env.Stdout, "Sent: %d. Still waiting: %d.\n", res.Sent, res.Pending)
	switch {
	case res.Refused > 0 && res.RefusedReason != "":
		r.p.Fprintf(r.env.Stdout, "Refused by the server and dropped: %d (the server said: %s).\n", res.Refused, safetext.Line(res.RefusedReason))
	case res.Refused > 0:
		r.p.Fprintf(r.env.Stdout, "Refused by the server and dropped: %d.\n", res.Refused)
	}
}

func cmdVersion(ctx context.Context, r *runner, args []string) error {
	if err := r.parseFlags("version", args, func(*flag.FlagSet) {}); err != nil {
		return err
	}
	r.p.Fprintf(r.env.Stdout, "cloudprotect %s\n", version.String())
	if r.client == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	if st, err := r.client.Status(ctx); err == nil {
		r.p.Fprintf(r.env.Stdout, "agent %s (%s)\n", st.Agent.Version, r.socket)
	}
	return nil
}
