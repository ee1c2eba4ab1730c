package memstore_test

import (
	"context"
	"errors"
	"io/fs"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/memstore"
	"github.com/cryptnbd/cryptnbd/cryptodisk/storagetest"
)

var _ cryptodisk.Storage = (*memstore.Store)(nil)

func TestSuite(t *testing.T) {
	storagetest.Suite{
		New: func(t *testing.T, size int64) cryptodisk.Storage { return memstore.New(size) },
		Reopen: func(t *testing.T, closed cryptodisk.Storage) cryptodisk.Storage {
			return closed.(*memstore.Store).Reopen()
		},
	}.Run(t)
}

// TestPunchFreesPages checks the memory accounting the suite cannot see.
func TestPunchFreesPages(t *testing.T) {
	ctx := context.Background()
	s := memstore.New(1 << 20)
	if got := s.AllocatedBytes(); got != 0 {
		t.Fatalf("fresh store holds %d bytes, want 0", got)
	}
	// 3 pages: a write from the middle of page 1 to the middle of page 3.
	if err := s.WriteAt(ctx, make([]byte, 2*memstore.PageSize), memstore.PageSize+100); err != nil {
		t.Fatal(err)
	}
	if got, want := s.AllocatedBytes(), int64(3*memstore.PageSize); got != want {
		t.Fatalf("after a 3-page write: %d bytes held, want %d", got, want)
	}
	for _, tc := range []struct {
		name     string
		off, len int64
		want     int64
	}{
		{"PartialKeepsPage", memstore.PageSize, 512, 3 * memstore.PageSize},
		{"WholePage", 2 * memstore.PageSize, memstore.PageSize, 2 * memstore.PageSize},
		{"Everything", 0, 1 << 20, 0},
	} {
		if err := s.Punch(ctx, tc.off, tc.len); err != nil {
			t.Fatalf("%s: Punch: %v", tc.name, err)
		}
		if got := s.AllocatedBytes(); got != tc.want {
			t.Errorf("%s: %d bytes held, want %d", tc.name, got, tc.want)
		}
	}
}

func TestClosedHandle(t *testing.T) {
	ctx := context.Background()
	s := memstore.New(8192)
	if err := s.WriteAt(ctx, []byte("kept"), 10); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	buf := make([]byte, 4)
	for name, err := range map[string]error{
		"ReadAt":  s.ReadAt(ctx, buf, 10),
		"WriteAt": s.WriteAt(ctx, buf, 10),
		"Punch":   s.Punch(ctx, 0, 512),
		"Sync":    s.Sync(ctx),
		"Grow":    s.Grow(ctx, 1<<20),
		"Close":   s.Close(),
	} {
		if !errors.Is(err, fs.ErrClosed) {
			t.Errorf("%s on a closed store: got %v, want fs.ErrClosed", name, err)
		}
	}
	r := s.Reopen()
	if err := r.ReadAt(ctx, buf, 10); err != nil || string(buf) != "kept" {
		t.Errorf("after Reopen: ReadAt = %q, %v; want \"kept\"", buf, err)
	}
}
