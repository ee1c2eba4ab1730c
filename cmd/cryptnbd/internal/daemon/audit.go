package daemon

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"
)

// AuditEvent is one line of DATA_DIR/audit.log: every use of a key on a
// disk's behalf, every suspension and resumption, every export of a secret.
type AuditEvent struct {
	Time      time.Time `json:"time"`
	Event     string    `json:"event"`
	Disk      string    `json:"disk,omitempty"`
	KeyID     string    `json:"kid,omitempty"`
	Principal string    `json:"principal,omitempty"`
	Result    string    `json:"result"`
	LatencyMS float64   `json:"latencyMs"`
	Error     string    `json:"error,omitempty"`
	Detail    string    `json:"detail,omitempty"`
}

// Audit appends events as JSON lines and mirrors them to slog. Safe for
// concurrent use.
type Audit struct {
	log *slog.Logger
	mu  sync.Mutex
	f   *os.File
}

// OpenAudit opens (appending) the audit log at path.
func OpenAudit(path string, log *slog.Logger) (*Audit, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	return &Audit{log: log, f: f}, nil
}

// Record writes one event. A failure to write is logged, not returned: the
// operation being audited has already happened.
func (a *Audit) Record(e AuditEvent) {
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	if e.Result == "" {
		e.Result = "success"
		if e.Error != "" {
			e.Result = "failure"
		}
	}
	line, _ := json.Marshal(e)
	line = append(line, '\n')
	a.mu.Lock()
	_, err := a.f.Write(line)
	a.mu.Unlock()
	if err != nil {
		a.log.Error("audit log write failed", "err", err)
	}
	a.log.Info("audit", "event", e.Event, "disk", e.Disk, "kid", e.KeyID, "principal", e.Principal,
		"result", e.Result, "latencyMs", e.LatencyMS, "error", e.Error)
}

// timed records an event for an operation that took since start.
func (a *Audit) timed(event, disk, kid, principal string, start time.Time, err error) {
	e := AuditEvent{Event: event, Disk: disk, KeyID: kid, Principal: principal,
		LatencyMS: float64(time.Since(start).Microseconds()) / 1000}
	if err != nil {
		e.Error = err.Error()
	}
	a.Record(e)
}

// Close closes the log file.
func (a *Audit) Close() error { return a.f.Close() }

// ReadAudit returns the events in r for disk (all if empty) at or after since.
func ReadAudit(_ context.Context, r io.Reader, disk string, since time.Time) ([]AuditEvent, error) {
	var out []AuditEvent
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var e AuditEvent
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			return nil, fmt.Errorf("audit: line %d: %w", len(out)+1, err)
		}
		if (disk == "" || e.Disk == disk) && !e.Time.Before(since) {
			out = append(out, e)
		}
	}
	if err := sc.Err(); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("audit: %w", err)
	}
	return out, nil
}
