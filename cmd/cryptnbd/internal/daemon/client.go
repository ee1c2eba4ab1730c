package daemon

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// Client calls the management API. Safe for concurrent use.
type Client struct {
	hc   *http.Client
	base string // "" means the Unix socket or in-process
}

// NewClient talks to the daemon listening on the Unix socket at sockPath.
func NewClient(sockPath string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sockPath)
		},
	}
	return &Client{hc: &http.Client{Transport: tr, Timeout: 10 * time.Minute}}
}

// NewRemoteClient talks to a daemon's --api-listen over HTTPS with a
// client certificate.
func NewRemoteClient(baseURL string, tc *tls.Config) *Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = tc
	return &Client{hc: &http.Client{Transport: tr, Timeout: 10 * time.Minute}, base: strings.TrimSuffix(baseURL, "/")}
}

// NewLocalClient calls h in-process: the CLI uses it when no daemon runs,
// so every command has one code path whether or not disks are being served.
func NewLocalClient(h http.Handler) *Client {
	return &Client{hc: &http.Client{Transport: handlerTransport{h}}}
}

type handlerTransport struct{ h http.Handler }

// RoundTrip runs the handler in its own goroutine and streams its response
// through a pipe, so an export of a large disk is not held in memory and a
// long job's progress lines arrive as they are written. The handler ends
// when it returns or, if the caller stops reading the body, at its next
// write; it sees the caller's context as its request context.
func (t handlerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	pr, pw := io.Pipe()
	rw := &pipeResponse{header: http.Header{}, pw: pw, ready: make(chan struct{})}
	go func() {
		aborted := true
		defer func() {
			if v := recover(); v != nil && v != http.ErrAbortHandler {
				pw.CloseWithError(fmt.Errorf("handler panic: %v", v))
				rw.start(http.StatusInternalServerError)
				return
			}
			rw.start(http.StatusOK)
			if aborted {
				pw.CloseWithError(io.ErrUnexpectedEOF)
			} else {
				pw.Close()
			}
		}()
		t.h.ServeHTTP(rw, r)
		aborted = false
	}()
	<-rw.ready
	return &http.Response{
		StatusCode: rw.status, Status: http.StatusText(rw.status), Header: rw.sent,
		Body: pr, Request: r, ProtoMajor: 1, ProtoMinor: 1, ContentLength: -1,
	}, nil
}

// pipeResponse is the ResponseWriter of handlerTransport. The status and a
// copy of the header are fixed by the first WriteHeader or Write.
type pipeResponse struct {
	header http.Header
	sent   http.Header
	status int
	pw     *io.PipeWriter
	once   sync.Once
	ready  chan struct{}
}

func (p *pipeResponse) Header() http.Header { return p.header }

func (p *pipeResponse) start(status int) {
	p.once.Do(func() {
		p.status, p.sent = status, p.header.Clone()
		close(p.ready)
	})
}

func (p *pipeResponse) WriteHeader(s int) { p.start(s) }

func (p *pipeResponse) Write(b []byte) (int, error) {
	p.start(http.StatusOK)
	return p.pw.Write(b)
}

// Flush is a no-op: every Write reaches the reader directly.
func (p *pipeResponse) Flush() {}

// StatusError is a non-2xx answer from the API.
type StatusError struct {
	Status  int
	Message string
}

func (e *StatusError) Error() string { return e.Message }

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	base := c.base
	if base == "" {
		base = "http://cryptnbd"
	}
	req, err := http.NewRequestWithContext(ctx, method, base+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the daemon: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		var ae apiError
		raw, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		if json.Unmarshal(raw, &ae) != nil || ae.Error == "" {
			ae.Error = fmt.Sprintf("daemon answered %s", resp.Status)
		}
		return &StatusError{Status: resp.StatusCode, Message: ae.Error}
	}
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("daemon reply: %w", err)
	}
	return nil
}

// ListDisks returns every disk.
func (c *Client) ListDisks(ctx context.Context) ([]DiskInfo, error) {
	var out []DiskInfo
	return out, c.do(ctx, http.MethodGet, "/v1/disks", nil, &out)
}

// CreateDisk creates a disk.
func (c *Client) CreateDisk(ctx context.Context, r CreateRequest) (DiskInfo, error) {
	var out DiskInfo
	return out, c.do(ctx, http.MethodPost, "/v1/disks", r, &out)
}

// ShowDisk returns one disk.
func (c *Client) ShowDisk(ctx context.Context, name string) (DiskInfo, error) {
	var out DiskInfo
	return out, c.do(ctx, http.MethodGet, "/v1/disks/"+url.PathEscape(name), nil, &out)
}

// DeleteDisk deletes a disk.
func (c *Client) DeleteDisk(ctx context.Context, name string, force bool) error {
	return c.do(ctx, http.MethodDelete, fmt.Sprintf("/v1/disks/%s?force=%t", url.PathEscape(name), force), nil, nil)
}

// ResizeDisk grows a disk.
func (c *Client) ResizeDisk(ctx context.Context, name string, size int64) (DiskInfo, error) {
	var out DiskInfo
	return out, c.do(ctx, http.MethodPost, "/v1/disks/"+url.PathEscape(name)+"/resize", ResizeRequest{SizeBytes: size}, &out)
}

// RecoverySecret fetches a disk's keyslot secret, base64.
func (c *Client) RecoverySecret(ctx context.Context, name string) (string, error) {
	var out RecoverySecretResponse
	return out.Secret, c.do(ctx, http.MethodPost, "/v1/disks/"+url.PathEscape(name)+"/recovery-secret", nil, &out)
}

// Audit reads audit events.
func (c *Client) Audit(ctx context.Context, disk string, since time.Time) ([]AuditEvent, error) {
	q := url.Values{}
	if disk != "" {
		q.Set("disk", disk)
	}
	if !since.IsZero() {
		q.Set("since", since.UTC().Format(time.RFC3339))
	}
	var out []AuditEvent
	return out, c.do(ctx, http.MethodGet, "/v1/audit?"+q.Encode(), nil, &out)
}

// IsNotRunning reports whether err means no daemon answers on the socket.
func IsNotRunning(err error) bool {
	var ne *net.OpError
	return errors.As(err, &ne)
}

// ListDES returns every disk encryption set.
func (c *Client) ListDES(ctx context.Context) ([]DESInfo, error) {
	var out []DESInfo
	return out, c.do(ctx, http.MethodGet, "/v1/des", nil, &out)
}

// CreateDES creates a disk encryption set.
func (c *Client) CreateDES(ctx context.Context, r DESRequest) (DESInfo, error) {
	var out DESInfo
	return out, c.do(ctx, http.MethodPost, "/v1/des", r, &out)
}

// ShowDES returns a set with its live access status.
func (c *Client) ShowDES(ctx context.Context, name string) (DESInfo, error) {
	var out DESInfo
	return out, c.do(ctx, http.MethodGet, "/v1/des/"+url.PathEscape(name), nil, &out)
}

// DeleteDES deletes an unused set.
func (c *Client) DeleteDES(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/des/"+url.PathEscape(name), nil, nil)
}

// UpdateDES points a set at another key, re-wrapping its disks.
func (c *Client) UpdateDES(ctx context.Context, name, keyURL string) (DESInfo, error) {
	var out DESInfo
	return out, c.do(ctx, http.MethodPost, "/v1/des/"+url.PathEscape(name)+"/update", DESRequest{KeyURL: keyURL}, &out)
}

// RotateDES re-wraps a set's disks under the key's newest version.
func (c *Client) RotateDES(ctx context.Context, name string) (DESInfo, error) {
	var out DESInfo
	return out, c.do(ctx, http.MethodPost, "/v1/des/"+url.PathEscape(name)+"/rotate", nil, &out)
}

// SetAccess replaces a disk's NBD access rules.
func (c *Client) SetAccess(ctx context.Context, name string, a Access) (DiskInfo, error) {
	var out DiskInfo
	return out, c.do(ctx, http.MethodPost, "/v1/disks/"+url.PathEscape(name)+"/access", a, &out)
}

// AttachDisk makes the daemon serve a disk of a shared store; force breaks
// another holder's lease, wait waits (one lease duration at most) for a
// dead holder's lease to expire.
func (c *Client) AttachDisk(ctx context.Context, name string, force, wait bool) (DiskInfo, error) {
	var out DiskInfo
	return out, c.do(ctx, http.MethodPost, fmt.Sprintf("/v1/disks/%s/attach?force=%t&wait=%t", url.PathEscape(name), force, wait), nil, &out)
}

// DetachDisk stops serving a disk of a shared store and releases its lease.
func (c *Client) DetachDisk(ctx context.Context, name string, force bool) (DiskInfo, error) {
	var out DiskInfo
	return out, c.do(ctx, http.MethodPost, fmt.Sprintf("/v1/disks/%s/detach?force=%t", url.PathEscape(name), force), nil, &out)
}
