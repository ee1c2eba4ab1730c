package daemon

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
)

// TestStopWatchOutsideManagerLock stands in for the watcher's stop function
// while a Resume of the disk is waiting on Key Vault: it returns only when
// released. Deleting the disk or its snapshot must wait for it before
// closing the disk, but must not hold the manager's lock meanwhile, or
// every other disk operation would stall for as long as the unwrap takes.
func TestStopWatchOutsideManagerLock(t *testing.T) {
	ctx := context.Background()
	st, err := OpenState(ctx, StateOptions{DataDir: t.TempDir(), PBKDFIterations: 1000, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close(context.Background()) })
	m := st.Manager
	for _, name := range []string{"d", "other"} {
		if _, err := m.Create(ctx, CreateRequest{Name: name, SizeBytes: 1 << 20}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := m.CreateSnapshot(ctx, SnapshotRequest{Name: "s", Source: "d"}); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name   string
		entry  func() *entry
		delete func() error
		gone   func() bool
	}{
		{
			name:   "delete snapshot",
			entry:  func() *entry { return m.snaps["d@s"] },
			delete: func() error { return m.DeleteSnapshot(ctx, "d@s", false) },
			gone:   func() bool { return len(m.ListSnapshots("d")) == 0 },
		},
		{
			name:   "delete disk",
			entry:  func() *entry { return m.disks["d"] },
			delete: func() error { return m.Delete(ctx, "d", false) },
			gone:   func() bool { _, err := m.Show("d"); return err != nil },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			entered, release := make(chan struct{}), make(chan struct{})
			m.mu.Lock()
			e := tt.entry()
			if e == nil || e.disk == nil {
				m.mu.Unlock()
				t.Fatal("entry not open")
			}
			e.stopWatch = func() { close(entered); <-release }
			m.mu.Unlock()
			released := false
			defer func() {
				if !released {
					close(release)
				}
			}()

			done := make(chan error, 1)
			go func() { done <- tt.delete() }()
			<-entered
			shown := make(chan error, 1)
			go func() { _, err := m.Show("other"); shown <- err }()
			select {
			case err := <-shown:
				if err != nil {
					t.Errorf("Show(other) while the watch was stopping: %v", err)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("the manager stayed locked while the delete waited for the watch to stop")
			}
			select {
			case err := <-done:
				t.Fatalf("delete returned (%v) before the watch had stopped", err)
			default:
			}
			if state, _, _ := e.disk.State(); state == cryptodisk.StateClosed {
				t.Error("disk closed before its watch had stopped")
			}
			released = true
			close(release)
			if err := <-done; err != nil {
				t.Fatalf("delete: %v", err)
			}
			if !tt.gone() {
				t.Error("still listed after the delete")
			}
		})
	}
}
