package cryptodisk_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/cryptodisktest"
	"github.com/cryptnbd/cryptnbd/cryptodisk/filestore"
)

// lending is a mapped file that counts the loans it grants, and can run a
// hook between granting one and handing it over.
type lending struct {
	*filestore.File
	reads, writes atomic.Int64
	afterLend     func(write bool)
}

func (l *lending) Lend(off int64, n int, write bool) []byte {
	b := l.File.Lend(off, n, write)
	if b == nil {
		return nil
	}
	if write {
		l.writes.Add(1)
	} else {
		l.reads.Add(1)
	}
	if l.afterLend != nil {
		l.afterLend(write)
	}
	return b
}

// lendDirs: on tmpfs the file lends its pages both ways; in the test's
// temporary directory (a disk filesystem here) for reading only.
var lendDirs = []struct {
	name   string
	dir    func(t *testing.T) string
	writes bool
}{
	{"tmpfs", func(t *testing.T) string { return cryptodisktest.TmpfsDir(t) }, true},
	{"tempdir", func(t *testing.T) string { return t.TempDir() }, false},
}

func newLending(t *testing.T, path string) *lending {
	t.Helper()
	f, err := filestore.Create(path, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Map(nil)
	return &lending{File: f}
}

// TestLentPages: a disk whose store lends its pages reads and writes the
// same bytes as one that copies. Four goroutines write and read large,
// aligned and unaligned ranges against a model; then the image is opened
// again without a mapping and must hold exactly the model, so the bytes
// written in place are the ones WriteAt would have written. Ranges never
// written read as zeros and stay holes.
func TestLentPages(t *testing.T) {
	const (
		size    = 16 << 20
		workers = 4
		block   = size / 2 / workers // the upper half stays unwritten
	)
	for _, ld := range lendDirs {
		for _, ss := range sectorSizes {
			t.Run(fmt.Sprintf("%s/%d", ld.name, ss), func(t *testing.T) {
				ctx := context.Background()
				path := filepath.Join(ld.dir(t), "disk.img")
				store := newLending(t, path)
				keys := cryptodisktest.NewKeys(testSeed)
				d := create(t, store, keys, ss, size, cryptodisk.Options{})
				model := make([]byte, size)
				var wg sync.WaitGroup
				errs := make(chan error, workers)
				for g := range workers {
					wg.Go(func() {
						r := rand.New(rand.NewPCG(uint64(g), uint64(ss)))
						base := int64(g * block)
						for i := range 24 {
							n := int64(64<<10 + r.IntN(1<<20))
							if i%2 == 0 {
								n = n / int64(ss) * int64(ss)
							}
							off := base + r.Int64N(block-n)
							if i%2 == 0 {
								off = off / int64(ss) * int64(ss)
							}
							data := cryptodisktest.RandomBytes(r, int(n))
							if err := d.WriteAt(ctx, append([]byte(nil), data...), off); err != nil {
								errs <- fmt.Errorf("goroutine %d: WriteAt(%d+%d): %w", g, off, n, err)
								return
							}
							copy(model[off:], data)
							// Read back a range around it, which now starts
							// and ends anywhere in this goroutine's block.
							lo := base + r.Int64N(off-base+1)
							hi := off + n + r.Int64N(base+block-off-n+1)
							got := make([]byte, hi-lo)
							if err := d.ReadAt(ctx, got, lo); err != nil {
								errs <- fmt.Errorf("goroutine %d: ReadAt(%d+%d): %w", g, lo, hi-lo, err)
								return
							}
							if j := cryptodisktest.FirstDiff(got, model[lo:hi]); j >= 0 {
								errs <- fmt.Errorf("goroutine %d: ReadAt(%d+%d) differs from the model at byte %d", g, lo, hi-lo, lo+int64(j))
								return
							}
						}
					})
				}
				wg.Wait()
				close(errs)
				for err := range errs {
					t.Error(err)
				}
				checkDisk(t, d, model)
				if store.reads.Load() == 0 {
					t.Errorf("no read was served from lent pages")
				}
				if got := store.writes.Load(); (got > 0) != ld.writes {
					t.Errorf("%d writes went to lent pages; want some: %v", got, ld.writes)
				}
				if ext := extents(t, d, size/2, size/2); len(ext) != 1 || !ext[0].hole {
					t.Errorf("the never-written half reports extents %v after being read; want one hole", ext)
				}
				if err := d.Flush(ctx); err != nil {
					t.Fatal(err)
				}
				if err := d.Close(); err != nil {
					t.Fatal(err)
				}
				plain, err := filestore.Open(path, true)
				if err != nil {
					t.Fatal(err)
				}
				d2, err := cryptodisk.Open(ctx, plain, keys, cryptodisk.Options{})
				if err != nil {
					plain.Close()
					t.Fatal(err)
				}
				defer d2.Close()
				checkDisk(t, d2, model)
			})
		}
	}
}

// TestLentPagesFault: if the image shrinks under a loan (someone truncated
// the file), touching the lent pages faults. That must be the request's
// EIO, not a crash of the daemon, and the disk must keep serving.
func TestLentPagesFault(t *testing.T) {
	const size = 4 << 20
	for _, ld := range lendDirs {
		t.Run(ld.name, func(t *testing.T) {
			ctx := context.Background()
			path := filepath.Join(ld.dir(t), "disk.img")
			store := newLending(t, path)
			d := create(t, store, cryptodisktest.NewKeys(testSeed), 4096, size, cryptodisk.Options{})
			data := cryptodisktest.RandomBytes(rand.New(rand.NewPCG(7, 7)), 1<<20)
			write(t, d, data, 1<<20)
			write(t, d, data, 2<<20)
			buf := make([]byte, 1<<20)
			if err := d.ReadAt(ctx, buf, 1<<20); err != nil { // caches it everywhere
				t.Fatal(err)
			}
			full := store.Size()
			var armed atomic.Bool
			store.afterLend = func(bool) {
				if armed.CompareAndSwap(true, false) {
					if err := os.Truncate(path, 0); err != nil {
						t.Error(err)
					}
				}
			}
			armed.Store(true)
			err := d.ReadAt(ctx, buf, 1<<20)
			if !errors.Is(err, syscall.EIO) {
				t.Errorf("ReadAt from pages truncated under the loan: %v, want EIO", err)
			}
			if armed.Load() {
				t.Fatalf("the read was not served from lent pages")
			}
			if ld.writes {
				if err := os.Truncate(path, full); err != nil {
					t.Fatal(err)
				}
				write(t, d, data, 1<<20) // pwrite: the pages are holes now
				if err := d.ReadAt(ctx, buf, 1<<20); err != nil {
					t.Fatal(err)
				}
				armed.Store(true)
				err := d.WriteAt(ctx, append([]byte(nil), data...), 1<<20)
				if !errors.Is(err, syscall.EIO) {
					t.Errorf("WriteAt to pages truncated under the loan: %v, want EIO", err)
				}
				if armed.Load() {
					t.Fatalf("the write was not made to lent pages")
				}
			}
			// The file is back to its size, and the disk serves it again.
			if err := os.Truncate(path, full); err != nil {
				t.Fatal(err)
			}
			write(t, d, data, 3<<20)
			if err := d.ReadAt(ctx, buf, 3<<20); err != nil || cryptodisktest.FirstDiff(buf, data) >= 0 {
				t.Errorf("after the fault, ReadAt = %v or wrong data", err)
			}
		})
	}
}
