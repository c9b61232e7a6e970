package tray

import (
	"strings"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/safetext"
	"github.com/cloudprotect/cloudprotect/icons"
	"github.com/cloudprotect/cloudprotect/tray/i18n"
)

// Title is the tray item's title, also its identity on the bus. It is the
// product's name and stays the same in every language.
const Title = "Cloud protection"

// MaxAlerts is how many recent detections the menu lists.
const MaxAlerts = 5

// View is everything the menu shows, gathered by the tray.
type View struct {
	// Status is the agent's latest status, nil while no agent answers.
	Status *api.Status
	// AgentHint says how to start the agent, for the menu shown while
	// none answers.
	AgentHint string
	// Alerts are the recent detections the person may see, newest first,
	// each with whether the person has seen it.
	Alerts []SeenAlert
	// Autostart says whether the tray starts at login; AutostartErr is set
	// when that could not be found out.
	Autostart    bool
	AutostartErr error
	// Asking is true while a Yes/No question about participation is shown.
	Asking bool
	// Now is the current time, for "last sent" in the local time zone.
	Now time.Time
}

// SeenAlert is an alert and whether the person has seen it.
type SeenAlert struct {
	Alert api.Alert
	Seen  bool
}

// Action is what a click on the participation item does.
type Action int

// Participation actions.
const (
	NoAction Action = iota
	Join            // ask to participate
	Leave           // ask to stop participating
)

// Item is one menu entry as shown.
type Item struct {
	Label   string
	Enabled bool
	Visible bool
	Checked bool
}

// Menu is the tray as the person sees it: icon, tooltip and menu items.
// It is computed from a View by Build and applied by the systray layer.
type Menu struct {
	Icon    icons.State
	Tooltip string

	Status      Item // what is going on, never clickable
	Detail      Item // why, or what to do; hidden when there is nothing to say
	Participate Item // checkbox
	Statement   Item
	Protection  Item // whether programs are blocked; never clickable

	AlertsHeader Item // "Recent detections"; never clickable
	Alerts       [MaxAlerts]Item
	MarkSeen     Item

	Stats     Item // never clickable
	SendNow   Item
	Autostart Item // checkbox
	Quit      Item

	// ParticipateAction is what a click on Participate does.
	ParticipateAction Action
}

// Labels of the fixed menu items.
const (
	LabelJoin      i18n.Key = "Participate in Security Network…"
	LabelJoined    i18n.Key = "Participate in Security Network"
	LabelStatement i18n.Key = "Read the Security Network Statement"
	LabelSendNow   i18n.Key = "Send statistics now"
	LabelAutostart i18n.Key = "Start at login"
	LabelQuit      i18n.Key = "Quit"
	LabelMarkSeen  i18n.Key = "Mark detections as seen"
)

// Build computes the menu for a view in the printer's language. It is a
// pure function.
func Build(v View, p *i18n.Printer) Menu {
	m := Menu{
		Status:      Item{Visible: true},
		Participate: Item{Label: p.Sprintf(LabelJoin), Visible: true},
		Statement:   Item{Label: p.Sprintf(LabelStatement), Visible: true},
		Stats:       Item{Visible: true},
		SendNow:     Item{Label: p.Sprintf(LabelSendNow), Visible: true},
		Autostart:   Item{Label: p.Sprintf(LabelAutostart), Visible: true, Enabled: v.AutostartErr == nil, Checked: v.Autostart},
		Quit:        Item{Label: p.Sprintf(LabelQuit), Visible: true, Enabled: true},
	}
	unseen := buildAlerts(&m, v, p)
	s := v.Status
	if s == nil {
		m.Icon = icons.Unreachable
		m.Tooltip = p.Sprintf("Cloud protection: agent not running")
		m.Status.Label = i18n.AgentDown(p)
		hint := v.AgentHint
		if hint == "" {
			hint = p.Sprintf("Trying to reconnect…")
		}
		m.Detail = Item{Label: hint, Visible: true}
		m.Stats.Label = p.Sprintf("Statistics: unavailable")
		return m
	}
	m.Statement.Enabled = true
	pa := s.Participation
	canChange := s.CanChange && !pa.Locked
	on := pa.State == api.StateParticipating && !pa.Paused
	var details []string

	m.Status.Label = i18n.Headline(p, *s)
	switch {
	case on:
		m.Participate = Item{Label: p.Sprintf(LabelJoined), Visible: true, Checked: true}
		m.ParticipateAction = Leave
		if s.Agent.Limited {
			m.Icon = icons.Limited
			reason := s.Agent.LimitedReason
			if reason == "" {
				reason = p.Sprintf("the agent sees fewer programs than it should")
			}
			details = append(details, p.Sprintf("Limited: %s", short(reason, 72)))
		} else {
			m.Icon = icons.Participating
		}
	case pa.State == api.StateParticipating && pa.Paused:
		m.ParticipateAction = Join
		details = append(details, p.Sprintf("Read the updated statement and participate again"))
		m.Icon = icons.Undecided
	case pa.State == api.StateUndecided && canChange:
		m.ParticipateAction = Join
		details = append(details, p.Sprintf("Choose Participate to turn cloud protection on"))
		m.Icon = icons.Undecided
	default: // declined, locked, or a state this tray does not know
		m.ParticipateAction = Join
		m.Icon = icons.Declined
	}
	if unseen > 0 {
		m.Icon = icons.Threat
	}

	if !pa.Locked && !s.CanChange {
		details = append(details, p.Sprintf("Only an administrator can change participation"))
	}
	if v.Asking && canChange {
		details = append(details, p.Sprintf("Waiting for your answer…"))
	}
	if pa.PolicyError != "" {
		details = append(details, p.Sprintf("Policy file ignored: %s", short(pa.PolicyError, 72)))
	}
	if pa.Notice != "" {
		details = append(details, safetext.Line(pa.Notice))
	}
	sending := s.Upload.Problem == ""
	if on && !sending {
		// Why nothing is sent; `cloudprotect status` says how to fix it.
		if strings.TrimSpace(s.Upload.Server) == "" {
			details = append(details, p.Sprintf("Nothing is sent: no Security Network server is configured"))
		} else {
			details = append(details, p.Sprintf("Nothing is sent: %s", short(s.Upload.Problem, 72)))
		}
	}
	if len(details) > 0 {
		m.Detail = Item{Label: strings.Join(details, " · "), Visible: true}
	}

	m.Participate.Enabled = canChange && !v.Asking
	if !canChange {
		m.ParticipateAction = NoAction
	}
	m.Protection = protection(s, on, p)

	sent := p.Sprintf("never sent")
	if t := s.Upload.LastUpload; t != nil && !t.IsZero() {
		sent = p.Sprintf("last sent %s", when(*t, v.Now, p))
	}
	m.Stats.Label = p.Sprintf("Statistics: %d pending · %s", s.Queue.Pending, sent)
	m.SendNow.Enabled = on && sending && s.Queue.Pending > 0

	m.Tooltip = tooltip(s, on, sent, unseen, p)
	return m
}

// buildAlerts fills the detections part of the menu and returns how many
// the person has not seen.
func buildAlerts(m *Menu, v View, p *i18n.Printer) int {
	unseen := 0
	for _, a := range v.Alerts {
		if !a.Seen {
			unseen++
		}
	}
	if len(v.Alerts) == 0 {
		return 0
	}
	m.AlertsHeader = Item{Label: p.Sprintf("Recent detections"), Visible: true}
	if unseen > 0 {
		m.AlertsHeader.Label = p.Sprintf("Recent detections (%d new)", unseen)
		m.MarkSeen = Item{Label: p.Sprintf(LabelMarkSeen), Visible: true, Enabled: true}
	}
	for i, a := range v.Alerts {
		if i == MaxAlerts {
			break
		}
		m.Alerts[i] = Item{Label: alertLabel(a, v.Now, p), Visible: true, Enabled: true}
	}
	return unseen
}

func alertLabel(a SeenAlert, now time.Time, p *i18n.Printer) string {
	program := short(a.Alert.Program, 40)
	if program == "" {
		program = short(a.Alert.Path, 40)
	}
	var s string
	if a.Alert.Action == api.AlertActionBlocked {
		s = p.Sprintf("Blocked %s", program)
	} else {
		s = p.Sprintf("Detected %s", program)
	}
	if !a.Alert.Time.IsZero() {
		s += " · " + when(a.Alert.Time, now, p)
	}
	if !a.Seen {
		s = "● " + s
	}
	return s
}

func protection(s *api.Status, on bool, p *i18n.Printer) Item {
	pr := s.Protection
	it := Item{Visible: on}
	switch {
	case pr.Active && pr.Blocked > 0:
		it.Label = p.Sprintf("Blocking malicious programs · %d blocked", pr.Blocked)
	case pr.Active:
		it.Label = p.Sprintf("Blocking malicious programs")
	case pr.Mode == "alert":
		it.Label = p.Sprintf("Alerts only: your organisation does not allow blocking")
	default:
		it.Label = p.Sprintf("Not blocking: alerts only")
	}
	return it
}

func tooltip(s *api.Status, on bool, sent string, unseen int, p *i18n.Printer) string {
	pa := s.Participation
	var t string
	switch {
	case on && s.Agent.Limited:
		t = p.Sprintf("Cloud protection: on, limited · %d pending · %s", s.Queue.Pending, sent)
	case on:
		t = p.Sprintf("Cloud protection: on · %d pending · %s", s.Queue.Pending, sent)
	case pa.State == api.StateParticipating:
		t = p.Sprintf("Cloud protection: paused until you accept the updated statement")
	case pa.State == api.StateUndecided && s.CanChange && !pa.Locked:
		t = p.Sprintf("Cloud protection: off · waiting for your answer")
	default:
		t = p.Sprintf("Cloud protection: off (not participating)")
	}
	if pa.Locked {
		t += p.Sprintf(" · managed by your organisation")
	}
	if unseen > 0 {
		t = p.Sprintf("%d new detections", unseen) + " · " + t
	}
	return t
}

// Time layouts, written as each language writes a time.
const (
	layoutToday    i18n.Key = "15:04"
	layoutThisYear i18n.Key = "Jan 2, 15:04"
	layoutOlder    i18n.Key = "Jan 2, 2006"
)

// when formats a past moment for the menu: the time of day if it was today,
// else the date.
func when(t, now time.Time, p *i18n.Printer) string {
	if now.IsZero() {
		now = time.Now()
	}
	t = t.In(now.Location())
	y1, m1, d1 := t.Date()
	y2, m2, d2 := now.Date()
	switch {
	case y1 == y2 && m1 == m2 && d1 == d2:
		return t.Format(p.Sprintf(layoutToday))
	case y1 == y2:
		return t.Format(p.Sprintf(layoutThisYear))
	default:
		return t.Format(p.Sprintf(layoutOlder))
	}
}
