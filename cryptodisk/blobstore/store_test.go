package blobstore_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/blobstore"
	"github.com/cryptnbd/cryptnbd/cryptodisk/storagetest"
)

var _ cryptodisk.Storage = (*blobstore.Store)(nil)

var blobs atomic.Int64

// create makes a new disk blob in c held by holder.
func create(t *testing.T, c *container.Client, size int64, o blobstore.Options) *blobstore.Store {
	t.Helper()
	o.Container = c
	if o.Name == "" {
		o.Name = fmt.Sprintf("disk%d", blobs.Add(1))
	}
	if o.Holder == "" {
		o.Holder = "test-daemon"
	}
	s, err := blobstore.Create(context.Background(), o, size, nil)
	if err != nil {
		t.Fatalf("Create %s: %v", o.Name, err)
	}
	return s
}

func TestSuite(t *testing.T) {
	t.Parallel()
	c := newContainer(t)
	storagetest.Suite{
		New: func(t *testing.T, size int64) cryptodisk.Storage {
			return create(t, c, size, blobstore.Options{})
		},
		Reopen: func(t *testing.T, closed cryptodisk.Storage) cryptodisk.Storage {
			s, err := blobstore.Open(context.Background(), blobstore.Options{
				Container: c, Name: closed.(*blobstore.Store).Name(), Holder: "second-daemon",
			})
			if err != nil {
				t.Fatalf("reopen: %v", err)
			}
			return s
		},
	}.Run(t)
}

// TestLargeUnaligned crosses several 4 MiB Upload Pages calls with ragged
// edges, so chunking, concurrency and edge read-modify-write all run.
func TestLargeUnaligned(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := create(t, newContainer(t), 12<<20, blobstore.Options{MaxConcurrency: 3})
	defer s.Close()
	want := make([]byte, 12<<20)
	data := bytes.Repeat([]byte("0123456789abcdef"), (9<<20)/16+7)
	const off = 1<<20 + 333
	if err := s.WriteAt(ctx, data, off); err != nil {
		t.Fatalf("WriteAt: %v", err)
	}
	copy(want[off:], data)
	got := make([]byte, len(want))
	if err := s.ReadAt(ctx, got, 0); err != nil {
		t.Fatalf("ReadAt: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read back differs")
	}
	var runs []string
	if err := s.Allocated(ctx, 0, s.Size(), func(n int64, alloc bool) bool {
		runs = append(runs, fmt.Sprintf("%d:%v", n, alloc))
		return true
	}); err != nil {
		t.Fatal(err)
	}
	// Whole pages are allocated: from the page holding off to the one
	// holding the last byte.
	first, last := int64(off)&^511, (int64(off)+int64(len(data))+511)&^511
	wantRuns := []string{fmt.Sprintf("%d:false", first), fmt.Sprintf("%d:true", last-first), fmt.Sprintf("%d:false", 12<<20-last)}
	if fmt.Sprint(runs) != fmt.Sprint(wantRuns) {
		t.Errorf("Allocated runs %v, want %v", runs, wantRuns)
	}
}

func TestCreateAndOpenErrors(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newContainer(t)
	s := create(t, c, 4096, blobstore.Options{Name: "exists"})
	defer s.Close()
	for _, tc := range []struct {
		name string
		run  func() error
		want error
	}{
		{"CreateExisting", func() error {
			_, err := blobstore.Create(ctx, blobstore.Options{Container: c, Name: "exists"}, 4096, nil)
			return err
		}, fs.ErrExist},
		{"OpenMissing", func() error {
			_, err := blobstore.Open(ctx, blobstore.Options{Container: c, Name: "missing"})
			return err
		}, fs.ErrNotExist},
		{"ShortLeaseDuration", func() error {
			_, err := blobstore.Create(ctx, blobstore.Options{Container: c, Name: "lease5", LeaseDuration: 5 * time.Second}, 4096, nil)
			return err
		}, nil},
		{"FractionalLeaseDuration", func() error {
			_, err := blobstore.Create(ctx, blobstore.Options{Container: c, Name: "lease20", LeaseDuration: 20500 * time.Millisecond}, 4096, nil)
			return err
		}, nil},
		{"BadMetadataKey", func() error {
			_, err := blobstore.Create(ctx, blobstore.Options{Container: c, Name: "meta"}, 4096, map[string]string{"Bad-Key": "x"})
			return err
		}, nil},
		{"ReservedMetadataKey", func() error {
			_, err := blobstore.Create(ctx, blobstore.Options{Container: c, Name: "meta"}, 4096, map[string]string{"blobstore_holder": "x"})
			return err
		}, nil},
		{"NonASCIIMetadata", func() error {
			_, err := blobstore.Create(ctx, blobstore.Options{Container: c, Name: "meta"}, 4096, map[string]string{"name": "dïsk"})
			return err
		}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.run()
			if err == nil {
				t.Fatalf("succeeded, want an error")
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("got %v, want an error matching %v", err, tc.want)
			}
		})
	}
}

func TestMetadata(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newContainer(t)
	meta := map[string]string{"name": "web-01", "sector_size": "4096", "des": "des-prod"}
	s, err := blobstore.Create(ctx, blobstore.Options{Container: c, Name: "m", Holder: "daemon-a"}, 8192, meta)
	if err != nil {
		t.Fatal(err)
	}
	if got := s.Metadata(); fmt.Sprint(got) != fmt.Sprint(meta) {
		t.Errorf("Metadata() = %v, want %v", got, meta)
	}
	meta["name"] = "web-02"
	delete(meta, "des")
	if err := s.SetMetadata(ctx, meta); err != nil {
		t.Fatalf("SetMetadata: %v", err)
	}
	infos, err := blobstore.List(ctx, c)
	if err != nil || len(infos) != 1 {
		t.Fatalf("List = %v, %v; want one disk", infos, err)
	}
	if got := infos[0]; fmt.Sprint(got.Metadata) != fmt.Sprint(meta) || got.Holder != "daemon-a" {
		t.Errorf("List after SetMetadata: metadata %v holder %q; want %v and daemon-a (SetMetadata must keep the holder)",
			got.Metadata, got.Holder, meta)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	r, err := blobstore.Open(ctx, blobstore.Options{Container: c, Name: "m", Holder: "daemon-b"})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if got := r.Metadata(); fmt.Sprint(got) != fmt.Sprint(meta) {
		t.Errorf("reopened Metadata() = %v, want %v", got, meta)
	}
	if got := r.Holder(); got != "daemon-b" {
		t.Errorf("Holder() = %q, want daemon-b", got)
	}
}

func TestSnapshot(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newContainer(t)
	s := create(t, c, 64<<10, blobstore.Options{Name: "snap"})
	defer s.Close()
	before := bytes.Repeat([]byte{0xA1}, 8192)
	if err := s.WriteAt(ctx, before, 4096); err != nil {
		t.Fatal(err)
	}
	id, err := s.Snapshot(ctx)
	if err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	if err := s.WriteAt(ctx, bytes.Repeat([]byte{0xB2}, 8192), 4096); err != nil {
		t.Fatal(err)
	}
	if err := s.Punch(ctx, 8192, 4096); err != nil {
		t.Fatal(err)
	}
	snap, err := blobstore.OpenSnapshot(ctx, c, "snap", id, blobstore.Options{})
	if err != nil {
		t.Fatalf("OpenSnapshot: %v", err)
	}
	defer snap.Close()
	got := make([]byte, 8192)
	if err := snap.ReadAt(ctx, got, 4096); err != nil {
		t.Fatalf("snapshot ReadAt: %v", err)
	}
	if !bytes.Equal(got, before) {
		t.Errorf("snapshot does not hold the data from before it was taken")
	}
	var allocated int64
	if err := snap.Allocated(ctx, 0, snap.Size(), func(n int64, alloc bool) bool {
		if alloc {
			allocated += n
		}
		return true
	}); err != nil {
		t.Fatal(err)
	}
	if allocated != 8192 {
		t.Errorf("snapshot Allocated: %d bytes allocated, want 8192", allocated)
	}
	for name, err := range map[string]error{
		"WriteAt": snap.WriteAt(ctx, got, 0),
		"Punch":   snap.Punch(ctx, 0, 512),
		"Grow":    snap.Grow(ctx, 1<<20),
	} {
		if !errors.Is(err, syscall.EROFS) || !errors.Is(err, blobstore.ErrReadOnly) {
			t.Errorf("%s on a snapshot: got %v, want ErrReadOnly (EROFS)", name, err)
		}
	}
	if err := s.ReadAt(ctx, got, 4096); err != nil || got[0] != 0xB2 || got[4096] != 0 {
		t.Errorf("base blob after snapshot: got %#x,%#x (%v); want the later write and the punched hole", got[0], got[4096], err)
	}
}

func TestDelete(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newContainer(t)
	s := create(t, c, 4096, blobstore.Options{Name: "gone"})
	if _, err := s.Snapshot(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if _, err := blobstore.Open(ctx, blobstore.Options{Container: c, Name: "gone"}); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Open after Delete: got %v, want fs.ErrNotExist", err)
	}
	if err := s.WriteAt(ctx, []byte{1}, 0); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("WriteAt after Delete: got %v, want fs.ErrClosed", err)
	}
}
