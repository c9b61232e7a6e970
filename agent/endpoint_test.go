package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
	"github.com/cloudprotect/cloudprotect/agent/testenv"
	"github.com/cloudprotect/cloudprotect/wire"
)

// The system agent never sends to an endpoint an ordinary local user can
// own. An unprivileged user listens on 127.0.0.1:8787 (where the agent
// used to send when no server was configured): with no server configured
// nothing is sent and the status says how to set one; with that address
// in the policy, the agent refuses it and says why. The listener never
// gets a connection.
func TestSystemAgentIgnoresUserOwnedEndpoint(t *testing.T) {
	testenv.NeedRoot(t)
	attacker := testenv.AddUser(t, "cpx", "")
	ln, err := testenv.ListenAs(t, int(attacker.UID), "tcp", "127.0.0.1:8787")
	if err != nil {
		testenv.Unavailable(t, "listen on 127.0.0.1:8787 as another user: %v", err)
	}
	var conns atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			c.Close()
		}
	}()

	a := startAgentWith(t, ModeSystem, "", func(c *Config) { c.Server = DefaultConfig(ModeSystem).Server })
	ctx := context.Background()
	if _, err := a.client.SetParticipation(ctx, api.ParticipationRequest{Participate: true, StatementVersion: consent.StatementVersion, Via: "cli"}); err != nil {
		t.Fatal(err)
	}
	prog, sum := uniqueProgram(t, a.dir, "tool")
	runN(t, prog, 1)
	waitRecord(t, a.client, "of the program run", func(r wire.Record) bool { return r.SHA256 == sum })

	send := func(what, wantInError string) {
		t.Helper()
		_, err := a.client.Upload(ctx)
		var ae *localapi.APIError
		if !errors.As(err, &ae) || !strings.Contains(ae.Message, wantInError) || ae.Hint == "" {
			t.Errorf("send now %s = %v; want an error saying %q with a hint", what, err, wantInError)
		}
		st, err := a.client.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(st.Upload.Problem, wantInError) || st.Upload.ProblemHint == "" {
			t.Errorf("status %s: problem %q (hint %q); want it to say %q and what to do", what, st.Upload.Problem, st.Upload.ProblemHint, wantInError)
		}
		if n := conns.Load(); n != 0 {
			t.Fatalf("the other user's listener got %d connections %s", n, what)
		}
	}
	send("with no server configured", "no Security Network server is configured")

	policy := filepath.Join(a.dir, "policy.json")
	if err := os.WriteFile(policy, []byte(`{"server": "http://127.0.0.1:8787"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the policy's server", func() bool {
		st, err := a.client.Status(ctx)
		return err == nil && st.Upload.Server == "http://127.0.0.1:8787"
	})
	send("with a user's port in the policy", "below port 1024")
}

// waitFor waits (for at most 10 s) until cond holds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
