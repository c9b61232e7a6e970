package tray

import (
	"errors"
	"testing"
	"time"

	"golang.org/x/text/language"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/icons"
	"github.com/cloudprotect/cloudprotect/tray/i18n"
)

var (
	testNow  = time.Date(2026, 3, 14, 15, 30, 0, 0, time.UTC)
	sentAt   = time.Date(2026, 3, 14, 10, 21, 0, 0, time.UTC)
	sentLong = time.Date(2025, 11, 2, 8, 0, 0, 0, time.UTC)
)

// status builds an agent status; the options adjust it.
func status(state string, opts ...func(*api.Status)) *api.Status {
	s := &api.Status{
		Participation: api.Participation{State: api.State(state), StatementVersion: 3},
		Agent:         api.AgentInfo{Mode: "system", ExecSource: "fanotify"},
		CanChange:     true,
	}
	if state == "participating" {
		s.Participation.AcceptedVersion = 3
		s.Participation.Collecting = true
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

func pending(n int) func(*api.Status) { return func(s *api.Status) { s.Queue.Pending = n } }
func lastSent(t time.Time) func(*api.Status) {
	return func(s *api.Status) { s.Upload.LastUpload = &t }
}
func locked(s *api.Status) {
	s.Participation.Locked = true
	s.Participation.Policy = "/etc/cloudprotect/policy.json"
}
func readOnly(s *api.Status) { s.CanChange = false }
func paused(s *api.Status) {
	s.Participation.Paused = true
	s.Participation.Collecting = false
	s.Participation.AcceptedVersion = 2
}
func noServer(s *api.Status) {
	s.Upload.Problem = "no Security Network server is configured: nothing is sent"
	s.Upload.ProblemHint = `set "server" in /etc/cloudprotect/policy.json`
}
func serverRefused(s *api.Status) {
	s.Upload.Server = "http://10.0.0.1"
	s.Upload.Problem = `server "http://10.0.0.1" is not used: plain HTTP is used only to a server on this computer (loopback)`
	s.Upload.ProblemHint = "use https://"
}
func limited(reason string) func(*api.Status) {
	return func(s *api.Status) { s.Agent.Limited = true; s.Agent.LimitedReason = reason }
}

func TestBuild(t *testing.T) {
	t.Parallel()
	type want struct {
		icon          icons.State
		tooltip       string
		status        string
		detail        string // "" means hidden
		participate   i18n.Key
		canParticiate bool
		checked       bool
		action        Action
		stats         string
		sendNow       bool
		statement     bool
	}
	tests := []struct {
		name string
		view View
		want want
	}{
		{
			name: "unreachable",
			view: View{},
			want: want{
				icon: icons.Unreachable, tooltip: "Cloud protection: agent not running",
				status: "Cloud protection agent is not running", detail: "Trying to reconnect…",
				participate: LabelJoin, stats: "Statistics: unavailable",
			},
		},
		{
			name: "undecided",
			view: View{Status: status("undecided")},
			want: want{
				icon: icons.Undecided, tooltip: "Cloud protection: off · waiting for your answer",
				status: "Cloud protection is off: waiting for your answer", detail: "Choose Participate to turn cloud protection on",
				participate: LabelJoin, canParticiate: true, action: Join,
				stats: "Statistics: 0 pending · never sent", statement: true,
			},
		},
		{
			name: "undecided while asking",
			view: View{Status: status("undecided"), Asking: true},
			want: want{
				icon: icons.Undecided, tooltip: "Cloud protection: off · waiting for your answer",
				status: "Cloud protection is off: waiting for your answer", detail: "Choose Participate to turn cloud protection on · Waiting for your answer…",
				participate: LabelJoin, action: Join,
				stats: "Statistics: 0 pending · never sent", statement: true,
			},
		},
		{
			name: "participating",
			view: View{Status: status("participating", pending(12), lastSent(sentAt)), Now: testNow},
			want: want{
				icon: icons.Participating, tooltip: "Cloud protection: on · 12 pending · last sent 10:21",
				status:      "Cloud protection is on",
				participate: LabelJoined, canParticiate: true, checked: true, action: Leave,
				stats: "Statistics: 12 pending · last sent 10:21", sendNow: true, statement: true,
			},
		},
		{
			name: "participating, nothing pending, sent last year",
			view: View{Status: status("participating", lastSent(sentLong)), Now: testNow},
			want: want{
				icon: icons.Participating, tooltip: "Cloud protection: on · 0 pending · last sent Nov 2, 2025",
				status:      "Cloud protection is on",
				participate: LabelJoined, canParticiate: true, checked: true, action: Leave,
				stats: "Statistics: 0 pending · last sent Nov 2, 2025", statement: true,
			},
		},
		{
			name: "participating, limited",
			view: View{Status: status("participating", pending(3), limited("user mode: programs are seen by polling /proc")), Now: testNow},
			want: want{
				icon: icons.Limited, tooltip: "Cloud protection: on, limited · 3 pending · never sent",
				status: "Cloud protection is on", detail: "Limited: user mode: programs are seen by polling /proc",
				participate: LabelJoined, canParticiate: true, checked: true, action: Leave,
				stats: "Statistics: 3 pending · never sent", sendNow: true, statement: true,
			},
		},
		{
			name: "participating, limited without reason",
			view: View{Status: status("participating", limited(""))},
			want: want{
				icon: icons.Limited, tooltip: "Cloud protection: on, limited · 0 pending · never sent",
				status: "Cloud protection is on", detail: "Limited: the agent sees fewer programs than it should",
				participate: LabelJoined, canParticiate: true, checked: true, action: Leave,
				stats: "Statistics: 0 pending · never sent", statement: true,
			},
		},
		{
			name: "participating, no server configured",
			view: View{Status: status("participating", pending(7), noServer)},
			want: want{
				icon: icons.Participating, tooltip: "Cloud protection: on · 7 pending · never sent",
				status: "Cloud protection is on", detail: "Nothing is sent: no Security Network server is configured",
				participate: LabelJoined, canParticiate: true, checked: true, action: Leave,
				stats: "Statistics: 7 pending · never sent", statement: true,
			},
		},
		{
			name: "participating, the server configured is not used",
			view: View{Status: status("participating", pending(7), serverRefused)},
			want: want{
				icon: icons.Participating, tooltip: "Cloud protection: on · 7 pending · never sent",
				status: "Cloud protection is on", detail: `Nothing is sent: server "http://10.0.0.1" is not used: plain HTTP is used only to a serv…`,
				participate: LabelJoined, canParticiate: true, checked: true, action: Leave,
				stats: "Statistics: 7 pending · never sent", statement: true,
			},
		},
		{
			name: "declined, no server configured",
			view: View{Status: status("declined", noServer)},
			want: want{
				icon: icons.Declined, tooltip: "Cloud protection: off (not participating)",
				status:      "Cloud protection is off: you do not participate in the Security Network",
				participate: LabelJoin, canParticiate: true, action: Join,
				stats: "Statistics: 0 pending · never sent", statement: true,
			},
		},
		{
			name: "paused by a new statement",
			view: View{Status: status("participating", paused, pending(4))},
			want: want{
				icon: icons.Undecided, tooltip: "Cloud protection: paused until you accept the updated statement",
				status: "Cloud protection is paused: the Security Network Statement changed", detail: "Read the updated statement and participate again",
				participate: LabelJoin, canParticiate: true, action: Join,
				stats: "Statistics: 4 pending · never sent", statement: true,
			},
		},
		{
			name: "declined",
			view: View{Status: status("declined")},
			want: want{
				icon: icons.Declined, tooltip: "Cloud protection: off (not participating)",
				status:      "Cloud protection is off: you do not participate in the Security Network",
				participate: LabelJoin, canParticiate: true, action: Join,
				stats: "Statistics: 0 pending · never sent", statement: true,
			},
		},
		{
			name: "locked on",
			view: View{Status: status("participating", locked, pending(1), lastSent(sentAt)), Now: testNow},
			want: want{
				icon: icons.Participating, tooltip: "Cloud protection: on · 1 pending · last sent 10:21 · managed by your organisation",
				status:      "Cloud protection is on (managed by your organisation)",
				participate: LabelJoined, checked: true,
				stats: "Statistics: 1 pending · last sent 10:21", sendNow: true, statement: true,
			},
		},
		{
			name: "locked off",
			view: View{Status: status("declined", locked)},
			want: want{
				icon: icons.Declined, tooltip: "Cloud protection: off (not participating) · managed by your organisation",
				status:      "Cloud protection is off: your organisation manages participation",
				participate: LabelJoin,
				stats:       "Statistics: 0 pending · never sent", statement: true,
			},
		},
		{
			name: "cannot change, participating",
			view: View{Status: status("participating", readOnly)},
			want: want{
				icon: icons.Participating, tooltip: "Cloud protection: on · 0 pending · never sent",
				status: "Cloud protection is on", detail: "Only an administrator can change participation",
				participate: LabelJoined, checked: true,
				stats: "Statistics: 0 pending · never sent", statement: true,
			},
		},
		{
			name: "cannot change, undecided",
			view: View{Status: status("undecided", readOnly)},
			want: want{
				icon: icons.Declined, tooltip: "Cloud protection: off (not participating)",
				status: "Cloud protection is off: waiting for your answer", detail: "Only an administrator can change participation",
				participate: LabelJoin,
				stats:       "Statistics: 0 pending · never sent", statement: true,
			},
		},
		{
			name: "policy file ignored",
			view: View{Status: status("declined", func(s *api.Status) { s.Participation.PolicyError = "line 3: unknown field \"particpate\"" })},
			want: want{
				icon: icons.Declined, tooltip: "Cloud protection: off (not participating)",
				status: "Cloud protection is off: you do not participate in the Security Network", detail: "Policy file ignored: line 3: unknown field \"particpate\"",
				participate: LabelJoin, canParticiate: true, action: Join,
				stats: "Statistics: 0 pending · never sent", statement: true,
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			m := Build(tt.view, i18n.English())
			w := tt.want
			check := func(what string, got, want any) {
				t.Helper()
				if got != want {
					t.Errorf("%s = %v, want %v", what, got, want)
				}
			}
			check("icon", m.Icon, w.icon)
			check("tooltip", m.Tooltip, w.tooltip)
			check("status", m.Status.Label, w.status)
			check("status enabled", m.Status.Enabled, false)
			check("detail", m.Detail.Label, w.detail)
			check("detail visible", m.Detail.Visible, w.detail != "")
			check("participate label", m.Participate.Label, string(w.participate))
			check("participate enabled", m.Participate.Enabled, w.canParticiate)
			check("participate checked", m.Participate.Checked, w.checked)
			check("action", m.ParticipateAction, w.action)
			check("stats", m.Stats.Label, w.stats)
			check("stats enabled", m.Stats.Enabled, false)
			check("send now enabled", m.SendNow.Enabled, w.sendNow)
			check("statement enabled", m.Statement.Enabled, w.statement)
			check("quit enabled", m.Quit.Enabled, true)
			for name, it := range map[string]Item{"status": m.Status, "participate": m.Participate, "statement": m.Statement, "stats": m.Stats, "send": m.SendNow, "autostart": m.Autostart, "quit": m.Quit} {
				if !it.Visible || it.Label == "" {
					t.Errorf("%s item hidden or without label: %+v", name, it)
				}
			}
		})
	}
}

func TestBuildAutostart(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name             string
		view             View
		checked, enabled bool
	}{
		{"on", View{Autostart: true}, true, true},
		{"off", View{Status: status("declined")}, false, true},
		{"unknown", View{AutostartErr: errors.New("no home")}, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			a := Build(tt.view, i18n.English()).Autostart
			if a.Label != string(LabelAutostart) || a.Checked != tt.checked || a.Enabled != tt.enabled {
				t.Errorf("autostart item = %+v, want checked %v enabled %v", a, tt.checked, tt.enabled)
			}
		})
	}
}

func TestWhen(t *testing.T) {
	t.Parallel()
	paris := time.FixedZone("CET", 3600)
	now := time.Date(2026, 3, 14, 23, 30, 0, 0, paris)
	tests := []struct {
		name string
		t    time.Time
		want string
	}{
		{"today in local time", time.Date(2026, 3, 14, 9, 21, 0, 0, time.UTC), "10:21"},
		{"earlier this year", time.Date(2026, 1, 5, 7, 0, 0, 0, time.UTC), "Jan 5, 08:00"},
		{"last year", time.Date(2025, 12, 31, 7, 0, 0, 0, time.UTC), "Dec 31, 2025"},
		{"in German", time.Date(2026, 1, 5, 7, 0, 0, 0, time.UTC), "5.1., 08:00"},
		{"in Russian", time.Date(2025, 12, 31, 7, 0, 0, 0, time.UTC), "31.12.2025"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			p := i18n.English()
			switch tt.name {
			case "in German":
				p = i18n.New(language.German)
			case "in Russian":
				p = i18n.New(language.Russian)
			}
			if got := when(tt.t, now, p); got != tt.want {
				t.Errorf("when = %q, want %q", got, tt.want)
			}
		})
	}
}
