package agent

import (
	"context"
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/testenv"
	"github.com/cloudprotect/cloudprotect/server"
	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/server/verdict"
	"github.com/cloudprotect/cloudprotect/wire"
)

// TestEnrollSecretFromPolicy registers with a private Security Network
// that asks for an enrollment secret: the agent sends the one in the
// policy's enroll_secret_file; with a wrong one it is refused, keeps its
// records and says why.
func TestEnrollSecretFromPolicy(t *testing.T) {
	testenv.NeedRoot(t)
	const secret = "s3cret of the organisation, 2026"
	for _, tc := range []struct {
		name    string
		file    string
		wantErr string
	}{
		{"right secret", secret + "\n", ""},
		{"wrong secret", "guessed\n", "enrollment secret missing or wrong"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			st, err := store.Open(ctx, "sqlite:"+filepath.Join(t.TempDir(), "cloud.db"), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			cloud := httptest.NewServer(server.New(server.Config{Store: st, Rules: verdict.Default(), EnrollSecret: []byte(secret)}))
			defer cloud.Close()
			secretFile := filepath.Join(t.TempDir(), "enroll.secret")
			if err := os.WriteFile(secretFile, []byte(tc.file), 0o600); err != nil {
				t.Fatal(err)
			}
			policy := fmt.Sprintf(`{"server": %q, "enroll_secret_file": %q}`, cloud.URL, secretFile)
			a := startAgentWith(t, ModeUser, policy, nil)
			if _, err := a.client.SetParticipation(ctx, api.ParticipationRequest{Participate: true, StatementVersion: consent.StatementVersion, Via: "cli"}); err != nil {
				t.Fatal(err)
			}
			prog, sum := uniqueProgram(t, t.TempDir(), "enrolled")
			runN(t, prog, 1)
			waitRecord(t, a.client, "the program", func(r wire.Record) bool { return r.SHA256 == sum })
			_, err = a.client.Upload(ctx)
			var id string
			if _, serr := os.Stat(filepath.Join(a.dir, "state", "upload.json")); serr == nil {
				id, _ = installation(t, filepath.Join(a.dir, "state"))
			}
			if tc.wantErr == "" {
				if err != nil || id == "" {
					t.Fatalf("send with the right secret: %v; installation %q", err, id)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || id != "" {
				t.Fatalf("send with a wrong secret: %v, installation %q; want refused with %q", err, id, tc.wantErr)
			}
		})
	}
}
