package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/blobstore/azuritetest"
	"github.com/cryptnbd/cryptnbd/keys/kvserver"
	"github.com/cryptnbd/cryptnbd/keys/kvserver/kvservertest"
)

// azurite is the package's Azure Storage emulator, started by the first
// test that needs a shared store.
var azurite azuritetest.Shared

func TestMain(m *testing.M) {
	code := m.Run()
	azurite.Stop()
	os.Exit(code)
}

// TestStopWatchOutsideManagerLock stands in for the watcher's stop function
// while a Resume of the disk is waiting on Key Vault: it returns only when
// released. Deleting the disk or its snapshot must wait for it before
// closing the disk, but must not hold the manager's lock meanwhile, or
// every other disk operation would stall for as long as the unwrap takes.
func TestStopWatchOutsideManagerLock(t *testing.T) {
	ctx := context.Background()
	m := managerWithDisks(t, nil)
	if _, err := m.CreateSnapshot(ctx, SnapshotRequest{Name: "s", Source: "d"}); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name   string
		entry  func() *entry
		delete func() error
		after  func() bool // the entry is gone
	}{
		{
			name:   "delete snapshot",
			entry:  func() *entry { return m.snaps["d@s"] },
			delete: func() error { return m.DeleteSnapshot(ctx, "d@s", false) },
			after:  func() bool { _, ok := m.snaps["d@s"]; return !ok },
		},
		{
			name:   "delete disk",
			entry:  func() *entry { return m.disks["d"] },
			delete: func() error { return m.Delete(ctx, "d", false) },
			after:  func() bool { _, ok := m.disks["d"]; return !ok },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkStopOutsideLock(t, m, tt.entry, tt.delete, tt.after)
		})
	}
}

// TestDetachStopsWatchOutsideManagerLock is the same check for Detach,
// which only disks on a shared store have.
func TestDetachStopsWatchOutsideManagerLock(t *testing.T) {
	ctx := context.Background()
	// The emulator outlives a test; a fresh container keeps runs apart.
	container := fmt.Sprintf("stopwatch-%d-%d", os.Getpid(), time.Now().UnixNano())
	m := managerWithDisks(t, &StoreConfig{Kind: StoreAzblob, Container: container, ConnectionString: azurite.ConnString(t)})
	checkStopOutsideLock(t, m,
		func() *entry { return m.disks["d"] },
		func() error { _, err := m.Detach(ctx, "d", false); return err },
		func() bool { e := m.disks["d"]; return e != nil && e.disk == nil },
	)
}

// managerWithDisks opens a data directory on store (nil: files) with
// disks "d" and "other".
func managerWithDisks(t *testing.T, store *StoreConfig) *Manager {
	t.Helper()
	ctx := context.Background()
	st, err := OpenState(ctx, StateOptions{DataDir: t.TempDir(), PBKDFIterations: 1000, Logger: slog.New(slog.DiscardHandler), Store: store})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close(context.Background()) })
	for _, name := range []string{"d", "other"} {
		if _, err := st.Manager.Create(ctx, CreateRequest{Name: name, SizeBytes: 1 << 20}); err != nil {
			t.Fatal(err)
		}
	}
	return st.Manager
}

// checkStopOutsideLock gives the entry a watch whose stop blocks until
// released, runs del, and checks that the manager answers for another
// disk while del waits, that del neither returns nor closes the disk
// before the stop returns, and that after holds afterwards (it runs under
// m.mu).
func checkStopOutsideLock(t *testing.T, m *Manager, entryOf func() *entry, del func() error, after func() bool) {
	t.Helper()
	entered, release := make(chan struct{}), make(chan struct{})
	m.mu.Lock()
	e := entryOf()
	if e == nil || e.disk == nil {
		m.mu.Unlock()
		t.Fatal("entry not open")
	}
	d := e.disk
	e.stopWatch = func() { close(entered); <-release }
	m.mu.Unlock()
	released := false
	defer func() {
		if !released {
			close(release)
		}
	}()

	done := make(chan error, 1)
	go func() { done <- del() }()
	<-entered
	shown := make(chan error, 1)
	go func() { _, err := m.Show("other"); shown <- err }()
	select {
	case err := <-shown:
		if err != nil {
			t.Errorf("Show(other) while the watch was stopping: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the manager stayed locked while waiting for the watch to stop")
	}
	select {
	case err := <-done:
		t.Fatalf("returned (%v) before the watch had stopped", err)
	default:
	}
	if state, _, _ := d.State(); state == cryptodisk.StateClosed {
		t.Error("disk closed before its watch had stopped")
	}
	released = true
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	m.mu.Lock()
	ok := after()
	m.mu.Unlock()
	if !ok {
		t.Error("not in the state expected after it returned")
	}
}

// TestRotationStopsOldWatchOutsideManagerLock is the same check for the
// watch a rotation replaces: RotateDES re-wraps the disk under the key's
// new version, then stops the watch of the old one.
func TestRotationStopsOldWatchOutsideManagerLock(t *testing.T) {
	ctx := context.Background()
	in := kvservertest.Start(t, kvserver.Options{PurgeProtection: true})
	kc := in.KeysClient(t, in.Credential(t, ""), nil)
	key, err := kc.CreateKey(ctx, "dk", azkeys.CreateKeyParameters{Kty: to.Ptr(azkeys.KeyTypeRSA), KeySize: to.Ptr[int32](2048)}, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Init points the process's managed-identity variables at the vault;
	// t.Setenv restores them afterwards.
	t.Setenv("IDENTITY_ENDPOINT", "")
	t.Setenv("IDENTITY_HEADER", "")
	vc := &VaultConfig{LocalVaultDir: in.Options.DataDir}
	if err := vc.Init(); err != nil {
		t.Fatal(err)
	}
	st, err := OpenState(ctx, StateOptions{DataDir: t.TempDir(), PBKDFIterations: 1000, Logger: slog.New(slog.DiscardHandler), Vault: vc})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close(context.Background()) })
	m := st.Manager
	des, err := m.CreateDES(ctx, DESRequest{Name: "des1", KeyURL: string(*key.Key.KID)})
	if err != nil {
		t.Fatal(err)
	}
	if err := in.Admin.SetPolicy(ctx, des.Identity.PrincipalID, []string{"get", "wrapKey", "unwrapKey"}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Create(ctx, CreateRequest{Name: "d", SizeBytes: 1 << 20, DES: "des1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Create(ctx, CreateRequest{Name: "other", SizeBytes: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	rotated, err := kc.RotateKey(ctx, "dk", nil)
	if err != nil {
		t.Fatal(err)
	}
	checkStopOutsideLock(t, m,
		func() *entry { return m.disks["d"] },
		func() error { _, err := m.RotateDES(ctx, "des1"); return err },
		// Not gone: watched again, under the new version.
		func() bool {
			e := m.disks["d"]
			return e.stopWatch != nil && e.disk.Token().KeyID == string(*rotated.Key.KID)
		},
	)
}
