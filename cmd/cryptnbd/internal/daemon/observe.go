package daemon

import (
	"context"
	"time"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/keys"
	"github.com/cryptnbd/cryptnbd/metrics"
)

// expiryChecker passes the watcher's key checks through, recording each
// key's expiry for the near-expiry alert.
type expiryChecker struct {
	keys.Checker
	mx *metrics.Metrics
}

func (c expiryChecker) Status(ctx context.Context, kid string) (keys.KeyStatus, error) {
	st, err := c.Checker.Status(ctx, kid)
	if err == nil && c.mx != nil {
		vault, key := metrics.KeyLabels(kid)
		c.mx.KeyExpiry(vault, key, st.Expires)
	}
	return st, err
}

func (m *Manager) dekUnwrapped(kid string) {
	if mx := m.cfg.Metrics; mx != nil {
		vault, key := metrics.KeyLabels(kid)
		mx.DEKUnwrapped(vault, key)
	}
}

func (m *Manager) vaultObserver(keyURL string) func(op string, status int, d time.Duration) {
	if m.cfg.Metrics == nil {
		return nil
	}
	vault, key := metrics.KeyLabels(keyURL)
	return m.cfg.Metrics.VaultObserver(vault, key)
}

// DiskStates is what the metrics' disk-state collector reads at each scrape.
func (m *Manager) DiskStates() []metrics.DiskState {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]metrics.DiskState, 0, len(m.disks))
	for _, e := range m.disks {
		if e.remote {
			continue // served by another daemon, which reports it
		}
		ds := metrics.DiskState{Name: e.name, State: "Unavailable"}
		if e.disk != nil {
			st, reason, since := e.disk.State()
			ds.State, ds.Reason, ds.Held = string(st), reason, e.disk.Held()
			if st == cryptodisk.StateSuspended {
				ds.SuspendedSeconds = time.Since(since).Seconds()
			}
		}
		out = append(out, ds)
	}
	return out
}

// Ready reports nil once every disk is open or deliberately suspended
// (disks of a shared store that other daemons serve do not count).
func (m *Manager) Ready() error {
	for _, d := range m.List() {
		if d.State != string(cryptodisk.StateActive) && d.State != string(cryptodisk.StateSuspended) && d.State != StateDetached {
			return &notReady{d.Name, d.State, d.StateReason}
		}
	}
	return nil
}

type notReady struct{ name, state, reason string }

func (e *notReady) Error() string {
	return "disk " + e.name + " is " + e.state + ": " + e.reason
}
