package console_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/cloudprotect/cloudprotect/agent/cloud"
	"github.com/cloudprotect/cloudprotect/server"
	"github.com/cloudprotect/cloudprotect/server/console"
	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/server/store/storetest"
	"github.com/cloudprotect/cloudprotect/server/verdict"
	"github.com/cloudprotect/cloudprotect/wire"
)

// EnvShots names a folder to which TestConsoleInABrowser writes its
// screenshots (docs/img for the documentation).
const EnvShots = "CLOUDPROTECT_CONSOLE_SHOTS"

func sum(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

// populate fills st with what a small network reports over a day: forty
// installations running common programs, a few rare downloads, one
// malicious file listed by a feed, and an earlier decision.
func populate(t *testing.T, st store.Store, now time.Time) {
	t.Helper()
	ctx := context.Background()
	common := []string{"/usr/bin/bash", "/usr/bin/git", "/usr/bin/python3.12", "/usr/lib/firefox/firefox", "/usr/bin/ssh",
		"/usr/libexec/gnome-shell-calendar-server", "/opt/google/chrome/chrome", "/usr/bin/make", "/usr/bin/gcc-13", "~/.local/bin/poetry"}
	rare := []string{"~/Downloads/invoice_2026-02.pdf.sh", "~/Downloads/zoom_amd64/zoom", "~/.cache/tmp/upd\u202eexe.txt",
		"~/Downloads/AnyDesk", "/tmp/.x/kworkerd", "~/Downloads/setup-tool"}
	for i := range 40 {
		id := fmt.Sprintf("inst%02d", i)
		if err := st.Register(ctx, id, []byte(id), now.Add(-40*24*time.Hour)); err != nil {
			t.Fatal(err)
		}
		for hour := 0; hour < 24; hour += 1 + i%5 {
			at := now.Add(-time.Duration(23-hour)*time.Hour - time.Duration(i)*time.Minute)
			var stats []store.Stat
			for j, p := range common[:4+(i+hour)%7] {
				stats = append(stats, store.Stat{SHA256: sum(p), Size: int64(40_000 + j*91_733), Kind: "elf", Path: p,
					PackageManaged: !strings.HasPrefix(p, "~"), ExecCount: int64(1 + (i*j+hour)%9), FirstSeen: at.Add(-time.Hour), LastSeen: at})
			}
			if hour%6 == 0 && i%7 == hour%7 {
				p := rare[(i+hour)%len(rare)]
				kind := "elf"
				if strings.HasSuffix(p, ".sh") {
					kind = "script"
				}
				stats = append(stats, store.Stat{SHA256: sum(p), Size: 18_211, Kind: kind, Path: p, ExecCount: 1, Loaded: true, FirstSeen: at, LastSeen: at})
			}
			if _, err := st.Ingest(ctx, id, fmt.Sprint("b", hour), stats, at); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Files first reported in the last hour.
	for i, p := range []string{"~/Downloads/obsidian-1.9.2.AppImage", "~/Downloads/Telegram/Telegram", "~/.local/share/Steam/ubuntu12_32/steam"} {
		at := now.Add(-time.Duration(10+i*7) * time.Minute)
		id := fmt.Sprintf("inst%02d", 3+i*11)
		if _, err := st.Ingest(ctx, id, fmt.Sprint("new", i), []store.Stat{{SHA256: sum(p), Size: 91_000_000, Kind: "elf", Path: p,
			ExecCount: 2, Loaded: true, FirstSeen: at, LastSeen: at}}, at); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := st.ImportLists(ctx, "abuse-feed-2026-02", map[string][]string{store.ListMalicious: {sum("/tmp/.x/kworkerd")}}, false, now.Add(-3*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if _, err := st.ImportLists(ctx, "distro-packages", map[string][]string{store.ListTrusted: {sum("/usr/bin/bash"), sum("/usr/bin/git")}}, false, now.Add(-26*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := st.Decide(ctx, sum("~/Downloads/AnyDesk"), wire.VerdictUntrusted, "lena", "remote access tool, not approved here (ticket SEC-4411)", now.Add(-90*time.Minute)); err != nil {
		t.Fatal(err)
	}
}

// chromium finds the browser; without it the test skips on a laptop and
// fails in CI.
func chromium(t *testing.T) string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("no chromium in PATH but CI=true: install the Debian package chromium")
	}
	t.Skip("no chromium in PATH: install the Debian package chromium to run the console in a browser")
	return ""
}

// TestConsoleInABrowser drives the console in headless Chromium as an
// analyst would: sign in, search a hash, set its verdict with a reason,
// import a feed and open the work list; then the agent's client looks
// the hash up and gets the analyst's verdict.
func TestConsoleInABrowser(t *testing.T) {
	t.Parallel()
	exe := chromium(t)
	now := time.Now().UTC().Truncate(time.Second)
	st := storetest.New(t, storetest.Backends()[0])
	populate(t, st, now)
	if err := st.AddAnalyst(context.Background(), "ana", hashedPassword(), false, now); err != nil {
		t.Fatal(err)
	}
	m := server.NewMetrics()
	c, err := console.New(console.Config{Store: st, Rules: verdict.Default(), Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(server.New(server.Config{Store: st, Rules: verdict.Default(), Console: c, Metrics: m}))
	t.Cleanup(ts.Close)

	shots := os.Getenv(EnvShots)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	actx, cancelAlloc := chromedp.NewExecAllocator(ctx, chromedp.ExecPath(exe), chromedp.Headless, chromedp.NoSandbox,
		chromedp.DisableGPU, chromedp.WindowSize(1440, 1000), chromedp.Flag("hide-scrollbars", true),
		chromedp.Flag("user-data-dir", t.TempDir()))
	defer cancelAlloc()
	bctx, cancelBrowser := chromedp.NewContext(actx)
	defer cancelBrowser()

	shot := func(name string) {
		t.Helper()
		png, err := chromedp.Run(bctx, chromedp.FullScreenshot(100))
		if err != nil {
			t.Fatalf("screenshot %s: %v", name, err)
		}
		if len(png) < 1000 {
			t.Fatalf("screenshot %s: %d bytes", name, len(png))
		}
		if shots != "" {
			if err := os.WriteFile(filepath.Join(shots, name+".png"), png, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	text := func(sel string) string {
		t.Helper()
		s, err := chromedp.Run(bctx, chromedp.Text(chromedp.CSS(sel)))
		if err != nil {
			t.Fatalf("read %s: %v", sel, err)
		}
		return s
	}
	do := func(what string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		if err := chromedp.Do(bctx, steps...); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}

	// Signed out, the console sends the analyst to sign in.
	do("open the console", chromedp.Navigate(ts.URL+"/console/"), chromedp.WaitVisible(chromedp.CSS("#password")))
	shot("console-signin")
	do("sign in",
		chromedp.SendKeys(chromedp.CSS("#name"), "ana"),
		chromedp.SendKeys(chromedp.CSS("#password"), password),
		chromedp.Click(chromedp.CSS("button.primary")),
		chromedp.WaitVisible(chromedp.CSS(".chart")))
	if got := text("header .who span"); got != "ana" {
		t.Fatalf("signed in as %q; want ana", got)
	}
	shot("console-overview")

	// Search a file by its hash, pasted in capitals with spaces.
	target := sum("~/Downloads/invoice_2026-02.pdf.sh")
	do("search",
		chromedp.SendKeys(chromedp.CSS("header .search input"), "  "+strings.ToUpper(target)+" "),
		chromedp.Submit(chromedp.CSS("header .search input")),
		chromedp.WaitVisible(chromedp.CSS("#verdict")))
	if got := text("#verdict"); !strings.EqualFold(got, "unknown") {
		t.Fatalf("verdict before the decision: %q; want unknown", got)
	}
	if got := text("p.hash"); got != target {
		t.Fatalf("file page of %q; want %s", got, target)
	}
	shot("console-file")

	// Set the verdict with a reason.
	do("set the verdict",
		chromedp.Click(chromedp.CSS(`input[name=verdict][value=malicious]`)),
		chromedp.SendKeys(chromedp.CSS("#reason"), "Shell dropper disguised as a PDF; sandbox run SB-2291 shows it fetching a miner"),
		chromedp.Click(chromedp.CSS("form.stack button.primary")),
		chromedp.WaitVisible(chromedp.CSS(".msg.ok")))
	if got := text("#verdict"); !strings.EqualFold(got, "malicious") {
		t.Fatalf("verdict after the decision: %q; want malicious", got)
	}
	shot("console-file-decided")

	// The agent's next lookup sees it.
	cl, err := cloud.NewClient(ts.URL, cloud.ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.CloseIdleConnections()
	reg, err := cl.Register(ctx, wire.RegisterRequest{AgentVersion: "test", StatementVersion: 1})
	if err != nil {
		t.Fatal(err)
	}
	reps, err := cl.Lookup(ctx, reg.Token, []string{target})
	if err != nil || len(reps) != 1 || reps[0].Verdict != wire.VerdictMalicious || reps[0].Source != wire.SourceAnalyst {
		t.Fatalf("the agent's lookup: %+v, %v; want malicious from an analyst", reps, err)
	}

	// Import a feed file.
	feedFile := filepath.Join(t.TempDir(), "recent-sha256.csv")
	csv := "# \"first_seen_utc\",\"sha256_hash\",\"md5_hash\",\"file_name\"\n" +
		"\"2026-02-27 10:11:12\", \"" + sum("~/Downloads/setup-tool") + "\", \"x\", \"setup-tool\"\n" +
		"\"2026-02-27 10:14:02\", \"" + sum("elsewhere") + "\", \"x\", \"stealer.bin\"\n"
	if err := os.WriteFile(feedFile, []byte(csv), 0o600); err != nil {
		t.Fatal(err)
	}
	do("import a feed",
		chromedp.Click(chromedp.CSS(`header nav a[href="/console/import"]`)),
		chromedp.WaitVisible(chromedp.CSS("#file")),
		chromedp.SendKeys(chromedp.CSS("#feed"), "bazaar-recent"),
		chromedp.SetUploadFiles(chromedp.CSS("#file"), []string{feedFile}),
		chromedp.Click(chromedp.CSS("form.stack button.primary")),
		chromedp.WaitVisible(chromedp.CSS(".msg.ok")))
	if got := text(".msg.ok"); !strings.Contains(got, "2 hashes, 2 newly listed") {
		t.Fatalf("import result %q", got)
	}
	shot("console-import")

	do("open the work list",
		chromedp.Click(chromedp.CSS(`header nav a[href="/console/worklist"]`)),
		chromedp.WaitVisible(chromedp.CSS("form.filters")))
	if got := text("main .panel"); !strings.Contains(got, "~/Downloads/zoom_amd64/zoom") {
		t.Fatalf("work list lacks the rare files:\n%s", got)
	}
	shot("console-worklist")

	// A path with a direction override is shown with the override named,
	// not obeyed.
	do("open a file with a hostile name", chromedp.Navigate(ts.URL+"/console/files/"+sum("~/.cache/tmp/upd\u202eexe.txt")), chromedp.WaitVisible(chromedp.CSS("#verdict")))
	if got := text("td.path"); got != "~/.cache/tmp/upd⟨U+202E⟩exe.txt" {
		t.Fatalf("hostile path shown as %q", got)
	}

	do("back to the overview", chromedp.Click(chromedp.CSS(`header nav a[href="/console/"]`)), chromedp.WaitVisible(chromedp.CSS(".chart")))
	if got := text("main"); !strings.Contains(got, "Shell dropper disguised") && !strings.Contains(got, "malicious") {
		t.Fatalf("overview does not show the new decision:\n%s", got)
	}
	do("sign out", chromedp.Click(chromedp.CSS("header .who button")), chromedp.WaitVisible(chromedp.CSS("#password")))
}
