package cloud_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/cloud"
)

// start is the fake time the tests begin at.
var start = time.Date(2026, 3, 2, 9, 0, 0, 0, time.UTC)

// A damaged state file is moved aside and the installation starts
// afresh; invalid entries of a readable one are dropped one by one.
func TestStateFileDamage(t *testing.T) {
	t.Parallel()
	good := `{"version":1,"installation":{"installation_id":"ABC","token":"cpt_x","server":"http://127.0.0.1:1"},` +
		`"deletions":[{"installation_id":"OLD","token":"cpt_y","server":"http://127.0.0.1:1","requested":"2026-01-01T00:00:00Z"}],"records_sent":7,"batches_dropped":1}`
	tests := []struct {
		name       string
		content    string
		registered bool
		deletion   bool
		movedAside bool
	}{
		{name: "intact", content: good, registered: true, deletion: true},
		{name: "empty file", content: "", movedAside: true},
		{name: "truncated", content: good[:len(good)/2], movedAside: true},
		{name: "garbage", content: "\x00\x01binary", movedAside: true},
		{name: "other version", content: `{"version":9}`, movedAside: true},
		{name: "invalid installation", content: strings.Replace(good, `"ABC"`, `"has space"`, 1), deletion: true},
		{name: "insecure server", content: strings.Replace(good, `"http://127.0.0.1:1","requested"`, `"http://example.org","requested"`, 1), registered: true},
		{name: "repeated ID", content: strings.Replace(good, `"OLD"`, `"ABC"`, 1), registered: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := filepath.Join(dir, cloud.StateFile)
			if err := os.WriteFile(path, []byte(tt.content), 0o600); err != nil {
				t.Fatal(err)
			}
			in, err := cloud.Open(cloud.Options{
				StatePath:        path,
				Server:           func() string { return "http://127.0.0.1:1" },
				Allowed:          func() bool { return false },
				StatementVersion: func() int { return 1 },
			})
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			st := in.Status()
			if st.Registered != tt.registered || st.DeletionPending != tt.deletion {
				t.Errorf("Status = %+v; want registered %v, deletion pending %v", st, tt.registered, tt.deletion)
			}
			aside, _ := filepath.Glob(path + ".corrupt-*")
			if (len(aside) == 1) != tt.movedAside {
				t.Errorf("moved aside: %v; want %v", aside, tt.movedAside)
			}
		})
	}
}
