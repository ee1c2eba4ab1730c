package filestore_test

import (
	"bytes"
	"context"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/cryptodisktest"
	"github.com/cryptnbd/cryptnbd/cryptodisk/filestore"
	"github.com/cryptnbd/cryptnbd/cryptodisk/storagetest"
)

var _ cryptodisk.Lender = (*filestore.File)(nil)

// mapDirs make the directories mapped files are tested in: a tmpfs, where
// pages are lent for writing too, and the test's own temporary directory
// (a disk filesystem on the machines the tests run on).
var mapDirs = map[string]func(t *testing.T) string{
	"tmpfs":   func(t *testing.T) string { return cryptodisktest.TmpfsDir(t) },
	"tempdir": func(t *testing.T) string { return t.TempDir() },
}

func createMapped(t *testing.T, path string, size int64) *filestore.File {
	t.Helper()
	f, err := filestore.Create(path, size)
	if err != nil {
		t.Fatal(err)
	}
	f.Map(nil)
	return f
}

// TestSuiteMapped: a mapped file keeps the whole Storage contract, its
// Grow (which moves the mapping) and Close (which removes it) included.
func TestSuiteMapped(t *testing.T) {
	for name, dir := range mapDirs {
		t.Run(name, func(t *testing.T) {
			storagetest.Suite{
				New: func(t *testing.T, size int64) cryptodisk.Storage {
					return createMapped(t, filepath.Join(dir(t), "disk.img"), size)
				},
				Reopen: func(t *testing.T, closed cryptodisk.Storage) cryptodisk.Storage {
					f, err := filestore.Open(closed.(*filestore.File).Path(), false)
					if err != nil {
						t.Fatal(err)
					}
					f.Map(nil)
					return f
				},
			}.Run(t)
		})
	}
}

// TestLend: only whole cached ranges of at least 64 KiB are lent; writing
// only on tmpfs; holes never, so that lending cannot fill a sparse image;
// and what is lent is the file's bytes, both ways.
func TestLend(t *testing.T) {
	ctx := context.Background()
	const mib = 1 << 20
	for name, dir := range mapDirs {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(dir(t), "disk.img")
			f := createMapped(t, path, 4*mib)
			defer f.Close()
			read, write := f.Mapped()
			if !read || write != (name == "tmpfs") {
				t.Fatalf("Mapped() = %v, %v; want true, %v", read, write, name == "tmpfs")
			}
			data := cryptodisktest.RandomBytes(rand.New(rand.NewPCG(1, 2)), mib)
			if err := f.WriteAt(ctx, data, mib); err != nil {
				t.Fatal(err)
			}
			for _, c := range []struct {
				what string
				off  int64
				n    int
			}{
				{"a hole", 0, mib},
				{"a range starting in a hole", mib - 4096, 64 << 10},
				{"less than 64 KiB", mib, 64<<10 - 1},
				{"a range past the end", 3 * mib, 2 * mib},
			} {
				if _, ok := borrow(f, c.off, c.n, false); ok {
					t.Errorf("Lend of %s lent it", c.what)
				}
			}
			got, ok := borrow(f, mib+4096, 256<<10, false)
			if !ok {
				t.Fatalf("Lend of cached written data declined")
			}
			if !bytes.Equal(got, data[4096:4096+256<<10]) {
				t.Errorf("lent bytes differ from the written ones")
			}
			checkHole(t, f, 0, mib)

			// Writing through a loan: tmpfs only, and never into a hole.
			pattern := bytes.Repeat([]byte{0xA5}, 64<<10)
			w := f.Lend(mib, 64<<10, true)
			if (w != nil) != write {
				t.Fatalf("Lend for write = %v, want lent %v", w != nil, write)
			}
			if w != nil {
				copy(w, pattern)
				f.Unlend()
				copy(data, pattern)
				got := make([]byte, 64<<10)
				if err := f.ReadAt(ctx, got, mib); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, pattern) {
					t.Errorf("bytes written through the loan do not read back with pread")
				}
				if _, ok := borrow(f, 2*mib, mib, true); ok {
					t.Errorf("Lend for write over a hole lent it; a full tmpfs would answer SIGBUS")
				}
			}

			// Grow moves the mapping; the new range is lent once cached,
			// and what was lent before still is, unchanged.
			if err := f.Grow(ctx, 64*mib); err != nil {
				t.Fatal(err)
			}
			if err := f.WriteAt(ctx, data, 60*mib); err != nil {
				t.Fatal(err)
			}
			for _, off := range []int64{60 * mib, mib} {
				got, ok := borrow(f, off, mib, false)
				if !ok {
					t.Errorf("Lend at %d after Grow declined cached data", off)
				} else if !bytes.Equal(got, data) {
					t.Errorf("lent bytes at %d after Grow differ", off)
				}
			}
		})
	}
}

// borrow copies what Lend lends, and ends the loan at once, so that a
// failing check cannot leave a loan that blocks Close.
func borrow(f *filestore.File, off int64, n int, write bool) ([]byte, bool) {
	b := f.Lend(off, n, write)
	if b == nil {
		return nil, false
	}
	defer f.Unlend()
	return bytes.Clone(b), true
}

func checkHole(t *testing.T, f *filestore.File, off, length int64) {
	t.Helper()
	err := f.Allocated(context.Background(), off, length, func(n int64, allocated bool) bool {
		if allocated {
			t.Errorf("[%d,+%d) of a never-written range became allocated", off, n)
		}
		off += n
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestLendReadOnly: a read-only file lends for reading, never for writing.
func TestLendReadOnly(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(cryptodisktest.TmpfsDir(t), "disk.img")
	f := createMapped(t, path, 1<<20)
	if err := f.WriteAt(ctx, make([]byte, 1<<20), 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	ro, err := filestore.Open(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	ro.Map(nil)
	if read, write := ro.Mapped(); !read || write {
		t.Errorf("Mapped() = %v, %v on a read-only tmpfs file; want true, false", read, write)
	}
	if _, ok := borrow(ro, 0, 1<<20, true); ok {
		t.Errorf("a read-only file lent its pages for writing")
	}
	if _, ok := borrow(ro, 0, 1<<20, false); !ok {
		t.Errorf("a read-only file declined to lend cached pages for reading")
	}
}

// TestUnmappedNeverLends: without Map, and after Close, nothing is lent.
func TestUnmappedNeverLends(t *testing.T) {
	ctx := context.Background()
	f, err := filestore.Create(filepath.Join(cryptodisktest.TmpfsDir(t), "disk.img"), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.WriteAt(ctx, make([]byte, 1<<20), 0); err != nil {
		t.Fatal(err)
	}
	if _, ok := borrow(f, 0, 1<<20, false); ok {
		t.Errorf("an unmapped file lent its pages")
	}
	f.Map(nil)
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if read, _ := f.Mapped(); read {
		t.Errorf("a closed file is still mapped")
	}
}

// TestAddressBudget: files map only what their shared budget has left, a
// grow past it drops the mapping, and closing gives the space back. A file
// left unmapped serves all the same.
func TestAddressBudget(t *testing.T) {
	ctx := context.Background()
	const mib = 1 << 20
	dir := cryptodisktest.TmpfsDir(t)
	budget := filestore.NewAddressBudget(3 * mib)
	open := func(name string, size int64) *filestore.File {
		t.Helper()
		f, err := filestore.Create(filepath.Join(dir, name), size)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		f.Map(budget)
		if err := f.WriteAt(ctx, bytes.Repeat([]byte{7}, int(size)), 0); err != nil {
			t.Fatal(err)
		}
		return f
	}
	mapped := func(f *filestore.File) bool { r, _ := f.Mapped(); return r }
	a := open("a", 2*mib)
	b := open("b", 2*mib)
	if !mapped(a) || mapped(b) {
		t.Fatalf("with 3 MiB for two 2 MiB files: mapped %v, %v; want true, false", mapped(a), mapped(b))
	}
	if _, ok := borrow(b, 0, mib, false); ok {
		t.Errorf("a file over the budget lent its pages")
	}
	got := make([]byte, mib)
	if err := b.ReadAt(ctx, got, mib); err != nil || got[0] != 7 {
		t.Errorf("ReadAt of the unmapped file = %v, byte %d", err, got[0])
	}
	if err := a.Grow(ctx, 4*mib); err != nil {
		t.Fatal(err)
	}
	if mapped(a) {
		t.Errorf("a file grown past the budget is still mapped")
	}
	if err := a.ReadAt(ctx, got, 0); err != nil || got[0] != 7 {
		t.Errorf("ReadAt after the mapping was dropped = %v, byte %d", err, got[0])
	}
	if c := open("c", 3*mib); !mapped(c) {
		t.Errorf("the budget was not given back when a's mapping was dropped")
	}
}

// TestMapBeyondAddressSpace: a sparse file larger than the process's
// address space cannot be mapped. It must still open and serve, unmapped,
// rather than fail: the mapping only saves a copy.
func TestMapBeyondAddressSpace(t *testing.T) {
	ctx := context.Background()
	f, err := filestore.Create(filepath.Join(cryptodisktest.TmpfsDir(t), "huge.img"), 1<<50)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.Map(nil)
	if read, _ := f.Mapped(); read {
		t.Fatalf("a 1 PiB file was mapped")
	}
	if err := f.WriteAt(ctx, []byte("end"), 1<<50-3); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 3)
	if err := f.ReadAt(ctx, got, 1<<50-3); err != nil || string(got) != "end" {
		t.Errorf("ReadAt = %q, %v", got, err)
	}
}
