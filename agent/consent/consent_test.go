package consent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/cloudprotect/cloudprotect/wire"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var t0 = time.Date(2026, 11, 28, 10, 0, 0, 0, time.UTC)

func open(t *testing.T, dir string, version int) *Manager {
	t.Helper()
	m, err := Open(Options{
		StatePath:        filepath.Join(dir, "consent.json"),
		PolicyPath:       filepath.Join(dir, "policy.json"),
		StatementVersion: version,
		Now:              func() time.Time { return t0 },
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func writePolicy(t *testing.T, dir, body string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "policy.json"), []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
}

type step struct {
	participate bool
	shown       int
	wantErr     any // nil, *LockedError or *VersionError
}

func TestTransitions(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name           string
		version        int
		policy         string
		steps          []step
		wantState      State
		wantAccepted   int
		wantCollecting bool
		wantLocked     bool
	}{
		{name: "fresh install is undecided", version: 1, wantState: Undecided},
		{name: "undecided to participating", version: 1, steps: []step{{true, 1, nil}},
			wantState: Participating, wantAccepted: 1, wantCollecting: true},
		{name: "undecided to declined", version: 1, steps: []step{{false, 0, nil}}, wantState: Declined},
		{name: "participating to declined", version: 1, steps: []step{{true, 1, nil}, {false, 0, nil}}, wantState: Declined},
		{name: "declined to participating", version: 1, steps: []step{{false, 0, nil}, {true, 1, nil}},
			wantState: Participating, wantAccepted: 1, wantCollecting: true},
		{name: "participate again is idempotent", version: 1, steps: []step{{true, 1, nil}, {true, 1, nil}},
			wantState: Participating, wantAccepted: 1, wantCollecting: true},
		{name: "older statement shown is refused", version: 2, steps: []step{{true, 1, &VersionError{}}}, wantState: Undecided},
		{name: "newer statement shown is refused", version: 2, steps: []step{{true, 3, &VersionError{}}}, wantState: Undecided},
		{name: "no statement shown is refused", version: 1, steps: []step{{true, 0, &VersionError{}}}, wantState: Undecided},
		{name: "policy on forces participation", version: 1, policy: `{"participation":"on"}`,
			wantState: Participating, wantCollecting: true, wantLocked: true},
		{name: "policy off forces declined", version: 1, policy: `{"participation":"off"}`,
			wantState: Declined, wantLocked: true},
		{name: "policy off refuses participating", version: 1, policy: `{"participation":"off"}`,
			steps: []step{{true, 1, &LockedError{}}}, wantState: Declined, wantLocked: true},
		{name: "policy on refuses leaving", version: 1, policy: `{"participation":"on"}`,
			steps: []step{{false, 0, &LockedError{}}}, wantState: Participating, wantCollecting: true, wantLocked: true},
		{name: "policy user lets the person decide", version: 1, policy: `{"participation":"user"}`,
			steps: []step{{true, 1, nil}}, wantState: Participating, wantAccepted: 1, wantCollecting: true},
		{name: "broken policy is ignored", version: 1, policy: `{"participation":"of"`,
			steps: []step{{true, 1, nil}}, wantState: Participating, wantAccepted: 1, wantCollecting: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			if tt.policy != "" {
				writePolicy(t, dir, tt.policy)
			}
			m := open(t, dir, tt.version)
			for i, s := range tt.steps {
				_, err := m.Set(s.participate, s.shown, ViaCLI, 1000)
				switch want := s.wantErr.(type) {
				case nil:
					if err != nil {
						t.Fatalf("step %d: %v", i, err)
					}
				case *LockedError:
					if !errors.As(err, &want) {
						t.Fatalf("step %d: err = %v, want a LockedError", i, err)
					}
				case *VersionError:
					if !errors.As(err, &want) {
						t.Fatalf("step %d: err = %v, want a VersionError", i, err)
					}
				}
			}
			v := m.View()
			if m.Collecting() != v.Collecting {
				t.Errorf("Collecting() = %v, view says %v", m.Collecting(), v.Collecting)
			}
			if v.State != tt.wantState || v.AcceptedVersion != tt.wantAccepted ||
				v.Collecting != tt.wantCollecting || v.Locked != tt.wantLocked {
				t.Errorf("view = %+v, want state %s accepted %d collecting %v locked %v",
					v, tt.wantState, tt.wantAccepted, tt.wantCollecting, tt.wantLocked)
			}
			// The decision survives a restart.
			again := open(t, dir, tt.version).View()
			if again.State != v.State || again.AcceptedVersion != v.AcceptedVersion || again.Collecting != v.Collecting {
				t.Errorf("after restart view = %+v, want %+v", again, v)
			}
		})
	}
}

func TestStatementVersionBumpPauses(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if _, err := open(t, dir, 1).Set(true, 1, ViaTray, 1000); err != nil {
		t.Fatal(err)
	}
	m := open(t, dir, 2)
	v := m.View()
	if v.State != Participating || !v.Paused || v.Collecting {
		t.Fatalf("after bump view = %+v, want participating, paused, not collecting", v)
	}
	if v, err := m.Set(true, 2, ViaTray, 1000); err != nil || v.Paused || !v.Collecting {
		t.Fatalf("accepting the new statement: view %+v err %v", v, err)
	}
	// An agent downgraded to an older statement still honours the newer
	// acceptance.
	if v := open(t, dir, 1).View(); !v.Collecting {
		t.Errorf("older agent: view %+v, want collecting", v)
	}
}

func TestRecordKeepsWhoWhenHow(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	m := open(t, dir, 1)
	if _, err := m.Set(true, 1, ViaInstall, 0); err != nil {
		t.Fatal(err)
	}
	rec, notice, err := NewStore(filepath.Join(dir, "consent.json"), nil, nil).Load()
	if err != nil || notice != "" {
		t.Fatal(err, notice)
	}
	want := Record{FormatVersion: 1, State: Participating, AcceptedVersion: 1, Time: t0, Via: ViaInstall, UID: 0}
	if rec != want {
		t.Errorf("record = %+v, want %+v", rec, want)
	}
}

func TestCorruptStateFailsClosed(t *testing.T) {
	t.Parallel()
	good := `{"format_version":1,"state":"participating","accepted_version":1,"time":"2026-11-28T10:00:00Z","via":"cli","uid":0}`
	tests := []struct {
		name    string
		content string
		mode    os.FileMode
	}{
		{"empty file", "", 0o644},
		{"truncated", good[:len(good)/2], 0o644},
		{"garbage", "\x00\x01\xfe garbage", 0o644},
		{"wrong format version", strings.Replace(good, `"format_version":1`, `"format_version":9`, 1), 0o644},
		{"unknown state", strings.Replace(good, `"participating"`, `"maybe"`, 1), 0o644},
		{"participating without version", strings.Replace(good, `"accepted_version":1`, `"accepted_version":0`, 1), 0o644},
		{"a folder instead of a file", "", os.ModeDir | 0o755},
		{"JSON array", "[1,2,3]", 0o644},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := filepath.Join(dir, "consent.json")
			if tt.mode.IsDir() {
				if err := os.Mkdir(path, tt.mode.Perm()); err != nil {
					t.Fatal(err)
				}
			} else if err := os.WriteFile(path, []byte(tt.content), tt.mode); err != nil {
				t.Fatal(err)
			}
			m := open(t, dir, 1)
			v := m.View()
			if v.State != Undecided || v.Collecting || v.Notice == "" {
				t.Fatalf("view = %+v, want undecided, not collecting, with a notice", v)
			}
			aside, _ := filepath.Glob(path + ".corrupt-*")
			if len(aside) != 1 {
				t.Fatalf("moved aside: %v, want one file", aside)
			}
			// The person can decide again, and the notice goes away.
			if v, err := m.Set(true, 1, ViaCLI, 0); err != nil || v.Notice != "" || !v.Collecting {
				t.Fatalf("decide again: %+v %v", v, err)
			}
		})
	}
	t.Run("the valid record loads", func(t *testing.T) {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "consent.json"), []byte(good), 0o644)
		if v := open(t, dir, 1).View(); !v.Collecting || v.Notice != "" {
			t.Fatalf("view = %+v", v)
		}
	})
}

func TestPolicyParse(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, body string
		want       Policy
		wantErr    string
	}{
		{"default", `{}`, Policy{Participation: "user", Protection: "block"}, ""},
		{"full", `{"participation":"off","admin_group":"admins","server":"https://cloud.example",` +
			`"ca_file":"/etc/cloudprotect/ca.pem","enroll_secret_file":"/etc/cloudprotect/enroll.secret",` +
			`"protection":"alert","first_sight_timeout_ms":3000}`,
			Policy{Participation: "off", AdminGroup: "admins", Server: "https://cloud.example",
				CAFile: "/etc/cloudprotect/ca.pem", EnrollSecretFile: "/etc/cloudprotect/enroll.secret",
				Protection: "alert", FirstSightTimeoutMS: 3000}, ""},
		{"relative ca file", `{"ca_file":"ca.pem"}`, Policy{}, "not an absolute path"},
		{"relative secret file", `{"enroll_secret_file":"secret"}`, Policy{}, "not an absolute path"},
		{"bad protection", `{"protection":"deny"}`, Policy{}, `use "block" or "alert"`},
		{"negative first sight", `{"first_sight_timeout_ms":-1}`, Policy{}, "first_sight_timeout_ms is -1"},
		{"first sight too long", `{"first_sight_timeout_ms":60001}`, Policy{}, "to 60000"},
		{"unknown field", `{"participate":"on"}`, Policy{}, "unknown field"},
		{"bad mode", `{"participation":"yes"}`, Policy{}, `use "user", "on" or "off"`},
		{"bad group", `{"admin_group":"x y"}`, Policy{}, "not a valid group name"},
		{"bad server", `{"server":"ftp://x"}`, Policy{}, "is not an https:// URL"},
		{"server on a unix socket", `{"server":"unix:///run/cloud/api.sock"}`,
			Policy{Participation: "user", Server: "unix:///run/cloud/api.sock", Protection: "block"}, ""},
		{"relative unix socket", `{"server":"unix:api.sock"}`, Policy{}, "is not an https:// URL"},
		{"empty", "  \n", Policy{}, "empty"},
		{"trailing data", `{}{}`, Policy{}, "extra data"},
		{"not an object", `"on"`, Policy{}, "decode policy"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParsePolicy([]byte(tt.body))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %+v %v, want %+v", got, err, tt.want)
			}
		})
	}
}

// waitView waits until the manager's view satisfies ok, woken by its
// subscription.
func waitView(t *testing.T, m *Manager, ch <-chan struct{}, what string, ok func(View) bool) {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for !ok(m.View()) {
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("timed out waiting for %s; view %+v", what, m.View())
		}
	}
}

func TestPolicyWatchedWhileRunning(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	dir := filepath.Join(root, "etc", "cloudprotect") // does not exist yet
	m, err := Open(Options{StatePath: filepath.Join(root, "consent.json"), PolicyPath: filepath.Join(dir, "policy.json")})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Set(true, StatementVersion, ViaCLI, 0); err != nil {
		t.Fatal(err)
	}
	ch, cancelSub := m.Subscribe()
	defer cancelSub()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.WatchPolicy(ctx) }()
	defer func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("WatchPolicy returned %v", err)
		}
	}()
	time.Sleep(20 * time.Millisecond) // let the watch be set

	// The folder and the file appear: applied.
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	writePolicy(t, dir, `{"participation":"off"}`)
	waitView(t, m, ch, "policy off", func(v View) bool { return v.Locked && v.State == Declined && !v.Collecting })

	// Edited in place.
	writePolicy(t, dir, `{"participation":"on"}`)
	waitView(t, m, ch, "policy on", func(v View) bool { return v.Locked && v.State == Participating })

	// Broken: reported, the last good policy stays.
	writePolicy(t, dir, `{"participation": "of`)
	waitView(t, m, ch, "policy error", func(v View) bool { return v.PolicyError != "" })
	if v := m.View(); !v.Locked || v.State != Participating {
		t.Fatalf("broken policy half-applied: %+v", v)
	}

	// Replaced atomically, the way editors save.
	tmp := filepath.Join(dir, ".policy.json.swp")
	os.WriteFile(tmp, []byte(`{"participation":"user"}`), 0o644)
	if err := os.Rename(tmp, filepath.Join(dir, "policy.json")); err != nil {
		t.Fatal(err)
	}
	waitView(t, m, ch, "policy user", func(v View) bool { return !v.Locked && v.PolicyError == "" && v.Collecting })

	// Removed: the person decides again (their record says participating).
	writePolicy(t, dir, `{"participation":"off"}`)
	waitView(t, m, ch, "policy off again", func(v View) bool { return v.Locked })
	os.Remove(filepath.Join(dir, "policy.json"))
	waitView(t, m, ch, "policy removed", func(v View) bool { return !v.Locked && v.Collecting })
}

// Every field the agent sends must be named in the statement the person
// agreed to; a new field without a statement change fails here.
func TestStatementNamesEverySentField(t *testing.T) {
	t.Parallel()
	for _, f := range jsonFields(reflect.TypeOf(wire.Record{}), "") {
		if !StatementMentions(f) {
			t.Errorf("field %q is sent but not named in the statement", f)
		}
	}
}

func jsonFields(t reflect.Type, prefix string) []string {
	var out []string
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if f.Anonymous {
			out = append(out, jsonFields(f.Type, prefix)...)
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		ft := f.Type
		if ft.Kind() == reflect.Pointer {
			ft = ft.Elem()
		}
		if ft.Kind() == reflect.Struct && ft.PkgPath() != "time" {
			out = append(out, jsonFields(ft, prefix+name+".")...)
			continue
		}
		out = append(out, prefix+name)
	}
	return out
}

// Every translation of the statement translates the current English text
// (the version is the content's, not a language's) and names every field
// the English names.
func TestStatementTranslations(t *testing.T) {
	langs := StatementLanguages()
	if len(langs) < 3 {
		t.Fatalf("statement languages %v, want at least en, de, ru", langs)
	}
	fields := regexp.MustCompile("`[a-z_.0-9]+`").FindAllString(Statement(), -1)
	for _, lang := range langs {
		st := StatementIn(lang)
		if st.Lang != lang {
			t.Errorf("StatementIn(%q) is in %q", lang, st.Lang)
		}
		if lang != "en" && st.Source != englishSource {
			t.Errorf("statement.%s.md translates another statement.md (source %s); statement.md is now %s: "+
				"update the translation, then its source line", lang, st.Source, englishSource)
		}
		for _, f := range fields {
			if !strings.Contains(st.Text, f) {
				t.Errorf("statement.%s.md does not name %s", lang, f)
			}
		}
		if st.Title == "" || st.Summary == "" {
			t.Errorf("%s: title %q, summary %q", lang, st.Title, st.Summary)
		}
	}
	if got := StatementIn("de_AT").Lang; got != "de" {
		t.Errorf("de_AT gets %s", got)
	}
	if got := StatementIn("fr").Lang; got != "en" {
		t.Errorf("fr gets %s", got)
	}
}
