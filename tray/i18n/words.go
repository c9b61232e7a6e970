package i18n

import "github.com/cloudprotect/cloudprotect/agent/api"

// Headline says the state of cloud protection in one line. The tray's
// menu and the command line's status both use it, so the same state has
// the same words everywhere.
func Headline(p *Printer, st api.Status) string {
	pa := st.Participation
	switch {
	case pa.Locked && pa.State == api.StateParticipating:
		return p.Sprintf("Cloud protection is on (managed by your organisation)")
	case pa.Locked:
		return p.Sprintf("Cloud protection is off: your organisation manages participation")
	case pa.State == api.StateParticipating && pa.Paused:
		return p.Sprintf("Cloud protection is paused: the Security Network Statement changed")
	case pa.State == api.StateParticipating:
		return p.Sprintf("Cloud protection is on")
	case pa.State == api.StateDeclined:
		return p.Sprintf("Cloud protection is off: you do not participate in the Security Network")
	default:
		return p.Sprintf("Cloud protection is off: waiting for your answer")
	}
}

// AgentDown is what the tray and the command line say when no agent
// answers.
func AgentDown(p *Printer) string {
	return p.Sprintf("Cloud protection agent is not running")
}
