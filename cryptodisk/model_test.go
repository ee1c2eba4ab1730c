package cryptodisk_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/cryptodisktest"
	"github.com/cryptnbd/cryptnbd/cryptodisk/memstore"
)

// TestModel runs random overlapping, unaligned reads, writes, zeroes and
// trims from several goroutines against an in-memory model, under -race.
//
// The disk has two parts. In the small shared part goroutine g owns the chunks
// of sectorSize/8 bytes whose index is g modulo the number of goroutines, so
// every sector holds bytes of every goroutine and each request is a partial
// sector: the read-modify-write of one goroutine races with the others'
// writes and reads of the same sector. In the private part each goroutine
// owns one contiguous block, where long requests cover whole sectors (the
// in-place body, holes, encrypted zeros). Each goroutine checks its reads
// against the model; at the end the whole disk must equal it. Between
// rounds the shared part is trimmed, so sectors go from hole to data while
// others read them.
func TestModel(t *testing.T) {
	bs := append(backends[:len(backends):len(backends)], backend{"tearing", func(t *testing.T) (cryptodisk.Storage, func(*testing.T) cryptodisk.Storage) {
		s := memstore.New(0)
		return tearing{s}, func(*testing.T) cryptodisk.Storage { return tearing{s.Reopen()} }
	}})
	for _, b := range bs {
		for _, ss := range sectorSizes {
			if b.name == "tearing" && ss == 512 {
				continue // the 4096-byte case tears more per sector
			}
			t.Run(fmt.Sprintf("%s/%d", b.name, ss), func(t *testing.T) { testModel(t, b, ss) })
		}
	}
}

func testModel(t *testing.T, b backend, ss int) {
	const (
		workers = 4
		rounds  = 8
		size    = 512 << 10
		block   = (size - 64<<10) / workers
	)
	// The shared part is small, so the goroutines keep meeting in it.
	shared := 8 * ss
	ops := 40
	if testing.Short() {
		ops = 10
	}
	e := newEnv(t, b, ss, size, cryptodisk.Options{})
	ctx := context.Background()
	chunk := int64(ss / 8)
	model := make([]byte, size)
	for round := range rounds {
		// Between rounds the shared part goes back to holes, so that
		// first writes into unwritten sectors race with reads again.
		if round > 0 {
			if err := e.d.Trim(ctx, 0, int64(shared)); err != nil {
				t.Fatal(err)
			}
			clear(model[:shared])
		}
		var wg sync.WaitGroup
		errs := make(chan error, workers)
		for g := range workers {
			wg.Go(func() {
				r := rand.New(rand.NewPCG(uint64(g), uint64(ss*rounds+round)))
				for i := range ops {
					var off, n int64
					if r.IntN(2) == 0 {
						// Part of one of g's chunks in the shared part.
						c := int64(r.IntN(shared/int(chunk)/workers))*workers + int64(g)
						lo := int64(r.IntN(int(chunk)))
						off, n = c*chunk+lo, 1+int64(r.IntN(int(chunk-lo)))
					} else {
						base := int64(size - (workers-g)*block)
						off = base + int64(r.IntN(block))
						n = 1 + int64(r.IntN(int(min(base+block-off, 20000))))
					}
					if err := modelOp(ctx, r, e.d, model, off, n); err != nil {
						errs <- fmt.Errorf("round %d, goroutine %d, op %d: %w", round, g, i, err)
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
		if t.Failed() {
			return
		}
	}
	checkDisk(t, e.d, model)
	// And again from the image, through a new unlock.
	e.reopenDisk(t, e.keys)
	checkDisk(t, e.d, model)
}

// tearing is a store whose calls are not atomic: it moves data in 40-byte
// pieces and yields between them, as a store may (Linux does not make a
// pread atomic against a concurrent pwrite of the same page). The Storage
// contract promises no more than this.
type tearing struct{ cryptodisktest.Storage }

const tearPiece = 40

func (s tearing) ReadAt(ctx context.Context, p []byte, off int64) error {
	for len(p) > 0 {
		n := min(len(p), tearPiece)
		if err := s.Storage.ReadAt(ctx, p[:n], off); err != nil {
			return err
		}
		runtime.Gosched()
		p, off = p[n:], off+int64(n)
	}
	return nil
}

func (s tearing) WriteAt(ctx context.Context, p []byte, off int64) error {
	for len(p) > 0 {
		n := min(len(p), tearPiece)
		if err := s.Storage.WriteAt(ctx, p[:n], off); err != nil {
			return err
		}
		runtime.Gosched()
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// modelOp applies one random operation on [off, off+n) to d and model. The
// caller owns those bytes of model.
func modelOp(ctx context.Context, r *rand.Rand, d *cryptodisk.Disk, model []byte, off, n int64) error {
	switch op := r.IntN(10); {
	case op < 4:
		data := cryptodisktest.RandomBytes(r, int(n))
		copy(model[off:], data) // before WriteAt encrypts data in place
		if err := d.WriteAt(ctx, data, off); err != nil {
			return fmt.Errorf("WriteAt(%d+%d): %w", off, n, err)
		}
	case op < 7:
		got := make([]byte, n)
		if err := d.ReadAt(ctx, got, off); err != nil {
			return fmt.Errorf("ReadAt(%d+%d): %w", off, n, err)
		}
		if i := cryptodisktest.FirstDiff(got, model[off:off+n]); i >= 0 {
			return fmt.Errorf("ReadAt(%d+%d): byte %d is %#x, want %#x", off, n, off+int64(i), got[i], model[off+int64(i)])
		}
	case op < 8:
		if err := d.Trim(ctx, off, n); err != nil {
			return fmt.Errorf("Trim(%d+%d): %w", off, n, err)
		}
		clear(model[off : off+n])
	default:
		noHole := op == 9
		if err := d.Zero(ctx, off, n, noHole, false); err != nil {
			return fmt.Errorf("Zero(%d+%d, noHole %v): %w", off, n, noHole, err)
		}
		clear(model[off : off+n])
	}
	return nil
}

// halting writes the first half of one armed WriteAt, then waits for
// release before writing the rest: a store caught in the middle of a write.
type halting struct {
	cryptodisktest.Storage
	armed   atomic.Bool
	halfway chan struct{}
	release chan struct{}
}

func (s *halting) WriteAt(ctx context.Context, p []byte, off int64) error {
	if !s.armed.CompareAndSwap(true, false) {
		return s.Storage.WriteAt(ctx, p, off)
	}
	half := len(p) / 2
	if err := s.Storage.WriteAt(ctx, p[:half], off); err != nil {
		return err
	}
	close(s.halfway)
	<-s.release
	return s.Storage.WriteAt(ctx, p[half:], off+int64(half))
}

// TestReadDuringFirstWrite reads one part of an unwritten sector while
// another part of it is being written and the store holds half the new
// ciphertext: the reader's bytes must still read as zeros, not as the
// decryption of half-zero ciphertext.
func TestReadDuringFirstWrite(t *testing.T) {
	for _, ss := range sectorSizes {
		t.Run(fmt.Sprint(ss), func(t *testing.T) {
			ctx := context.Background()
			s := &halting{Storage: memstore.New(0), halfway: make(chan struct{}), release: make(chan struct{})}
			d := create(t, s, cryptodisktest.NewKeys(testSeed), ss, diskSize, cryptodisk.Options{})
			s.armed.Store(true)
			wrote := goErr(func() error { return d.WriteAt(ctx, []byte("first"), 8) })
			<-s.halfway
			got := bytes.Repeat([]byte{0xEE}, 16)
			read := goErr(func() error { return d.ReadAt(ctx, got, int64(ss)-16) })
			select {
			case err := <-read:
				close(s.release)
				t.Fatalf("ReadAt of the sector finished during its read-modify-write (err %v, data %x)", err, got)
			case <-time.After(20 * time.Millisecond):
			}
			close(s.release)
			if err := await(t, "write", wrote); err != nil {
				t.Fatal(err)
			}
			if err := await(t, "read", read); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, make([]byte, 16)) {
				t.Errorf("ReadAt of untouched bytes = %x, want zeros", got)
			}
		})
	}
}
