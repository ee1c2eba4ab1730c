package filestore_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cryptnbd/cryptnbd/cryptodisk/filestore"
)

// TestReadAtNoWait: in memory ReadAtNoWait is ReadAt; on a disk filesystem
// it serves pages in the page cache and declines, with EAGAIN, what the
// kernel would have to read from the device.
func TestReadAtNoWait(t *testing.T) {
	ctx := context.Background()
	data := bytes.Repeat([]byte("no-wait!"), 128<<10) // 1 MiB
	for name, dir := range mapDirs {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(dir(t), "disk.img")
			f, err := filestore.Create(path, int64(len(data)))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if err := f.WriteAt(ctx, data, 0); err != nil {
				t.Fatal(err)
			}
			if err := f.Sync(ctx); err != nil {
				t.Fatal(err)
			}
			inMemory := name == "tmpfs"
			if !inMemory && f.InMemory() {
				t.Skipf("%s is in memory here: no device to wait for", dir(t))
			}
			if f.InMemory() != inMemory {
				t.Fatalf("InMemory() = %v on %s", f.InMemory(), name)
			}
			// Drop the clean pages from the cache (tmpfs keeps them: they
			// are the file). The kernel may keep a page it is still
			// handling for a moment, hence the retries.
			drop, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer drop.Close()
			got := make([]byte, len(data))
			for range 50 {
				if err := unix.Fadvise(int(drop.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
					t.Fatal(err)
				}
				err = f.ReadAtNoWait(ctx, got, 0)
				if inMemory || err != nil {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			if inMemory {
				if err != nil || !bytes.Equal(got, data) {
					t.Fatalf("ReadAtNoWait in memory = %v, data equal %v", err, bytes.Equal(got, data))
				}
				return
			}
			if !errors.Is(err, syscall.EAGAIN) {
				t.Fatalf("ReadAtNoWait of pages not cached = %v, want EAGAIN", err)
			}
			if err := f.ReadAt(ctx, got, 0); err != nil {
				t.Fatal(err)
			}
			clear(got)
			if err := f.ReadAtNoWait(ctx, got, 0); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("ReadAtNoWait of cached pages = %v, data equal %v", err, bytes.Equal(got, data))
			}
			if err := f.ReadAtNoWait(ctx, got[:10], int64(len(data))-5); !errors.Is(err, syscall.EINVAL) {
				t.Fatalf("ReadAtNoWait beyond the end = %v, want EINVAL", err)
			}
		})
	}
}
