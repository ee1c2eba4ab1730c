package nbdclient_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/cryptnbd/cryptnbd/cmd/cryptnbd/internal/nbdclient"
)

func TestParseURI(t *testing.T) {
	tests := []struct {
		uri     string
		want    nbdclient.Target
		wantErr bool
	}{
		{"nbd://localhost/disk", nbdclient.Target{Network: "tcp", Addr: "localhost:10809", Export: "disk"}, false},
		{"nbd://127.0.0.1:1234/a@b", nbdclient.Target{Network: "tcp", Addr: "127.0.0.1:1234", Export: "a@b"}, false},
		{"nbd+unix:///d?socket=/tmp/s", nbdclient.Target{Network: "unix", Addr: "/tmp/s", Export: "d"}, false},
		{"nbd+unix:///d", nbdclient.Target{}, true},
		{"nbds://h/d", nbdclient.Target{}, true},
		{"/some/file", nbdclient.Target{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.uri, func(t *testing.T) {
			got, err := nbdclient.ParseURI(tt.uri)
			if (err != nil) != tt.wantErr {
				t.Fatalf("ParseURI(%q) error %v, want error %t", tt.uri, err, tt.wantErr)
			}
			if err != nil && !errors.Is(err, nbdclient.ErrUnsupportedURI) {
				t.Errorf("error %v does not wrap ErrUnsupportedURI", err)
			}
			if got != tt.want {
				t.Errorf("ParseURI(%q) = %+v, want %+v", tt.uri, got, tt.want)
			}
		})
	}
}

// nbdkit starts `nbdkit memory` (read-only if ro) on a Unix socket and
// returns its URI.
func nbdkit(t *testing.T, size string, ro bool) string {
	t.Helper()
	if _, err := exec.LookPath("nbdkit"); err != nil {
		t.Skip("nbdkit not found: apt-get install nbdkit")
	}
	dir, err := os.MkdirTemp("/tmp", "nbdc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s")
	args := []string{"--foreground", "--exit-with-parent", "-U", sock}
	if ro {
		args = append(args, "-r")
	}
	args = append(args, "memory", size)
	cmd := exec.Command("nbdkit", args...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i > 200 {
			t.Fatal("nbdkit socket did not appear")
		}
		time.Sleep(25 * time.Millisecond)
	}
	return "nbd+unix:///?socket=" + sock
}

func TestReadWriteZeroFlush(t *testing.T) {
	uri := nbdkit(t, "8M", false)
	ctx := context.Background()
	c, err := nbdclient.Dial(ctx, uri)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, want := c.Size(), int64(8<<20); got != want {
		t.Errorf("Size() = %d, want %d", got, want)
	}
	if c.ReadOnly() {
		t.Error("ReadOnly() = true for a writable export")
	}
	data := bytes.Repeat([]byte("cryptnbd"), 128<<10) // 1 MiB
	if _, err := c.WriteAt(data, 4096+7); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if _, err := c.ReadAt(got, 4096+7); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("read back differs from what was written")
	}
	if err := c.Zero(8192, 4096); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReadAt(got[:4096], 8192); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:4096], make([]byte, 4096)) {
		t.Error("zeroed range does not read as zeros")
	}
	// Out of range: an error reply, and the connection carries on.
	var ne *nbdclient.Error
	if _, err := c.ReadAt(got[:4096], 8<<20); !errors.As(err, &ne) {
		t.Errorf("read past the end: %v, want an NBD error reply", err)
	}
	if _, err := c.ReadAt(got[:10], 4096+7); err != nil || !bytes.Equal(got[:10], data[:10]) {
		t.Errorf("read after an error reply: %v", err)
	}
}

func TestReadOnlyExport(t *testing.T) {
	uri := nbdkit(t, "1M", true)
	c, err := nbdclient.Dial(context.Background(), uri)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !c.ReadOnly() {
		t.Error("ReadOnly() = false for nbdkit -r")
	}
	var ne *nbdclient.Error
	if _, err := c.WriteAt(make([]byte, 512), 0); !errors.As(err, &ne) {
		t.Errorf("write to a read-only export: %v, want an NBD error reply", err)
	}
}
