package cryptodisk_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/cryptodisktest"
	"github.com/cryptnbd/cryptnbd/cryptodisk/filestore"
	"github.com/cryptnbd/cryptnbd/cryptodisk/memstore"
)

// backend makes stores for disk tests.
type backend struct {
	name string
	// new returns an empty store and a function that opens its data
	// again after it was closed.
	new func(t *testing.T) (cryptodisk.Storage, func(t *testing.T) cryptodisk.Storage)
}

var backends = []backend{
	{"mem", func(t *testing.T) (cryptodisk.Storage, func(*testing.T) cryptodisk.Storage) {
		s := memstore.New(0)
		return s, func(*testing.T) cryptodisk.Storage { return s.Reopen() }
	}},
	{"file", func(t *testing.T) (cryptodisk.Storage, func(*testing.T) cryptodisk.Storage) {
		path := filepath.Join(t.TempDir(), "disk.img")
		f, err := filestore.Create(path, 0)
		if err != nil {
			t.Fatal(err)
		}
		return f, func(t *testing.T) cryptodisk.Storage {
			f, err := filestore.Open(path, false)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}},
}

var sectorSizes = []int{4096, 512}

// forEach runs f for every backend and sector size.
func forEach(t *testing.T, f func(t *testing.T, b backend, ss int)) {
	for _, b := range backends {
		for _, ss := range sectorSizes {
			t.Run(fmt.Sprintf("%s/%d", b.name, ss), func(t *testing.T) { f(t, b, ss) })
		}
	}
}

const testSeed = "disk-tests"

// env is one disk under test with what made it.
type env struct {
	d      *cryptodisk.Disk
	store  cryptodisk.Storage
	reopen func(t *testing.T) cryptodisk.Storage
	keys   *cryptodisktest.Keys
	size   int64
}

// newEnv creates a disk of size bytes on a new store of b. The disk is
// closed at the end of the test.
func newEnv(t *testing.T, b backend, ss int, size int64, o cryptodisk.Options) *env {
	t.Helper()
	store, reopen := b.new(t)
	e := &env{store: store, reopen: reopen, keys: cryptodisktest.NewKeys(testSeed), size: size}
	e.d = create(t, store, e.keys, ss, size, o)
	return e
}

func create(t *testing.T, store cryptodisk.Storage, w cryptodisk.KeyWrapper, ss int, size int64, o cryptodisk.Options) *cryptodisk.Disk {
	t.Helper()
	d, err := cryptodisk.Create(context.Background(), store, w, cryptodisk.CreateOptions{
		SizeBytes: size, SectorSize: ss, Provider: "test", Label: "test disk",
		Properties: map[string]string{"name": "disk0"},
	}, o)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// reopenDisk closes e's disk and opens it again from a fresh store handle.
func (e *env) reopenDisk(t *testing.T, u cryptodisk.KeyUnwrapper) {
	t.Helper()
	if err := e.d.Flush(context.Background()); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if err := e.d.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	e.store = e.reopen(t)
	d, err := cryptodisk.Open(context.Background(), e.store, u, cryptodisk.Options{})
	if err != nil {
		e.store.Close()
		t.Fatalf("Open after reopen: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	e.d = d
}

// write writes a copy of data (WriteAt may overwrite its buffer).
func write(t *testing.T, d *cryptodisk.Disk, data []byte, off int64) {
	t.Helper()
	if err := d.WriteAt(context.Background(), bytes.Clone(data), off); err != nil {
		t.Fatalf("WriteAt(%d+%d): %v", off, len(data), err)
	}
}

// checkDisk reads the whole disk and compares it with want.
func checkDisk(t *testing.T, d *cryptodisk.Disk, want []byte) {
	t.Helper()
	got := bytes.Repeat([]byte{0xEE}, len(want))
	if err := d.ReadAt(context.Background(), got, 0); err != nil {
		t.Fatalf("ReadAt whole disk: %v", err)
	}
	if i := cryptodisktest.FirstDiff(got, want); i >= 0 {
		t.Fatalf("disk differs from model at byte %d (sector %d of 512): got %#x, want %#x", i, i/512, got[i], want[i])
	}
}

// extent is one run reported by Disk.Extents.
type extent struct {
	n    int64
	hole bool
}

func extents(t *testing.T, d *cryptodisk.Disk, off, length int64) []extent {
	t.Helper()
	var out []extent
	err := d.Extents(context.Background(), off, length, func(n int64, hole bool) bool {
		if k := len(out); k > 0 && out[k-1].hole == hole {
			out[k-1].n += n
		} else {
			out = append(out, extent{n, hole})
		}
		return true
	})
	if err != nil {
		t.Fatalf("Extents(%d, %d): %v", off, length, err)
	}
	return out
}

// isHole reports whether Extents reports all of [off, off+length) as a hole
// (1), all as data (0), or a mix (-1).
func holeState(t *testing.T, d *cryptodisk.Disk, off, length int64) int {
	t.Helper()
	ex := extents(t, d, off, length)
	var total int64
	for _, e := range ex {
		total += e.n
	}
	if total != length {
		t.Fatalf("Extents(%d, %d) covered %d bytes: %v", off, length, total, ex)
	}
	switch {
	case len(ex) == 1 && ex[0].hole:
		return 1
	case len(ex) == 1:
		return 0
	}
	return -1
}

// storeRW adapts a Storage to io.ReaderAt and io.WriterAt for luks2.
type storeRW struct{ s cryptodisk.Storage }

func (a storeRW) ReadAt(p []byte, off int64) (int, error) {
	if err := a.s.ReadAt(context.Background(), p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (a storeRW) WriteAt(p []byte, off int64) (int, error) {
	if err := a.s.WriteAt(context.Background(), p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

func jsonMarshal(v any) (json.RawMessage, error) { return json.Marshal(v) }
