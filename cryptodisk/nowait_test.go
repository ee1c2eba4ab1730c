package cryptodisk_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/cryptodisktest"
	"github.com/cryptnbd/cryptnbd/cryptodisk/filestore"
	"github.com/cryptnbd/cryptnbd/cryptodisk/memstore"
)

var (
	_ cryptodisk.NoWaitStorage = (*filestore.File)(nil)
	_ cryptodisk.NoWaitStorage = (*memstore.Store)(nil)
)

// hookedNoWait is a Hooked memory store that serves no-wait reads straight
// from memory, so a test can hold a request inside the store while it
// tries others beside it; with wait set they fail with EAGAIN, as a store
// whose pages are not cached does.
type hookedNoWait struct {
	*cryptodisktest.Hooked
	mem  *memstore.Store
	wait *atomic.Bool
}

func (h hookedNoWait) ReadAtNoWait(ctx context.Context, p []byte, off int64) error {
	if h.wait.Load() {
		return fmt.Errorf("hookedNoWait: not cached: %w", syscall.EAGAIN)
	}
	return h.mem.ReadAtNoWait(ctx, p, off)
}

func (hookedNoWait) InMemory() bool { return true }

func newHookedNoWait(t *testing.T, ss int) (*cryptodisk.Disk, hookedNoWait, *cryptodisktest.Keys) {
	t.Helper()
	mem := memstore.New(0)
	h := hookedNoWait{cryptodisktest.Hook(mem), mem, new(atomic.Bool)}
	keys := cryptodisktest.NewKeys(testSeed)
	return create(t, h, keys, ss, diskSize, cryptodisk.Options{}), h, keys
}

// TestTryMatchesBlocking: what TryReadAt and TryWriteAt serve is exactly
// what ReadAt and WriteAt would have, at every alignment. On a store in
// memory they serve every read and every whole-sector write; they decline
// partial-sector writes (a read-modify-write may wait) leaving p as it was,
// and writes to a store on a device.
func TestTryMatchesBlocking(t *testing.T) {
	stores := append([]backend{}, backends...)
	stores = append(stores, backend{"tmpfs", func(t *testing.T) (cryptodisk.Storage, func(*testing.T) cryptodisk.Storage) {
		f, err := filestore.Create(filepath.Join(cryptodisktest.TmpfsDir(t), "disk.img"), 0)
		if err != nil {
			t.Fatal(err)
		}
		return f, nil
	}})
	for _, b := range stores {
		for _, ss := range sectorSizes {
			t.Run(fmt.Sprintf("%s/%d", b.name, ss), func(t *testing.T) {
				e := newEnv(t, b, ss, diskSize, cryptodisk.Options{})
				inMemory := e.store.(cryptodisk.NoWaitStorage).InMemory()
				if want := b.name != "file"; inMemory != want {
					t.Fatalf("InMemory() = %v on %s, want %v", inMemory, b.name, want)
				}
				ctx := context.Background()
				rng := rand.New(rand.NewPCG(uint64(ss), 7))
				model := make([]byte, diskSize)
				var reads, writes, declinedWrites int
				for i := range 400 {
					off := rng.Int64N(diskSize - 1)
					n := 1 + rng.Int64N(min(3*int64(ss), diskSize-off))
					if i%2 == 0 { // whole sectors half of the time
						off = off / int64(ss) * int64(ss)
						n = (n + int64(ss) - 1) / int64(ss) * int64(ss)
						n = min(n, (diskSize-off)/int64(ss)*int64(ss))
					}
					if rng.IntN(2) == 0 {
						data := make([]byte, n)
						for j := range data {
							data[j] = byte(rng.Uint32()) | 1
						}
						p := bytes.Clone(data)
						ok, err := e.d.TryWriteAt(ctx, p, off)
						if err != nil {
							t.Fatalf("TryWriteAt(%d+%d): %v", off, n, err)
						}
						whole := off%int64(ss) == 0 && n%int64(ss) == 0
						if ok != (whole && inMemory) {
							t.Fatalf("TryWriteAt(%d+%d) served = %v on %s (sector %d)", off, n, ok, b.name, ss)
						}
						if !ok {
							declinedWrites++
							if !bytes.Equal(p, data) {
								t.Fatalf("declined TryWriteAt(%d+%d) changed its buffer", off, n)
							}
							write(t, e.d, data, off)
						} else {
							writes++
						}
						copy(model[off:], data)
						continue
					}
					got := bytes.Repeat([]byte{0xEE}, int(n))
					ok, err := e.d.TryReadAt(ctx, got, off)
					if err != nil {
						t.Fatalf("TryReadAt(%d+%d): %v", off, n, err)
					}
					if !ok {
						// Only a store on a device may decline: the kernel
						// can drop the image's pages from its cache.
						if inMemory {
							t.Fatalf("TryReadAt(%d+%d) declined on %s", off, n, b.name)
						}
						continue
					}
					reads++
					if i := cryptodisktest.FirstDiff(got, model[off:off+n]); i >= 0 {
						t.Fatalf("TryReadAt(%d+%d) differs at byte %d", off, n, i)
					}
				}
				checkDisk(t, e.d, model)
				if reads == 0 || (inMemory && writes == 0) || declinedWrites == 0 {
					t.Fatalf("served %d reads and %d writes, declined %d writes: the test did not exercise both paths", reads, writes, declinedWrites)
				}
				if got := e.d.WritesCompleted(); got != uint64(writes+declinedWrites) {
					t.Errorf("WritesCompleted() = %d after %d writes", got, writes+declinedWrites)
				}
			})
		}
	}
}

// TestTryNeverWaits: where ReadAt or WriteAt would wait (a store that would
// have to read from its device, a suspended key, Suspend waiting for the
// gate, a stripe held by a read-modify-write) the Try methods return false
// and no error at once, change nothing and are not counted as held; where
// nothing stands in the way, they serve.
func TestTryNeverWaits(t *testing.T) {
	d, h, keys := newHookedNoWait(t, 4096)
	ctx := context.Background()
	sector := bytes.Repeat([]byte{0x5a}, 4096)
	write(t, d, sector, 8192)
	write(t, d, sector, 0)

	// attempt runs one Try call, failing the test if it waits.
	attempt := func(what string, read bool, p []byte, off int64) bool {
		t.Helper()
		res := make(chan bool, 1)
		go func() {
			var ok bool
			var err error
			if read {
				ok, err = d.TryReadAt(ctx, p, off)
			} else {
				ok, err = d.TryWriteAt(ctx, p, off)
			}
			if err != nil {
				t.Errorf("%s: %v", what, err)
			}
			res <- ok
		}()
		select {
		case ok := <-res:
			return ok
		case <-time.After(10 * time.Second):
			t.Fatalf("%s waited", what)
			return false
		}
	}
	try := func(what string, read bool, off int64, wantOK bool) {
		t.Helper()
		p := bytes.Repeat([]byte{0x77}, 4096)
		ok := attempt(what, read, p, off)
		if ok != wantOK {
			t.Fatalf("%s served = %v, want %v", what, ok, wantOK)
		}
		if !ok && !read && !bytes.Equal(p, bytes.Repeat([]byte{0x77}, 4096)) {
			t.Fatalf("%s declined but changed its buffer", what)
		}
		if ok && read && !bytes.Equal(p, sector) {
			t.Fatalf("%s read the wrong data", what)
		}
	}

	// The store's own EAGAIN is a decline, not an error.
	h.wait.Store(true)
	try("TryReadAt of pages the store would wait for", true, 0, false)
	h.wait.Store(false)
	try("TryReadAt of the same pages cached", true, 0, true)

	// A partial-sector write stopped inside the store holds sector 2's
	// stripe exclusively.
	gate := h.Stop(opWrite)
	t.Cleanup(gate.Release) // before Close, should the test fail with it stopped
	partial := goErr(func() error { return d.WriteAt(ctx, bytes.Clone(sector[:512]), 8192+512) })
	<-gate.Entered
	try("TryReadAt beside a read-modify-write", true, 8192, false)
	try("TryWriteAt beside a read-modify-write", false, 8192, false)
	try("TryReadAt elsewhere", true, 0, true)

	// Suspend now waits for that write; Try must not queue behind it.
	writes := d.WritesCompleted()
	suspended := goErr(func() error { d.Suspend("test"); return nil })
	waitFor(t, "Suspend to wait for the gate", func() bool {
		return !attempt("TryReadAt while Suspend waits", true, make([]byte, 4096), 0)
	})
	try("TryWriteAt while Suspend waits", false, 4096, false)
	gate.Release()
	if err := await(t, "partial write", partial); err != nil {
		t.Fatal(err)
	}
	await(t, "Suspend", suspended)
	writes++ // the partial write

	try("TryReadAt while suspended", true, 0, false)
	try("TryWriteAt while suspended", false, 4096, false)
	if d.Held() != 0 || d.WritesCompleted() != writes {
		t.Fatalf("after declined requests: Held() = %d, WritesCompleted() = %d, want 0, %d", d.Held(), d.WritesCompleted(), writes)
	}
	if err := d.Resume(ctx, keys); err != nil {
		t.Fatal(err)
	}
	try("TryReadAt after Resume", true, 0, true)
	try("TryWriteAt after Resume", false, 4096, true)
}

// TestTryWithoutNoWaitStore: a store that cannot promise not to wait gets
// no Try request; they decline before touching it.
func TestTryWithoutNoWaitStore(t *testing.T) {
	e, h := newHookedEnv(t, 4096)
	ctx := context.Background()
	h.Fail(opRead, syscall.EIO)
	h.Fail(opWrite, syscall.EIO)
	p := make([]byte, 4096)
	if ok, err := e.d.TryReadAt(ctx, p, 0); ok || err != nil {
		t.Errorf("TryReadAt = %v, %v; want false, nil", ok, err)
	}
	if ok, err := e.d.TryWriteAt(ctx, p, 0); ok || err != nil {
		t.Errorf("TryWriteAt = %v, %v; want false, nil", ok, err)
	}
}
