package faults

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
	"github.com/cloudprotect/cloudprotect/agent/consent"
	"github.com/cloudprotect/cloudprotect/agent/localapi"
)

// child is the test binary run as another user (see runAs). Operations:
//
//	status       print the state and whether this user may change it
//	participate  try to participate; print the answer's code
//	hold:N       open N connections, every other one an event stream
//	             that is never read; print "opened N", then hold them
//	             until stdin is closed
//	ask:N:PATH   open N connections, send GET PATH on each and never
//	             read; print "opened N", then hold them until stdin is
//	             closed
//	alerts       print the SHA-256 of each alert this user may see, then
//	             "alerts N"
//	queue        ask for the queue's contents; print "code=N"
//	events       follow the event stream: print "ready" after the first
//	             status, "alert SHA256" for each alert, until stdin closes
func child(op, socket string) int {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := localapi.NewClient(socket)
	defer c.Close()
	switch {
	case op == "status":
		st, err := c.Status(ctx)
		if err != nil {
			fmt.Println("error:", err)
			return 1
		}
		fmt.Printf("state=%s can_change=%v\n", st.Participation.State, st.CanChange)
		return 0
	case op == "participate":
		_, err := c.SetParticipation(ctx, api.ParticipationRequest{Participate: true, StatementVersion: consent.StatementVersion, Via: "cli"})
		var ae *localapi.APIError
		if errors.As(err, &ae) {
			fmt.Printf("code=%d hint=%v\n", ae.StatusCode, ae.Hint != "")
			return 0
		}
		if err != nil {
			fmt.Println("error:", err)
			return 1
		}
		fmt.Println("code=200")
		return 0
	case strings.HasPrefix(op, "hold:"):
		n, _ := strconv.Atoi(strings.TrimPrefix(op, "hold:"))
		var conns []net.Conn
		for i := range n {
			conn, err := net.Dial("unix", socket)
			if err != nil {
				fmt.Fprintf(os.Stderr, "dial %d: %v\n", i, err)
				break
			}
			if i%2 == 1 {
				// The write may fail once the agent closed the connection.
				conn.Write([]byte("GET /v1/events HTTP/1.1\r\nHost: agent\r\n\r\n"))
			}
			conns = append(conns, conn)
		}
		fmt.Printf("opened %d\n", len(conns))
		io.Copy(io.Discard, os.Stdin)
		for _, conn := range conns {
			conn.Close()
		}
		return 0
	case strings.HasPrefix(op, "ask:"):
		nStr, path, _ := strings.Cut(strings.TrimPrefix(op, "ask:"), ":")
		n, _ := strconv.Atoi(nStr)
		var conns []net.Conn
		for range n {
			conn, err := net.Dial("unix", socket)
			if err != nil {
				break
			}
			conn.(*net.UnixConn).SetReadBuffer(1024)
			conn.Write([]byte("GET " + path + " HTTP/1.1\r\nHost: agent\r\n\r\n"))
			conns = append(conns, conn)
		}
		fmt.Printf("opened %d\n", len(conns))
		io.Copy(io.Discard, os.Stdin)
		for _, conn := range conns {
			conn.Close()
		}
		return 0
	case op == "alerts":
		l, err := c.Alerts(ctx)
		if err != nil {
			fmt.Println("error:", err)
			return 1
		}
		for _, al := range l.Alerts {
			fmt.Println(al.SHA256)
		}
		fmt.Printf("alerts %d\n", len(l.Alerts))
		return 0
	case op == "queue":
		_, err := c.Queue(ctx)
		var ae *localapi.APIError
		switch {
		case errors.As(err, &ae):
			fmt.Printf("code=%d hint=%v\n", ae.StatusCode, ae.Hint != "")
		case err != nil:
			fmt.Println("error:", err)
			return 1
		default:
			fmt.Println("code=200")
		}
		return 0
	case op == "events":
		ectx, stop := context.WithCancel(context.Background())
		go func() { io.Copy(io.Discard, os.Stdin); stop() }()
		first := true
		err := c.Events(ectx, func(ev api.Event) error {
			switch {
			case first && ev.Status != nil:
				first = false
				fmt.Println("ready")
			case ev.Alert != nil:
				fmt.Println("alert", ev.Alert.SHA256)
			}
			return nil
		})
		if err != nil && !errors.Is(err, context.Canceled) {
			fmt.Println("error:", err)
			return 1
		}
		return 0
	}
	fmt.Fprintf(os.Stderr, "unknown operation %q\n", op)
	return 2
}
