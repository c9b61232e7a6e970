package localapi

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// childEnv makes the test binary act as a client of the local API, run
// as another user by the tests (see child).
const childEnv = "CLOUDPROTECT_LOCALAPI_CHILD"

// child runs one client operation against the socket in
// CLOUDPROTECT_SOCKET and prints its outcome on stdout:
//
//	put            connect, PUT /v1/participation: "code=N"
//	hold:N         open N connections, GET /v1/status on each, print
//	               "answered K", keep them open until stdin closes
//	connect-pass   connect, GET /v1/status, hand the connection to a new
//	               process running put-fd3, print "pid P" and exit
//	put-fd3        on the connection inherited as descriptor 3: wait for
//	               a line on stdin, then PUT /v1/participation: "code=N"
//	wait           wait until stdin closes
//	status         ask for the status with the client: "ok",
//	               "not-an-agent" or the error
//	fake-agent     listen on the socket as if it were the agent, print
//	               "ready", answer every request with a status, until
//	               stdin closes
func child(op string) int {
	sock := os.Getenv("CLOUDPROTECT_SOCKET")
	fail := func(err error) int {
		fmt.Println("error:", err)
		return 1
	}
	switch {
	case op == "put":
		c, err := net.Dial("unix", sock)
		if err != nil {
			return fail(err)
		}
		defer c.Close()
		code, err := roundTrip(c, bufio.NewReader(c), putRequest)
		if err != nil {
			return fail(err)
		}
		fmt.Printf("code=%d\n", code)
	case strings.HasPrefix(op, "hold:"):
		n, _ := strconv.Atoi(op[len("hold:"):])
		var conns []net.Conn
		answered := 0
		for range n {
			c, err := net.Dial("unix", sock)
			if err != nil {
				continue
			}
			conns = append(conns, c)
			c.SetDeadline(time.Now().Add(30 * time.Second))
			if code, err := roundTrip(c, bufio.NewReader(c), statusRequest); err == nil && code == 200 {
				answered++
			}
		}
		fmt.Printf("answered %d\n", answered)
		io.Copy(io.Discard, os.Stdin)
		for _, c := range conns {
			c.Close()
		}
	case op == "connect-pass":
		c, err := net.Dial("unix", sock)
		if err != nil {
			return fail(err)
		}
		if code, err := roundTrip(c, bufio.NewReader(c), statusRequest); err != nil || code != 200 {
			return fail(fmt.Errorf("status before handing over: %d %v", code, err))
		}
		f, err := c.(*net.UnixConn).File()
		if err != nil {
			return fail(err)
		}
		exe, _ := os.Executable()
		cmd := exec.Command(exe, "-test.run=^$")
		cmd.Env = append(os.Environ(), childEnv+"=put-fd3")
		cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
		cmd.ExtraFiles = []*os.File{f}
		if err := cmd.Start(); err != nil {
			return fail(err)
		}
		fmt.Printf("pid %d\n", os.Getpid())
		// Exit without waiting: the connection lives on in the new process.
	case op == "put-fd3":
		c, err := net.FileConn(os.NewFile(3, "conn"))
		if err != nil {
			return fail(err)
		}
		in := bufio.NewReader(os.Stdin)
		if _, err := in.ReadString('\n'); err != nil {
			return fail(err)
		}
		code, err := roundTrip(c, bufio.NewReader(c), putRequest)
		if err != nil {
			return fail(err)
		}
		fmt.Printf("code=%d\n", code)
	case op == "wait":
		io.Copy(io.Discard, os.Stdin)
	case op == "status":
		c := NewClient(sock)
		defer c.Close()
		_, err := c.Status(context.Background())
		switch {
		case errors.Is(err, ErrNotAnAgent):
			fmt.Println("not-an-agent")
		case err != nil:
			fmt.Println("error:", err)
		default:
			fmt.Println("ok")
		}
	case op == "fake-agent":
		ln, err := net.Listen("unix", sock)
		if err != nil {
			return fail(err)
		}
		os.Chmod(sock, 0o666) // every user may connect, as to the system agent
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, `{"participation":{"state":"participating"},"can_change":true}`)
		})}
		go srv.Serve(ln)
		fmt.Println("ready")
		io.Copy(io.Discard, os.Stdin)
		srv.Close()
	default:
		return fail(fmt.Errorf("unknown operation %q", op))
	}
	return 0
}

var (
	statusRequest = "GET /v1/status HTTP/1.1\r\nHost: agent\r\n\r\n"
	putBody       = `{"participate": true, "statement_version": 1, "via": "cli"}`
	putRequest    = fmt.Sprintf("PUT /v1/participation HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(putBody), putBody)
)

// roundTrip writes a raw request on c and returns the answer's status.
func roundTrip(c net.Conn, br *bufio.Reader, raw string) (int, error) {
	if _, err := io.WriteString(c, raw); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return 0, err
	}
	var body bytes.Buffer
	io.Copy(&body, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}
