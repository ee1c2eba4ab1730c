package blobstore_test

import (
	"bytes"
	"context"
	"errors"
	"syscall"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/lease"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"

	"github.com/cryptnbd/cryptnbd/cryptodisk/blobstore"
)

// download reads the whole blob with the SDK, bypassing the Store.
func download(t *testing.T, c *container.Client, name string) []byte {
	t.Helper()
	props, err := c.NewBlobClient(name).GetProperties(context.Background(), nil)
	if err != nil {
		t.Fatalf("get properties of %s: %v", name, err)
	}
	buf := make([]byte, *props.ContentLength)
	if _, err := c.NewBlobClient(name).DownloadBuffer(context.Background(), buf, nil); err != nil {
		t.Fatalf("download %s: %v", name, err)
	}
	return buf
}

// wantLeased checks that err is a *LeasedError naming holder.
func wantLeased(t *testing.T, err error, holder string) {
	t.Helper()
	var le *blobstore.LeasedError
	if !errors.Is(err, blobstore.ErrLeased) || !errors.As(err, &le) {
		t.Fatalf("got %v, want a *LeasedError matching ErrLeased", err)
	}
	if le.Holder != holder {
		t.Errorf("LeasedError.Holder = %q, want %q (error: %v)", le.Holder, holder, err)
	}
}

func TestSecondOpenNamesHolder(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newContainer(t)
	a := create(t, c, 8192, blobstore.Options{Name: "d", Holder: "daemon-a@host1"})
	_, err := blobstore.Open(ctx, blobstore.Options{Container: c, Name: "d", Holder: "daemon-b@host2"})
	wantLeased(t, err, "daemon-a@host1")
	// The failed attempt changed nothing: a still writes.
	if err := a.WriteAt(ctx, make([]byte, 512), 0); err != nil {
		t.Errorf("holder's write after a refused Open: %v", err)
	}
	// Close releases the lease at once: no waiting for it to expire.
	if err := a.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	b, err := blobstore.Open(ctx, blobstore.Options{Container: c, Name: "d", Holder: "daemon-b@host2"})
	if err != nil {
		t.Fatalf("Open after the holder closed: %v", err)
	}
	defer b.Close()
	if err := b.WriteAt(ctx, make([]byte, 512), 0); err != nil {
		t.Errorf("new holder's write: %v", err)
	}
}

// TestBreakFromOutside breaks the lease with the SDK, as an operator or
// another daemon's takeover would: the holder's next write must fail with
// ErrLeaseLost and EIO, OnLeaseLost must fire, and nothing it writes after
// the break may reach the blob.
func TestBreakFromOutside(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newContainer(t)
	lostCalled := make(chan struct{}, 2)
	s := create(t, c, 64<<10, blobstore.Options{Name: "d", OnLeaseLost: func() { lostCalled <- struct{}{} }})
	old := bytes.Repeat([]byte{0x11}, 4096)
	if err := s.WriteAt(ctx, old, 0); err != nil {
		t.Fatal(err)
	}
	lc, err := lease.NewBlobClient(c.NewPageBlobClient("d"), nil)
	if err != nil {
		t.Fatal(err)
	}
	zero := int32(0)
	if _, err := lc.BreakLease(ctx, &lease.BlobBreakOptions{BreakPeriod: &zero}); err != nil {
		t.Fatalf("BreakLease: %v", err)
	}
	for _, tc := range []struct {
		name string
		op   func() error
	}{
		{"AlignedWrite", func() error { return s.WriteAt(ctx, bytes.Repeat([]byte{0x22}, 4096), 0) }},
		{"UnalignedWrite", func() error { return s.WriteAt(ctx, []byte{0x33, 0x33}, 100) }},
		{"Punch", func() error { return s.Punch(ctx, 0, 4096) }},
		{"Grow", func() error { return s.Grow(ctx, 128<<10) }},
		{"Sync", func() error { return s.Sync(ctx) }},
	} {
		err := tc.op()
		if !errors.Is(err, blobstore.ErrLeaseLost) || !errors.Is(err, syscall.EIO) {
			t.Errorf("%s after the break: got %v, want ErrLeaseLost and EIO", tc.name, err)
		}
	}
	select {
	case <-lostCalled:
	case <-time.After(10 * time.Second):
		t.Fatalf("OnLeaseLost was not called")
	}
	if !s.LeaseLost() {
		t.Errorf("LeaseLost() = false after the break")
	}
	// Reads still work, and show only what was written before the break.
	got := make([]byte, 4096)
	if err := s.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, old) {
		t.Errorf("ReadAt after the break: %v (equal to what was written before: %v)", err, bytes.Equal(got, old))
	}
	if blobBytes := download(t, c, "d"); !bytes.Equal(blobBytes[:4096], old) || len(blobBytes) != 64<<10 {
		t.Errorf("blob changed after the break (size %d, first page equal: %v)", len(blobBytes), bytes.Equal(blobBytes[:4096], old))
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close after losing the lease: %v", err)
	}
	select {
	case <-lostCalled:
		t.Errorf("OnLeaseLost called twice")
	default:
	}
	// The disk is free for anyone now.
	b, err := blobstore.Open(ctx, blobstore.Options{Container: c, Name: "d", Holder: "b"})
	if err != nil {
		t.Fatalf("Open after the break: %v", err)
	}
	b.Close()
}

// TestTakeoverByBreak is `disk attach --force`: daemon B breaks A's lease.
func TestTakeoverByBreak(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newContainer(t)
	lost := make(chan struct{})
	a := create(t, c, 64<<10, blobstore.Options{Name: "d", Holder: "a", OnLeaseLost: func() { close(lost) }})
	defer a.Close()
	b, err := blobstore.Open(ctx, blobstore.Options{Container: c, Name: "d", Holder: "b", BreakLease: true})
	if err != nil {
		t.Fatalf("Open with BreakLease: %v", err)
	}
	defer b.Close()
	if err := b.WriteAt(ctx, bytes.Repeat([]byte{0xBB}, 512), 0); err != nil {
		t.Fatalf("new holder's write: %v", err)
	}
	if err := a.WriteAt(ctx, bytes.Repeat([]byte{0xAA}, 512), 0); !errors.Is(err, blobstore.ErrLeaseLost) {
		t.Errorf("old holder's write after takeover: got %v, want ErrLeaseLost", err)
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Errorf("old holder's OnLeaseLost was not called")
	}
	if got := download(t, c, "d")[0]; got != 0xBB {
		t.Errorf("first byte %#x, want the new holder's 0xbb", got)
	}
	infos, err := blobstore.List(ctx, c)
	if err != nil || len(infos) != 1 || infos[0].Holder != "b" || infos[0].LeaseState != "leased" {
		t.Errorf("List = %+v, %v; want d leased by b", infos, err)
	}
}

// TestExpiryTakeover: a holder that stops renewing (here a bare SDK lease
// that nobody renews, as a crashed daemon leaves) loses the disk once its
// 15 s lease expires, and a waiting Open takes it.
func TestExpiryTakeover(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newContainer(t)
	s := create(t, c, 8192, blobstore.Options{Name: "d"})
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	pb := c.NewPageBlobClient("d")
	crashed, err := lease.NewBlobClient(pb, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := crashed.AcquireLease(ctx, 15, nil); err != nil {
		t.Fatalf("AcquireLease: %v", err)
	}
	holder := "crashed-daemon"
	if _, err := pb.SetMetadata(ctx, map[string]*string{"blobstore_holder": &holder},
		&blob.SetMetadataOptions{AccessConditions: &blob.AccessConditions{LeaseAccessConditions: &blob.LeaseAccessConditions{LeaseID: crashed.LeaseID()}}}); err != nil {
		t.Fatal(err)
	}
	_, err = blobstore.Open(ctx, blobstore.Options{Container: c, Name: "d", Holder: "b"})
	wantLeased(t, err, "crashed-daemon")

	wctx, cancel := context.WithTimeout(ctx, 40*time.Second)
	defer cancel()
	b, err := blobstore.Open(wctx, blobstore.Options{Container: c, Name: "d", Holder: "b", WaitForExpiry: true, LeaseDuration: 15 * time.Second})
	if err != nil {
		t.Fatalf("Open with WaitForExpiry: %v", err)
	}
	defer b.Close()
	// The crashed holder's lease ID no longer writes.
	_, err = pb.UploadPages(ctx, streaming.NopCloser(bytes.NewReader(bytes.Repeat([]byte{0xCC}, 512))), blob.HTTPRange{Offset: 0, Count: 512},
		&pageblob.UploadPagesOptions{AccessConditions: &blob.AccessConditions{LeaseAccessConditions: &blob.LeaseAccessConditions{LeaseID: crashed.LeaseID()}}})
	if err == nil {
		t.Errorf("a write with the expired lease's ID succeeded")
	}
	if err := b.WriteAt(ctx, bytes.Repeat([]byte{0xBB}, 512), 0); err != nil {
		t.Errorf("new holder's write: %v", err)
	}
	if got := b.Holder(); got != "b" {
		t.Errorf("Holder() = %q, want b", got)
	}
}

// TestRenewal holds a 15 s lease for 17 s: the background
// renewal must keep it, so writes still work and others are still refused.
func TestRenewal(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newContainer(t)
	s := create(t, c, 8192, blobstore.Options{Name: "d", Holder: "a", LeaseDuration: 15 * time.Second})
	defer s.Close()
	time.Sleep(17 * time.Second)
	if err := s.WriteAt(ctx, make([]byte, 512), 0); err != nil {
		t.Errorf("write after 17 s under a 15 s lease: %v", err)
	}
	_, err := blobstore.Open(ctx, blobstore.Options{Container: c, Name: "d", Holder: "b"})
	wantLeased(t, err, "a")
	if s.LeaseLost() {
		t.Errorf("LeaseLost() = true")
	}
}
