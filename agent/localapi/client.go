package localapi

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
)

// SystemSocket is where the system agent listens.
const SystemSocket = "/run/cloudprotect/cloudprotectd.sock"

// UserSocket returns where a user-mode agent listens:
// $XDG_RUNTIME_DIR/cloudprotect/cloudprotectd.sock; without
// XDG_RUNTIME_DIR, the user's runtime folder /run/user/UID when it is
// theirs, else a folder of theirs under the temporary directory, whose
// owner and mode the agent checks before it listens there (see Listen).
func UserSocket() string {
	dir := os.Getenv("XDG_RUNTIME_DIR")
	if dir == "" {
		dir = userRuntimeDir()
	}
	if dir == "" {
		dir = filepath.Join(os.TempDir(), fmt.Sprintf("cloudprotect-%d", os.Getuid()))
	}
	return filepath.Join(dir, "cloudprotect", "cloudprotectd.sock")
}

// DefaultSocket picks the socket a client talks to: $CLOUDPROTECT_SOCKET,
// else the system socket if it exists, else the user socket.
func DefaultSocket() string {
	if s := os.Getenv("CLOUDPROTECT_SOCKET"); s != "" {
		return s
	}
	if _, err := os.Stat(SystemSocket); err == nil {
		return SystemSocket
	}
	return UserSocket()
}

// ErrNotAnAgent means the process at the other end of the socket is not
// one a client trusts: an agent runs as root (system) or as the user
// (user mode); anything else may be another user posing as the agent.
var ErrNotAnAgent = errors.New("the process on the socket is not an agent of root's or yours")

// trustedAgent checks who listens at the other end of c. Root, who may
// look into any process anyway, talks to any user's agent it names.
func trustedAgent(c net.Conn) error {
	cred, ok := peerCred(c)
	if !ok || os.Geteuid() == 0 {
		return nil // no SO_PEERCRED on this system, or root: nothing to check
	}
	if cred.UID != 0 && int(cred.UID) != os.Getuid() {
		return fmt.Errorf("%w: it runs as uid %d", ErrNotAnAgent, cred.UID)
	}
	return nil
}

// ErrUnreachable is wrapped by every error that means no agent answered on
// the socket.
var ErrUnreachable = errors.New("agent unreachable")

// APIError is an error answer from the agent.
type APIError struct {
	StatusCode int
	Message    string
	Hint       string
	// Upload is what a send did before it failed, when the agent says.
	Upload *api.UploadResult
}

func (e *APIError) Error() string { return e.Message }

// Client talks to the agent over its unix socket.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client for the agent listening on socket.
func NewClient(socket string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "unix", socket)
			if err != nil {
				return nil, err
			}
			if err := trustedAgent(c); err != nil {
				c.Close()
				return nil, fmt.Errorf("%s: %w", socket, err)
			}
			return c, nil
		},
		MaxIdleConns:    2,
		IdleConnTimeout: 30 * time.Second,
	}
	return &Client{socket: socket, http: &http.Client{Transport: tr}}
}

// Socket returns the socket path the client talks to.
func (c *Client) Socket() string { return c.socket }

// Close releases idle connections.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// Status returns the agent's status as seen by the caller.
func (c *Client) Status(ctx context.Context) (api.Status, error) {
	var s api.Status
	err := c.do(ctx, http.MethodGet, "/v1/status", nil, &s)
	return s, err
}

// Statement returns the Security Network Statement the agent ships.
func (c *Client) Statement(ctx context.Context) (api.Statement, error) {
	return c.StatementIn(ctx, "")
}

// StatementIn returns the Security Network Statement in the language lang
// (a BCP 47 tag such as "de"); the agent answers in English when it has no
// translation. Every translation carries the same version.
func (c *Client) StatementIn(ctx context.Context, lang string) (api.Statement, error) {
	var s api.Statement
	path := "/v1/statement"
	if lang != "" {
		path += "?" + url.Values{"lang": {lang}}.Encode()
	}
	err := c.do(ctx, http.MethodGet, path, nil, &s)
	return s, err
}

// Alerts returns the recent alerts the caller may see, newest first.
func (c *Client) Alerts(ctx context.Context) (api.AlertList, error) {
	var l api.AlertList
	err := c.do(ctx, http.MethodGet, "/v1/alerts", nil, &l)
	return l, err
}

// SetParticipation asks the agent to participate or leave, and returns the
// status after the change.
func (c *Client) SetParticipation(ctx context.Context, req api.ParticipationRequest) (api.Status, error) {
	var s api.Status
	err := c.do(ctx, http.MethodPut, "/v1/participation", req, &s)
	return s, err
}

// Queue returns exactly what the next upload would send.
func (c *Client) Queue(ctx context.Context) (api.QueuePreview, error) {
	var q api.QueuePreview
	err := c.do(ctx, http.MethodGet, "/v1/queue", nil, &q)
	return q, err
}

// Upload asks the agent to send pending statistics now.
func (c *Client) Upload(ctx context.Context) (api.UploadResult, error) {
	var r api.UploadResult
	err := c.do(ctx, http.MethodPost, "/v1/upload", struct{}{}, &r)
	return r, err
}

// Exceptions lists the local exceptions (administrators only).
func (c *Client) Exceptions(ctx context.Context) (api.ExceptionList, error) {
	var l api.ExceptionList
	err := c.do(ctx, http.MethodGet, "/v1/exceptions", nil, &l)
	return l, err
}

// SetException adds or removes a local exception (administrators only)
// and returns the list after the change.
func (c *Client) SetException(ctx context.Context, req api.ExceptionRequest) (api.ExceptionList, error) {
	var l api.ExceptionList
	err := c.do(ctx, http.MethodPut, "/v1/exceptions", req, &l)
	return l, err
}

// Events follows GET /v1/events and calls fn for each event until the
// stream ends, ctx is cancelled or fn returns an error. The first event is
// the current status. It returns an error wrapping ErrUnreachable when the
// agent could not be reached or went away.
func (c *Client) Events(ctx context.Context, fn func(api.Event) error) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent/v1/events", nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, ErrNotAnAgent) {
			return fmt.Errorf("talk to the agent at %s: %w", c.socket, ErrNotAnAgent)
		}
		return fmt.Errorf("%w: %v", ErrUnreachable, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return decodeError(resp)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		var ev api.Event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return fmt.Errorf("decode event: %w", err)
		}
		if err := fn(ev); err != nil {
			return err
		}
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("%w: event stream: %v", ErrUnreachable, err)
	}
	return fmt.Errorf("%w: event stream closed", ErrUnreachable)
}

func (c *Client) do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://agent"+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, ErrNotAnAgent) {
			return fmt.Errorf("talk to the agent at %s: %w", c.socket, ErrNotAnAgent)
		}
		return fmt.Errorf("%w at %s: %v", ErrUnreachable, c.socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return decodeError(resp)
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(out); err != nil {
		return fmt.Errorf("decode %s answer: %w", path, err)
	}
	return nil
}

func decodeError(resp *http.Response) error {
	var e api.Error
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if json.Unmarshal(b, &e) != nil || e.Error == "" {
		e.Error = fmt.Sprintf("agent answered %s", resp.Status)
	}
	return &APIError{StatusCode: resp.StatusCode, Message: e.Error, Hint: e.Hint, Upload: e.Upload}
}
