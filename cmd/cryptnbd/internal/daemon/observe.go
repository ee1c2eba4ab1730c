package daemon

import (
	"net/url"
	"strings"
	"time"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/metrics"
)

// vaultKeyOf splits a kid into the bounded labels metrics use: the vault
// (or "platform") and the key name, never the version.
func vaultKeyOf(kid string) (vault, key string) {
	if rest, ok := strings.CutPrefix(kid, "platform:"); ok {
		parts := strings.Split(rest, "/")
		if len(parts) >= 2 {
			return "platform", parts[1]
		}
		return "platform", rest
	}
	u, err := url.Parse(kid)
	if err != nil {
		return "unknown", "unknown"
	}
	parts := strings.Split(strings.Trim(u.Path, "/"), "/")
	if len(parts) >= 2 && parts[0] == "keys" {
		return u.Scheme + "://" + u.Host, parts[1]
	}
	return u.Scheme + "://" + u.Host, "unknown"
}

func (m *Manager) dekUnwrapped(kid string) {
	if mx := m.cfg.Metrics; mx != nil {
		vault, key := vaultKeyOf(kid)
		mx.DEKUnwrapped(vault, key)
	}
}

func (m *Manager) vaultObserver(keyURL string) func(op string, status int, d time.Duration) {
	if m.cfg.Metrics == nil {
		return nil
	}
	vault, key := vaultKeyOf(keyURL)
	return m.cfg.Metrics.VaultObserver(vault, key)
}

// DiskStates is what the metrics' disk-state collector reads at each scrape.
func (m *Manager) DiskStates() []metrics.DiskState {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]metrics.DiskState, 0, len(m.disks))
	for _, e := range m.disks {
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

// Ready reports nil once every disk is open or deliberately suspended.
func (m *Manager) Ready() error {
	for _, d := range m.List() {
		if d.State != string(cryptodisk.StateActive) && d.State != string(cryptodisk.StateSuspended) {
			return &notReady{d.Name, d.State, d.StateReason}
		}
	}
	return nil
}

type notReady struct{ name, state, reason string }

func (e *notReady) Error() string {
	return "disk " + e.name + " is " + e.state + ": " + e.reason
}
