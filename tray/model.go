package tray

import (
	"fmt"
	"strings"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/icons"
)

// Title is the tray item's title, also its identity on the bus.
const Title = "Cloud protection"

// View is everything the menu shows, gathered by the tray.
type View struct {
	// Status is the agent's latest status, nil while no agent answers.
	Status *api.Status
	// Autostart says whether the tray starts at login; AutostartErr is set
	// when that could not be found out.
	Autostart    bool
	AutostartErr error
	// Asking is true while a Yes/No question about participation is shown.
	Asking bool
	// Now is the current time, for "last sent" in the local time zone.
	Now time.Time
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
	Stats       Item // never clickable
	SendNow     Item
	Autostart   Item // checkbox
	Quit        Item

	// ParticipateAction is what a click on Participate does.
	ParticipateAction Action
}

// Labels of the fixed menu items.
const (
	LabelJoin      = "Participate in Security Network…"
	LabelJoined    = "Participate in Security Network"
	LabelStatement = "Read the Security Network Statement"
	LabelSendNow   = "Send statistics now"
	LabelAutostart = "Start at login"
	LabelQuit      = "Quit"
)

// Build computes the menu for a view. It is a pure function.
func Build(v View) Menu {
	m := Menu{
		Status:      Item{Visible: true},
		Detail:      Item{},
		Participate: Item{Label: LabelJoin, Visible: true},
		Statement:   Item{Label: LabelStatement, Visible: true},
		Stats:       Item{Visible: true},
		SendNow:     Item{Label: LabelSendNow, Visible: true},
		Autostart:   Item{Label: LabelAutostart, Visible: true, Enabled: v.AutostartErr == nil, Checked: v.Autostart},
		Quit:        Item{Label: LabelQuit, Visible: true, Enabled: true},
	}
	s := v.Status
	if s == nil {
		m.Icon = icons.Unreachable
		m.Tooltip = "Cloud protection: agent not running"
		m.Status.Label = "Cloud protection agent is not running"
		m.Detail.Label = "Trying to reconnect…"
		m.Stats.Label = "Statistics: unavailable"
		m.Detail.Visible = true
		return m
	}
	p := s.Participation
	canChange := s.CanChange && !p.Locked
	on := p.State == "participating" && !p.Paused
	var details []string

	switch {
	case on:
		m.Participate = Item{Label: LabelJoined, Visible: true, Checked: true}
		m.ParticipateAction = Leave
		m.Status.Label = "Cloud protection is on"
		if s.Agent.Limited {
			m.Icon = icons.Limited
			reason := s.Agent.LimitedReason
			if reason == "" {
				reason = "the agent sees fewer programs than it should"
			}
			details = append(details, "Limited: "+reason)
		} else {
			m.Icon = icons.Participating
		}
	case p.State == "participating" && p.Paused:
		m.ParticipateAction = Join
		m.Status.Label = "Cloud protection is paused"
		details = append(details, "The Security Network Statement changed: read it and participate again")
		m.Icon = icons.Undecided
	case p.State == "undecided":
		m.ParticipateAction = Join
		m.Status.Label = "Access to Security Network is disabled"
		if canChange {
			details = append(details, "Choose Participate to turn cloud protection on")
			m.Icon = icons.Undecided
		} else {
			m.Icon = icons.Declined
		}
	default: // declined, or a state this tray does not know
		m.ParticipateAction = Join
		m.Status.Label = "Access to Security Network is disabled"
		m.Icon = icons.Declined
	}

	if p.Locked {
		// The organisation decides: say so first, keep the state beside it.
		details = append([]string{m.Status.Label}, details...)
		m.Status.Label = "Managed by your organisation"
	} else if !s.CanChange {
		details = append(details, "Only an administrator can change participation")
	}
	if v.Asking && canChange {
		details = append(details, "Waiting for your answer…")
	}
	if p.PolicyError != "" {
		details = append(details, "Policy file ignored: "+p.PolicyError)
	}
	if p.Notice != "" {
		details = append(details, p.Notice)
	}
	if len(details) > 0 {
		m.Detail = Item{Label: strings.Join(details, " · "), Visible: true}
	}

	m.Participate.Enabled = canChange && !v.Asking
	if !canChange {
		m.ParticipateAction = NoAction
	}
	m.Statement.Enabled = true

	sent := "never sent"
	if t := s.Upload.LastUpload; t != nil && !t.IsZero() {
		sent = "last sent " + when(*t, v.Now)
	}
	m.Stats.Label = fmt.Sprintf("Statistics: %d pending · %s", s.Queue.Pending, sent)
	m.SendNow.Enabled = on && s.Queue.Pending > 0

	m.Tooltip = tooltip(s, on, sent, p.Locked)
	return m
}

func tooltip(s *api.Status, on bool, sent string, locked bool) string {
	p := s.Participation
	var t string
	switch {
	case on && s.Agent.Limited:
		t = fmt.Sprintf("Cloud protection: on, limited · %d pending · %s", s.Queue.Pending, sent)
	case on:
		t = fmt.Sprintf("Cloud protection: on · %d pending · %s", s.Queue.Pending, sent)
	case p.State == "participating":
		t = "Cloud protection: paused until you accept the updated statement"
	case p.State == "undecided" && s.CanChange && !locked:
		t = "Cloud protection: off · waiting for your answer"
	default:
		t = "Cloud protection: off (not participating)"
	}
	if locked {
		t += " · managed by your organisation"
	}
	return t
}

// when formats a past moment for the menu: the time of day if it was today,
// else the date.
func when(t, now time.Time) string {
	if now.IsZero() {
		now = time.Now()
	}
	t = t.In(now.Location())
	y1, m1, d1 := t.Date()
	y2, m2, d2 := now.Date()
	switch {
	case y1 == y2 && m1 == m2 && d1 == d2:
		return t.Format("15:04")
	case y1 == y2:
		return t.Format("2 Jan 15:04")
	default:
		return t.Format("2 Jan 2006")
	}
}
