package blobstore_test

import (
	"bytes"
	"context"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/blobstore"
	"github.com/cryptnbd/cryptnbd/cryptodisk/cryptodisktest"
)

const diskSize = 4 << 20

// pattern is a recognisable plaintext: if any 64 bytes of it appear in the
// blob, the disk leaked plaintext.
var pattern = bytes.Repeat([]byte("cryptnbd plaintext canary 0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ\n"), 1024) // 64 KiB

// TestDisk formats a cryptodisk.Disk on a page blob, writes through it,
// trims, closes, reopens from the blob with a second Store and reads back;
// then checks the raw blob with the SDK for plaintext.
func TestDisk(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newContainer(t)
	keys := cryptodisktest.NewKeys("blobstore")
	s := create(t, c, 0, blobstore.Options{Name: "disk"})
	d, err := cryptodisk.Create(ctx, s, keys, cryptodisk.CreateOptions{
		SizeBytes: diskSize, Provider: "test", PBKDFIterations: 1000,
	}, cryptodisk.Options{})
	if err != nil {
		t.Fatalf("cryptodisk.Create: %v", err)
	}
	// Disk.WriteAt encrypts in place, so it gets a copy.
	if err := d.WriteAt(ctx, bytes.Clone(pattern), 1<<20); err != nil {
		t.Fatalf("WriteAt: %v", err)
	}
	// An unaligned write goes through the disk's own read-modify-write.
	if err := d.WriteAt(ctx, []byte("unaligned"), 3<<20+100); err != nil {
		t.Fatalf("unaligned WriteAt: %v", err)
	}
	if err := d.Trim(ctx, 1<<20+32<<10, 16<<10); err != nil {
		t.Fatalf("Trim: %v", err)
	}
	if err := d.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if err := d.Close(); err != nil { // closes s, releasing the lease
		t.Fatalf("Disk.Close: %v", err)
	}

	want := make([]byte, diskSize)
	copy(want[1<<20:], pattern)
	clear(want[1<<20+32<<10 : 1<<20+48<<10])
	copy(want[3<<20+100:], "unaligned")

	s2, err := blobstore.Open(ctx, blobstore.Options{Container: c, Name: "disk", Holder: "second"})
	if err != nil {
		t.Fatalf("reopen store: %v", err)
	}
	d2, err := cryptodisk.Open(ctx, s2, keys, cryptodisk.Options{})
	if err != nil {
		t.Fatalf("cryptodisk.Open: %v", err)
	}
	defer d2.Close()
	got := make([]byte, diskSize)
	if err := d2.ReadAt(ctx, got, 0); err != nil {
		t.Fatalf("ReadAt: %v", err)
	}
	if i := cryptodisktest.FirstDiff(got, want); i >= 0 {
		t.Fatalf("reopened disk differs at byte %d: got %#x, want %#x", i, got[i], want[i])
	}
	// Extents: the trimmed range and never-written space are holes.
	var holes, data int64
	if err := d2.Extents(ctx, 1<<20, 64<<10, func(n int64, hole bool) bool {
		if hole {
			holes += n
		} else {
			data += n
		}
		return true
	}); err != nil {
		t.Fatalf("Extents: %v", err)
	}
	if holes != 16<<10 || data != 48<<10 {
		t.Errorf("Extents over the pattern: %d hole bytes and %d data bytes, want 16 KiB and 48 KiB", holes, data)
	}

	raw := download(t, c, "disk")
	if len(raw) != 16<<20+diskSize {
		t.Errorf("blob is %d bytes, want the 16 MiB header area plus %d", len(raw), diskSize)
	}
	if !bytes.HasPrefix(raw, []byte("LUKS\xba\xbe")) {
		t.Errorf("blob does not start with the LUKS2 magic")
	}
	for _, probe := range [][]byte{pattern[:64], pattern[5000:5064], []byte("unaligned")} {
		if i := bytes.Index(raw, probe); i >= 0 {
			t.Errorf("plaintext %q found in the blob at byte %d", probe[:16], i)
		}
	}
}
