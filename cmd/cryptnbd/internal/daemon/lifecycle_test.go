package daemon_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/cryptnbd/cryptnbd/cmd/cryptnbd/internal/daemon"
)

func openState(t *testing.T) *daemon.State {
	t.Helper()
	st, err := daemon.OpenState(context.Background(), daemon.StateOptions{DataDir: t.TempDir(), PBKDFIterations: 1000, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close(context.Background()) })
	return st
}

// TestSnapshotWhileWriting takes snapshots while writers hammer the disk
// in-process, so the race detector sees the barrier against the write path.
func TestSnapshotWhileWriting(t *testing.T) {
	ctx := context.Background()
	st := openState(t)
	m := st.Manager
	if _, err := m.Create(ctx, daemon.CreateRequest{Name: "d", SizeBytes: 4 << 20}); err != nil {
		t.Fatal(err)
	}
	exp, err := m.Export(ctx, "d")
	if err != nil {
		t.Fatal(err)
	}
	defer exp.Release()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			buf := bytes.Repeat([]byte{byte(w + 1)}, 4096)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				p := bytes.Clone(buf)
				if err := exp.Backend.WriteAt(ctx, p, int64((i*4+w)%1024)*4096); err != nil {
					t.Errorf("write: %v", err)
					return
				}
			}
		})
	}
	for _, name := range []string{"a", "b", "c"} {
		if _, err := m.CreateSnapshot(ctx, daemon.SnapshotRequest{Name: name, Source: "d"}); err != nil {
			t.Errorf("snapshot %s: %v", name, err)
		}
	}
	close(stop)
	wg.Wait()
	if got := len(m.ListSnapshots("d")); got != 3 {
		t.Errorf("ListSnapshots = %d snapshots, want 3", got)
	}
	se, err := m.Export(ctx, "d@b")
	if err != nil {
		t.Fatal(err)
	}
	defer se.Release()
	if !se.ReadOnly {
		t.Error("snapshot export is not read-only")
	}
	if _, err := m.CreateSnapshot(ctx, daemon.SnapshotRequest{Name: "a", Source: "d"}); !errors.Is(err, daemon.ErrExists) {
		t.Errorf("second snapshot named a: %v, want ErrExists", err)
	}
	if err := m.Delete(ctx, "d", false); err == nil {
		t.Error("delete of a disk with snapshots succeeded without force")
	}
}

// TestImportThroughLocalClient drives import and export through the
// in-process client, whose transport streams: a short image leaves nothing
// behind, a whole one round-trips.
func TestImportThroughLocalClient(t *testing.T) {
	ctx := context.Background()
	st := openState(t)
	c := daemon.NewLocalClient(daemon.NewAPI(st.Manager, st.AuditPath()))
	img := make([]byte, 3<<20)
	for i := range img {
		if i < 1<<20 || i >= 2<<20 { // a zero MiB in the middle
			img[i] = byte(i * 7)
		}
	}
	req := daemon.CreateRequest{Name: "imp", SizeBytes: int64(len(img))}

	_, err := c.ImportDisk(ctx, req, bytes.NewReader(img[:1<<20]))
	var se *daemon.StatusError
	if !errors.As(err, &se) || se.Status != 400 {
		t.Errorf("short import: %v, want a 400", err)
	}
	if disks, _ := c.ListDisks(ctx); len(disks) != 0 {
		t.Errorf("after a short import, disks: %+v", disks)
	}
	if files, _ := filepath.Glob(filepath.Join(st.DataDir, "disks", "*")); len(files) != 0 {
		t.Errorf("after a short import, files: %q", files)
	}

	if _, err := c.ImportDisk(ctx, req, bytes.NewReader(img)); err != nil {
		t.Fatal(err)
	}
	size, body, err := c.ExportDisk(ctx, "imp")
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(body)
	body.Close()
	if err != nil || size != int64(len(img)) || !bytes.Equal(got, img) {
		t.Errorf("export: size %d, %d bytes, err %v, equal %t", size, len(got), err, bytes.Equal(got, img))
	}
	if _, err := c.ImportDisk(ctx, req, bytes.NewReader(img)); err == nil {
		t.Error("import over an existing disk succeeded")
	}
	if _, err := os.Stat(filepath.Join(st.DataDir, "disks", "imp.luks")); err != nil {
		t.Errorf("the existing disk was harmed by the refused import: %v", err)
	}
}
