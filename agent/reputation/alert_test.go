package reputation_test

import (
	"strings"
	"testing"
	"unicode"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/reputation"
	"github.com/cloudprotect/cloudprotect/wire"
)

// TestAlertFromOwnFacts reproduces the phishing attack through alerts: a
// hostile server answers with words of its choosing, and a hostile file
// name carries direction overrides and line breaks. The alert holds only
// the agent's own facts and fixed words.
func TestAlertFromOwnFacts(t *testing.T) {
	t.Parallel()
	const phish = "URGENT: your PC is infected, call the helpdesk at +1 555 0100"
	sha := hash(7)
	tests := []struct {
		name        string
		path        string
		rep         wire.Reputation
		wantProgram string
		wantVerdict string
		wantSource  string
	}{
		{"plain", "~/Downloads/tool", wire.Reputation{SHA256: sha, Verdict: "malicious", Source: "analyst"}, "tool", "malicious", "analyst"},
		{"server's words as source", "~/Downloads/tool", wire.Reputation{SHA256: sha, Verdict: "malicious", Source: phish}, "tool", "malicious", ""},
		{"server's words as verdict", "~/Downloads/tool", wire.Reputation{SHA256: sha, Verdict: phish, Source: "feed"}, "tool", "unknown", "feed"},
		{"direction override", "~/Downloads/invoice\u202efdp.exe", wire.Reputation{Verdict: "untrusted", Source: "prevalence"}, "invoice?fdp.exe", "untrusted", "prevalence"},
		{"line breaks and escapes", "~/x/setup\n" + phish + "\x1b[2J\u2028", wire.Reputation{Verdict: "malicious", Source: "feed"}, "setup?" + phish + "?[2J?", "malicious", "feed"},
		{"isolates and zero width", "/tmp/a\u2066b\u200bc\u061c", wire.Reputation{Verdict: "malicious", Source: "feed"}, "a?b?c?", "malicious", "feed"},
		{"invalid UTF-8", "/tmp/\xff\xfeok", wire.Reputation{Verdict: "malicious", Source: "feed"}, "?ok", "malicious", "feed"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			a := reputation.AlertFor(sha, tc.path, tc.rep)
			if a.Program != tc.wantProgram || a.Verdict != tc.wantVerdict || a.Source != tc.wantSource || a.SHA256 != sha || a.Action != api.AlertActionAlerted {
				t.Fatalf("AlertFor = %+v; want program %q, verdict %q, source %q", a, tc.wantProgram, tc.wantVerdict, tc.wantSource)
			}
			for _, f := range []string{a.Path, a.Program, a.Verdict, a.Source} {
				for _, r := range f {
					if unicode.IsControl(r) || unicode.Is(unicode.Cf, r) || r == '\u2028' {
						t.Errorf("alert field %q holds %U", f, r)
					}
				}
			}
			if tc.rep.Source == phish && strings.Contains(a.Source+a.Program+a.Path, "helpdesk") {
				t.Errorf("the server's words reached the alert: %+v", a)
			}
		})
	}
}
