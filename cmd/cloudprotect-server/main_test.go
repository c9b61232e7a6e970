package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"

	"github.com/cloudprotect/cloudprotect/wire"
)

func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){
		"cloudprotect-server": func() { os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr)) },
	})
}

func TestScripts(t *testing.T) {
	t.Parallel()
	testscript.Run(t, testscript.Params{
		Dir: "testdata",
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			// freeport NAME: sets $NAME to a free TCP port on 127.0.0.1.
			"freeport": func(ts *testscript.TestScript, neg bool, args []string) {
				if len(args) != 1 {
					ts.Fatalf("usage: freeport NAME")
				}
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				ts.Check(err)
				port := ln.Addr().(*net.TCPAddr).Port
				ln.Close()
				ts.Setenv(args[0], strconv.Itoa(port))
			},
			// lookup BASEURL HASH: registers, looks HASH up, prints the
			// verdict; waits up to 20 s for the server to answer.
			"lookup": func(ts *testscript.TestScript, neg bool, args []string) {
				if len(args) != 2 {
					ts.Fatalf("usage: lookup BASEURL HASH")
				}
				base, hash := args[0], args[1]
				var resp *http.Response
				var err error
				for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
					resp, err = http.Get(base + "/healthz")
					if err == nil {
						resp.Body.Close()
						break
					}
				}
				ts.Check(err)
				resp, err = http.Post(base+"/v1/installations", "application/json", bytes.NewReader([]byte(`{"statement_version":1}`)))
				ts.Check(err)
				var reg wire.Registration
				ts.Check(json.NewDecoder(resp.Body).Decode(&reg))
				resp.Body.Close()
				req, _ := http.NewRequest("GET", base+"/v1/reputation/sha256/"+hash, nil)
				req.Header.Set("Authorization", "Bearer "+reg.Token)
				resp, err = http.DefaultClient.Do(req)
				ts.Check(err)
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				var rep wire.Reputation
				if resp.StatusCode != 200 || json.Unmarshal(body, &rep) != nil {
					ts.Fatalf("lookup: %d %s", resp.StatusCode, body)
				}
				fmt.Fprintf(ts.Stdout(), "%s %s ttl=%d\n", rep.SHA256, rep.Verdict, rep.TTLSeconds)
			},
		},
	})
}
