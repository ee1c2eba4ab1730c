// Package metricstest helps tests that need a metrics.Metrics with every
// family present, such as checks of dashboards and alert rules.
package metricstest

import (
	"context"
	"errors"
	"syscall"
	"time"

	"github.com/cryptnbd/cryptnbd/metrics"
)

// Exercise touches every cryptnbd metric family of m once, so that a
// scrape shows them all: I/O of each op on disk "test" (one failing),
// a connection, a suspended disk source, Key Vault calls, watcher events
// for a vault key, a key expiry and DEK unwraps. It replaces m's disk
// source.
func Exercise(m *metrics.Metrics) {
	ctx := context.Background()
	for _, b := range []metrics.Backend{
		m.WrapBackend("test", nop{}),
		m.WrapBackend("test", nop{err: syscall.EIO}),
	} {
		p := make([]byte, 4096)
		b.ReadAt(ctx, p, 0)
		b.WriteAt(ctx, p, 0)
		b.Flush(ctx)
		b.Trim(ctx, 0, 4096)
		b.Zero(ctx, 0, 4096, false, false)
		b.Cache(ctx, 0, 4096)
		b.Extents(ctx, 0, 4096, func(int64, bool) bool { return true })
	}
	m.ConnOpened("test")
	m.SetDiskSource(func() []metrics.DiskState {
		return []metrics.DiskState{
			{Name: "test", State: "Active"},
			{Name: "revoked", State: "Suspended", Reason: "KeyDisabled", SuspendedSeconds: 12, Held: 3},
		}
	})
	const vault, key = "example.vault.azure.net", "disk-key"
	obs := m.VaultObserver(vault, key)
	obs("get", 200, 20*time.Millisecond)
	obs("unwrapKey", 403, 30*time.Millisecond)
	m.SetKeyGrace(time.Hour)
	m.KeyEvent(vault, key, "check", "", 0, nil)
	m.KeyEvent(vault, key, "transient", "KeyVaultUnreachable", 30*time.Minute, errors.New("connection refused"))
	m.KeyExpiry(vault, key, time.Now().Add(30*24*time.Hour))
	m.DEKUnwrapped(vault, key)
	m.DEKUnwrapped(metrics.PlatformVault, "platform-master")
}

// Families are the names of every cryptnbd family, as Exercise leaves
// them (histograms by their base name).
var Families = []string{
	"cryptnbd_disk_requests_total",
	"cryptnbd_disk_bytes_total",
	"cryptnbd_disk_request_duration_seconds",
	"cryptnbd_disk_requests_in_flight",
	"cryptnbd_disk_connections",
	"cryptnbd_disk_state",
	"cryptnbd_disk_suspended",
	"cryptnbd_disk_suspended_seconds_total",
	"cryptnbd_disk_held_requests",
	"cryptnbd_keyvault_requests_total",
	"cryptnbd_keyvault_request_duration_seconds",
	"cryptnbd_key_status",
	"cryptnbd_key_last_success_timestamp_seconds",
	"cryptnbd_key_grace_remaining_seconds",
	"cryptnbd_key_expiry_timestamp_seconds",
	"cryptnbd_dek_unwraps_total",
}

type nop struct{ err error }

func (n nop) ReadAt(context.Context, []byte, int64) error          { return n.err }
func (n nop) WriteAt(context.Context, []byte, int64) error         { return n.err }
func (n nop) Flush(context.Context) error                          { return n.err }
func (n nop) Trim(context.Context, int64, int64) error             { return n.err }
func (n nop) Zero(context.Context, int64, int64, bool, bool) error { return n.err }
func (n nop) Cache(context.Context, int64, int64) error            { return n.err }
func (n nop) Extents(context.Context, int64, int64, func(int64, bool) bool) error {
	return n.err
}
func (n nop) Size() int64 { return 1 << 20 }
