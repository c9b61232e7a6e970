package consent

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzParsePolicy checks that any policy file either is refused whole or
// gives a policy that is valid and reads back the same.
func FuzzParsePolicy(f *testing.F) {
	for _, s := range []string{
		`{}`,
		`{"participation":"off","admin_group":"sudo","server":"https://cloud.example.org"}`,
		`{"participation":"on"}`,
		`{"participation":"user","server":"http://127.0.0.1:8787/x"}`,
		`{"participation":"of"`,
		`{"participate":"on"}`,
		`{"admin_group":"x y"}`,
		`{"server":"ftp://x"}`,
		`{"server":"https://"}`,
		`{}{}`,
		`"on"`,
		"\xef\xbb\xbf{}",
		`{"participation":"on","participation":"off"}`,
		`{"admin_group":"wheel$"}`,
		`null`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := ParsePolicy(b)
		if err != nil {
			if p != (Policy{}) {
				t.Fatalf("refused policy %q half-applied: %+v", b, p)
			}
			if err.Error() == "" {
				t.Fatalf("empty error for %q", b)
			}
			return
		}
		switch p.Participation {
		case PolicyUser, PolicyOn, PolicyOff:
		default:
			t.Fatalf("policy %q gives participation %q", b, p.Participation)
		}
		if p.Locked() != (p.Participation != PolicyUser) {
			t.Fatalf("Locked() = %v for %q", p.Locked(), p.Participation)
		}
		if p.AdminGroup != "" && !groupName.MatchString(p.AdminGroup) {
			t.Fatalf("admin group %q accepted", p.AdminGroup)
		}
		if strings.ContainsAny(p.AdminGroup, " \n/") {
			t.Fatalf("admin group %q", p.AdminGroup)
		}
		again, err := json.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		p2, err := ParsePolicy(again)
		if err != nil || p2 != p {
			t.Fatalf("policy %+v does not read back: %+v %v", p, p2, err)
		}
	})
}

// FuzzConsentRecord checks that any consent.json either loads as a
// record that validates, or is set aside with a notice and read as
// Undecided: a damaged file never means "participating".
func FuzzConsentRecord(f *testing.F) {
	good := `{"format_version":1,"state":"participating","accepted_version":1,"time":"2026-11-28T10:00:00Z","via":"cli","uid":0}`
	for _, s := range []string{
		good,
		good[:len(good)/2],
		`{"format_version":1,"state":"declined","accepted_version":0,"time":"2026-11-28T10:00:00Z","via":"tray","uid":1000}`,
		`{"format_version":1,"state":"participating","accepted_version":0}`,
		`{"format_version":1,"state":"declined","accepted_version":3}`,
		`{"format_version":1,"state":"participating","accepted_version":1,"via":"policy"}`,
		`{"format_version":2,"state":"undecided"}`,
		`{"format_version":1,"state":"Participating","accepted_version":1}`,
		`{"format_version":1,"state":"participating","accepted_version":-1}`,
		`{"format_version":1,"state":"participating","accepted_version":1,"time":"yesterday"}`,
		`[1,2,3]`,
		"",
		"\x00\x01\xfe garbage",
		`null`,
	} {
		f.Add([]byte(s))
	}
	dir := f.TempDir()
	path := filepath.Join(dir, "consent.json")
	f.Fuzz(func(t *testing.T, b []byte) {
		old, _ := filepath.Glob(path + "*")
		for _, p := range old {
			os.Remove(p)
		}
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		rec, notice, err := NewStore(path, nil, nil).Load()
		if err != nil {
			t.Fatalf("Load failed on a readable folder: %v", err)
		}
		aside, _ := filepath.Glob(path + ".corrupt-*")
		if notice != "" {
			if rec.State != Undecided || rec.AcceptedVersion != 0 {
				t.Fatalf("damaged record %q read as %+v", b, rec)
			}
			if len(aside) != 1 {
				t.Fatalf("damaged record %q not set aside: %v", b, aside)
			}
			return
		}
		if len(aside) != 0 {
			t.Fatalf("record %q loaded and set aside", b)
		}
		if err := rec.validate(); err != nil {
			t.Fatalf("record %q loaded but does not validate: %v", b, err)
		}
		if rec.State == Participating && rec.AcceptedVersion < 1 {
			t.Fatalf("participating without a statement: %+v", rec)
		}
		// What loaded is written the way Save writes it (without the
		// fsyncs, which only slow the fuzzer) and loads back the same.
		out, err := json.MarshalIndent(rec, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, append(out, '\n'), 0o600); err != nil {
			t.Fatal(err)
		}
		again, notice, err := NewStore(path, nil, nil).Load()
		if err != nil || notice != "" || !again.Time.Equal(rec.Time) {
			t.Fatalf("record %+v does not read back: %+v %q %v", rec, again, notice, err)
		}
		again.Time = rec.Time
		if again != rec {
			t.Fatalf("record %+v reads back as %+v", rec, again)
		}
	})
}
