package cli

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
)

func cmdStatus(ctx context.Context, r *runner, args []string) error {
	var asJSON bool
	if err := parseFlags("status", args, r.env, func(fs *flag.FlagSet) { fs.BoolVar(&asJSON, "json", false, "") }); err != nil {
		return err
	}
	st, err := r.client.Status(ctx)
	if err != nil {
		return r.wrap(err)
	}
	if asJSON {
		return printJSON(r.env.Stdout, st)
	}
	printStatus(r.env.Stdout, st)
	return nil
}

// Headline says the state of cloud protection in one line.
func Headline(st api.Status) string {
	p := st.Participation
	switch {
	case p.Locked && p.State == "participating":
		return "Cloud protection is on (managed by your organisation)"
	case p.Locked:
		return "Access to the Security Network is disabled by your organisation"
	case p.Paused:
		return fmt.Sprintf("Cloud protection is paused: the statement changed (version %d); agree to it again to continue", p.StatementVersion)
	case p.State == "participating":
		return "Cloud protection is on"
	case p.State == "declined":
		return "Access to the Security Network is disabled"
	default:
		return "Cloud protection is waiting for your answer: participate in the Security Network?"
	}
}

func printStatus(w io.Writer, st api.Status) {
	p := st.Participation
	fmt.Fprintln(w, Headline(st))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	state := p.State
	if p.Via != "" && p.Since != nil {
		state += fmt.Sprintf(" (via %s, %s)", p.Via, p.Since.Local().Format("2006-01-02 15:04"))
	}
	fmt.Fprintf(tw, "participation:\t%s\n", state)
	fmt.Fprintf(tw, "statement:\tversion %d, accepted %d\n", p.StatementVersion, p.AcceptedVersion)
	if p.Locked {
		fmt.Fprintf(tw, "policy:\t%s\n", p.Policy)
	}
	if p.PolicyError != "" {
		fmt.Fprintf(tw, "policy ignored:\t%s (%s)\n", p.PolicyError, p.Policy)
	}
	source := st.Agent.ExecSource
	if source == "" {
		source = "none (not collecting)"
	}
	fmt.Fprintf(tw, "agent:\t%s mode, version %s, exec source %s\n", st.Agent.Mode, st.Agent.Version, source)
	if st.Agent.Limited {
		fmt.Fprintf(tw, "limited:\t%s\n", st.Agent.LimitedReason)
	}
	if st.Agent.EventsLost > 0 {
		fmt.Fprintf(tw, "events lost:\t%d of %d\n", st.Agent.EventsLost, st.Agent.EventsSeen+st.Agent.EventsLost)
	}
	fmt.Fprintf(tw, "queue:\t%d pending, %d records", st.Queue.Pending, st.Queue.Records)
	if st.Queue.Evicted > 0 {
		fmt.Fprintf(tw, ", %d dropped because the queue was full", st.Queue.Evicted)
	}
	fmt.Fprintln(tw)
	u := st.Upload
	fmt.Fprintf(tw, "server:\t%s\n", u.Server)
	if u.LastUpload != nil {
		fmt.Fprintf(tw, "last sent:\t%s (%d records in all)\n", u.LastUpload.Local().Format("2006-01-02 15:04:05"), u.RecordsSent)
	}
	if u.LastError != "" {
		fmt.Fprintf(tw, "last error:\t%s\n", u.LastError)
	}
	if u.NextAttempt != nil {
		fmt.Fprintf(tw, "next attempt:\t%s\n", u.NextAttempt.Local().Format("2006-01-02 15:04:05"))
	}
	if u.DeletionPending {
		fmt.Fprintf(tw, "deletion:\tasked of the server, waiting for its confirmation\n")
	}
	tw.Flush()
	if p.Notice != "" {
		fmt.Fprintf(w, "\nnote: %s\n", p.Notice)
	}
}

func cmdStatement(ctx context.Context, r *runner, args []string) error {
	if err := parseFlags("statement", args, r.env, func(*flag.FlagSet) {}); err != nil {
		return err
	}
	s, err := r.client.Statement(ctx)
	if err != nil {
		return r.wrap(err)
	}
	fmt.Fprintf(r.env.Stdout, "%s\n(statement version %d)\n", strings.TrimRight(s.Text, "\n"), s.Version)
	return nil
}

// Question is what a person answers to participate.
const Question = "I agree to participate in the Security Network"

func cmdParticipate(ctx context.Context, r *runner, args []string) error {
	var yes bool
	if err := parseFlags("participate", args, r.env, func(fs *flag.FlagSet) { fs.BoolVar(&yes, "yes", false, "") }); err != nil {
		return err
	}
	s, err := r.client.Statement(ctx)
	if err != nil {
		return r.wrap(err)
	}
	if !yes {
		fmt.Fprintf(r.env.Stdout, "%s\n\n", strings.TrimRight(s.Text, "\n"))
		ok, err := r.confirm(Question, "--yes")
		if err != nil {
			return err
		}
		if !ok {
			fmt.Fprintln(r.env.Stdout, "Nothing changed: you are not participating.")
			return nil
		}
	}
	st, err := r.client.SetParticipation(ctx, api.ParticipationRequest{
		Participate: true, StatementVersion: s.Version, Via: "cli",
	})
	if err != nil {
		return r.wrap(err)
	}
	fmt.Fprintf(r.env.Stdout, "%s. Thank you for participating in the Security Network (statement version %d).\n",
		Headline(st), st.Participation.AcceptedVersion)
	return nil
}

func cmdLeave(ctx context.Context, r *runner, args []string) error {
	var yes bool
	if err := parseFlags("leave", args, r.env, func(fs *flag.FlagSet) { fs.BoolVar(&yes, "yes", false, "") }); err != nil {
		return err
	}
	if !yes {
		ok, err := r.confirm("Stop participating in the Security Network? Statistics not sent yet are deleted, "+
			"and the network is asked to delete what it received", "--yes")
		if err != nil {
			return err
		}
		if !ok {
			fmt.Fprintln(r.env.Stdout, "Nothing changed.")
			return nil
		}
	}
	st, err := r.client.SetParticipation(ctx, api.ParticipationRequest{Participate: false, Via: "cli"})
	if err != nil {
		return r.wrap(err)
	}
	fmt.Fprintf(r.env.Stdout, "%s. You no longer participate: pending statistics were deleted (%d pending).\n",
		Headline(st), st.Queue.Pending)
	return nil
}

func cmdQueue(ctx context.Context, r *runner, args []string) error {
	var asJSON bool
	if err := parseFlags("queue", args, r.env, func(fs *flag.FlagSet) { fs.BoolVar(&asJSON, "json", false, "") }); err != nil {
		return err
	}
	q, err := r.client.Queue(ctx)
	if err != nil {
		return r.wrap(err)
	}
	if asJSON {
		return printJSON(r.env.Stdout, q)
	}
	if q.Pending == 0 {
		fmt.Fprintln(r.env.Stdout, "Nothing is waiting to be sent.")
		return nil
	}
	fmt.Fprintf(r.env.Stdout, "%d records pending; the next upload sends these %d (use --json for every field):\n",
		q.Pending, len(q.Batch.Records))
	tw := tabwriter.NewWriter(r.env.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SHA-256\tRUNS\tLOADED\tLAST SEEN\tPATH")
	for _, rec := range q.Batch.Records {
		fmt.Fprintf(tw, "%s…\t%d\t%v\t%s\t%s\n", rec.SHA256[:min(16, len(rec.SHA256))], rec.ExecCount, rec.Loaded,
			rec.LastSeen.Local().Format(time.DateTime), rec.Path)
	}
	return tw.Flush()
}

func cmdSend(ctx context.Context, r *runner, args []string) error {
	if err := parseFlags("send", args, r.env, func(*flag.FlagSet) {}); err != nil {
		return err
	}
	res, err := r.client.Upload(ctx)
	if err != nil {
		return r.wrap(err)
	}
	fmt.Fprintf(r.env.Stdout, "%s (%d sent, %d still pending)\n", res.Message, res.Sent, res.Pending)
	return nil
}
