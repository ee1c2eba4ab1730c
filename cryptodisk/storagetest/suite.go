// Package storagetest is the conformance suite every cryptodisk.Storage
// implementation runs in its own tests, as restic's backend/test suite is
// run by each backend:
//
//	func TestSuite(t *testing.T) {
//		storagetest.Suite{New: func(t *testing.T, size int64) cryptodisk.Storage {
//			return memstore.New(size)
//		}}.Run(t)
//	}
package storagetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/cryptnbd/cryptnbd/cryptodisk/cryptodisktest"
	"math/rand/v2"
	"sync"
	"syscall"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
)

// Suite describes the store under test.
type Suite struct {
	// New returns a new, empty store of size bytes (a multiple of 64 KiB).
	// The suite closes it; New may register other cleanup with t.Cleanup.
	New func(t *testing.T, size int64) cryptodisk.Storage
	// Reopen, if set, opens the data of a store the suite has synced and
	// closed, as a restart would; the suite closes the result.
	Reopen func(t *testing.T, closed cryptodisk.Storage) cryptodisk.Storage
	// AllocationUnknown declares that the store cannot tell holes from data
	// and reports everything allocated. Without it the suite requires holes
	// where nothing was written and after Punch, at a granularity of 64 KiB
	// or finer.
	AllocationUnknown bool
}

// Run runs s's New through every test of the suite.
func Run(t *testing.T, newStore func(t *testing.T, size int64) cryptodisk.Storage) {
	Suite{New: newStore}.Run(t)
}

// unit is the granularity at which the suite checks allocation: any store
// that tracks holes must do so at least this finely.
const unit = 64 << 10

const storeSize = 16 * unit // 1 MiB

// Run runs the suite.
func (s Suite) Run(t *testing.T) {
	t.Run("RoundTrip", s.testRoundTrip)
	t.Run("UnwrittenReadsZeros", s.testUnwritten)
	t.Run("Punch", s.testPunch)
	t.Run("Allocated", s.testAllocated)
	t.Run("AllocatedStops", s.testAllocatedStops)
	t.Run("OutOfRange", s.testOutOfRange)
	t.Run("Grow", s.testGrow)
	t.Run("Sync", s.testSync)
	t.Run("ConcurrentDisjointWriters", s.testConcurrent)
	if s.Reopen != nil {
		t.Run("Reopen", s.testReopen)
	}
}

func (s Suite) open(t *testing.T, size int64) cryptodisk.Storage {
	t.Helper()
	st := s.New(t, size)
	if got := st.Size(); got != size {
		st.Close()
		t.Fatalf("new store: Size() = %d, want %d", got, size)
	}
	return st
}

func closeStore(t *testing.T, st cryptodisk.Storage) {
	t.Helper()
	if err := st.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}

// model is the expected content of a store.
type model []byte

// check reads the whole store and compares it with m, naming the first
// differing byte.
func (m model) check(t *testing.T, st cryptodisk.Storage) {
	t.Helper()
	got := make([]byte, len(m))
	if err := st.ReadAt(context.Background(), got, 0); err != nil {
		t.Fatalf("ReadAt whole store: %v", err)
	}
	if i := cryptodisktest.FirstDiff(got, m); i >= 0 {
		t.Fatalf("store differs from model at byte %d (page %d): got %#x, want %#x", i, i/4096, got[i], m[i])
	}
}

func (s Suite) testRoundTrip(t *testing.T) {
	ctx := context.Background()
	st := s.open(t, storeSize)
	defer closeStore(t, st)
	r := rand.New(rand.NewPCG(1, 2))
	m := make(model, storeSize)
	for _, tc := range []struct {
		off  int64
		size int
	}{
		{0, 1},
		{0, 512},
		{4096, 4096},
		{511, 2},
		{4095, 4098},      // crosses two page boundaries
		{8192 + 100, 700}, // inside one page
		{3 * unit, unit},
		{5*unit - 17, 3*unit + 33},
		{storeSize - 1, 1},
		{storeSize - 5000, 5000},
		{12345, 0},
	} {
		t.Run(fmt.Sprintf("%d+%d", tc.off, tc.size), func(t *testing.T) {
			data := cryptodisktest.RandomBytes(r, tc.size)
			if err := st.WriteAt(ctx, bytes.Clone(data), tc.off); err != nil {
				t.Fatalf("WriteAt: %v", err)
			}
			copy(m[tc.off:], data)
			got := make([]byte, tc.size)
			if err := st.ReadAt(ctx, got, tc.off); err != nil {
				t.Fatalf("ReadAt: %v", err)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("ReadAt after WriteAt: got %d bytes differing at %d", len(got), cryptodisktest.FirstDiff(got, data))
			}
		})
	}
	m.check(t, st)
}

func (s Suite) testUnwritten(t *testing.T) {
	ctx := context.Background()
	st := s.open(t, storeSize)
	defer closeStore(t, st)
	make(model, storeSize).check(t, st)
	// A write must not leak into its neighbours.
	if err := st.WriteAt(ctx, bytes.Repeat([]byte{0xAA}, 100), 5000); err != nil {
		t.Fatalf("WriteAt: %v", err)
	}
	for _, tc := range []struct{ off, n int64 }{{4096, 904}, {5100, 3092}, {0, 4096}} {
		got := bytes.Repeat([]byte{0xFF}, int(tc.n))
		if err := st.ReadAt(ctx, got, tc.off); err != nil {
			t.Fatalf("ReadAt(%d+%d): %v", tc.off, tc.n, err)
		}
		if i := bytes.IndexFunc(got, func(r rune) bool { return r != 0 }); i >= 0 {
			t.Errorf("ReadAt(%d+%d): byte %d is %#x, want zero", tc.off, tc.n, tc.off+int64(i), got[i])
		}
	}
}

func (s Suite) testPunch(t *testing.T) {
	ctx := context.Background()
	r := rand.New(rand.NewPCG(3, 4))
	for _, tc := range []struct {
		name     string
		off, len int64
	}{
		{"Page", 4096, 4096},
		{"Unit", unit, unit},
		{"Sector", 1024, 512},
		{"SectorsInPage", 4096 + 512, 2048},
		{"SectorsAcrossPages", 4096 - 1536, 4096 + 2048},
		{"ManyUnitsUnaligned", unit - 512, 5*unit + 1024},
		{"Whole", 0, storeSize},
		{"Last", storeSize - 512, 512},
		{"Empty", 8192, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := s.open(t, storeSize)
			defer closeStore(t, st)
			m := model(cryptodisktest.RandomBytes(r, storeSize))
			if err := st.WriteAt(ctx, bytes.Clone(m), 0); err != nil {
				t.Fatalf("WriteAt: %v", err)
			}
			if err := st.Punch(ctx, tc.off, tc.len); err != nil {
				t.Fatalf("Punch(%d, %d): %v", tc.off, tc.len, err)
			}
			clear(m[tc.off : tc.off+tc.len])
			m.check(t, st)
			// Punching a hole again and writing into a hole both work.
			if err := st.Punch(ctx, tc.off, tc.len); err != nil {
				t.Fatalf("second Punch: %v", err)
			}
			if tc.len > 0 {
				data := cryptodisktest.RandomBytes(r, 300)
				at := tc.off + tc.len/2
				at = min(at, storeSize-300)
				if err := st.WriteAt(ctx, bytes.Clone(data), at); err != nil {
					t.Fatalf("WriteAt into hole: %v", err)
				}
				copy(m[at:], data)
			}
			m.check(t, st)
		})
	}
}

// runs collects what Allocated reports for [off, off+length).
type run struct {
	n     int64
	alloc bool
}

func allocated(t *testing.T, st cryptodisk.Storage, off, length int64) []run {
	t.Helper()
	var runs []run
	err := st.Allocated(context.Background(), off, length, func(n int64, alloc bool) bool {
		if n <= 0 {
			t.Errorf("Allocated(%d, %d) reported a run of %d bytes", off, length, n)
		}
		runs = append(runs, run{n, alloc})
		return true
	})
	if err != nil {
		t.Fatalf("Allocated(%d, %d): %v", off, length, err)
	}
	var total int64
	for _, r := range runs {
		total += r.n
	}
	if want := min(length, st.Size()-off); total != want {
		t.Fatalf("Allocated(%d, %d) covered %d bytes in %v, want %d", off, length, total, runs, want)
	}
	return runs
}

// state reports whether [off, off+length) is wholly allocated (1), wholly a
// hole (0), or mixed (-1).
func state(t *testing.T, st cryptodisk.Storage, off, length int64) int {
	t.Helper()
	runs := allocated(t, st, off, length)
	all, none := true, true
	for _, r := range runs {
		all = all && r.alloc
		none = none && !r.alloc
	}
	switch {
	case all:
		return 1
	case none:
		return 0
	}
	return -1
}

func (s Suite) testAllocated(t *testing.T) {
	ctx := context.Background()
	st := s.open(t, storeSize)
	defer closeStore(t, st)
	hole := 0
	if s.AllocationUnknown {
		hole = 1
	}
	if got := state(t, st, 0, storeSize); got != hole {
		t.Errorf("fresh store: allocation state %d, want %d (1 allocated, 0 hole)", got, hole)
	}
	// Data in units 2 and 5..6; the rest is never written.
	data := bytes.Repeat([]byte{7}, unit)
	for _, u := range []int64{2, 5, 6} {
		if err := st.WriteAt(ctx, data, u*unit); err != nil {
			t.Fatalf("WriteAt unit %d: %v", u, err)
		}
	}
	for _, tc := range []struct {
		name    string
		off, n  int64
		want    int
		anyHole bool // whether want depends on hole tracking
	}{
		{"Written", 2 * unit, unit, 1, false},
		{"WrittenRun", 5 * unit, 2 * unit, 1, false},
		{"Before", 0, 2 * unit, 0, true},
		{"Between", 3 * unit, 2 * unit, 0, true},
		{"After", 7 * unit, storeSize - 7*unit, 0, true},
		{"Mixed", unit, 3 * unit, -1, true},
		{"PastEnd", 15 * unit, 4 * unit, 0, true}, // clipped to Size
	} {
		want := tc.want
		if tc.anyHole && s.AllocationUnknown {
			want = 1
		}
		if got := state(t, st, tc.off, tc.n); got != want {
			t.Errorf("%s: Allocated(%d, %d) state %d, want %d; runs %v", tc.name, tc.off, tc.n, got, want, allocated(t, st, tc.off, tc.n))
		}
	}
	// Unaligned queries: a run starting inside written data.
	if got := state(t, st, 2*unit+100, 1000); got != 1 {
		t.Errorf("unaligned query inside data: state %d, want 1", got)
	}
	if err := st.Punch(ctx, 5*unit, unit); err != nil {
		t.Fatalf("Punch: %v", err)
	}
	if got, want := state(t, st, 5*unit, unit), hole; got != want {
		t.Errorf("after Punch: state %d, want %d", got, want)
	}
	if got := state(t, st, 6*unit, unit); got != 1 {
		t.Errorf("neighbour of punched unit: state %d, want 1", got)
	}
}

func (s Suite) testAllocatedStops(t *testing.T) {
	ctx := context.Background()
	st := s.open(t, storeSize)
	defer closeStore(t, st)
	for u := int64(0); u < 16; u += 2 {
		if err := st.WriteAt(ctx, []byte{1}, u*unit); err != nil {
			t.Fatalf("WriteAt: %v", err)
		}
	}
	calls := 0
	err := st.Allocated(ctx, 0, storeSize, func(int64, bool) bool {
		calls++
		return false
	})
	if err != nil {
		t.Fatalf("Allocated: %v", err)
	}
	if calls != 1 {
		t.Errorf("fn returned false but was called %d times", calls)
	}
}

func (s Suite) testOutOfRange(t *testing.T) {
	ctx := context.Background()
	st := s.open(t, storeSize)
	defer closeStore(t, st)
	buf := make([]byte, 1024)
	for _, tc := range []struct {
		name  string
		off   int64
		write bool
		want  error
	}{
		{"ReadPastEnd", storeSize, false, syscall.EINVAL},
		{"ReadStraddling", storeSize - 512, false, syscall.EINVAL},
		{"ReadNegative", -1024, false, syscall.EINVAL},
		{"ReadFar", 1 << 62, false, syscall.EINVAL},
		{"ReadOverflowing", 1<<63 - 100, false, syscall.EINVAL},
		{"WritePastEnd", storeSize, true, syscall.ENOSPC},
		{"WriteStraddling", storeSize - 512, true, syscall.ENOSPC},
		{"WriteFar", 1 << 62, true, syscall.ENOSPC},
		{"WriteOverflowing", 1<<63 - 100, true, syscall.ENOSPC},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var err error
			if tc.write {
				err = st.WriteAt(ctx, buf, tc.off)
			} else {
				err = st.ReadAt(ctx, buf, tc.off)
			}
			if !errors.Is(err, tc.want) {
				t.Errorf("got %v, want an error wrapping %v", err, tc.want)
			}
		})
	}
	if got := st.Size(); got != storeSize {
		t.Errorf("Size after failed writes = %d, want %d", got, storeSize)
	}
}

func (s Suite) testGrow(t *testing.T) {
	ctx := context.Background()
	st := s.open(t, storeSize)
	defer closeStore(t, st)
	r := rand.New(rand.NewPCG(5, 6))
	m := model(cryptodisktest.RandomBytes(r, storeSize))
	if err := st.WriteAt(ctx, bytes.Clone(m), 0); err != nil {
		t.Fatalf("WriteAt: %v", err)
	}
	const grown = 3 * storeSize
	if err := st.Grow(ctx, grown); err != nil {
		t.Fatalf("Grow: %v", err)
	}
	if got := st.Size(); got != grown {
		t.Fatalf("Size after Grow = %d, want %d", got, grown)
	}
	m = append(m, make([]byte, grown-storeSize)...)
	m.check(t, st)
	data := cryptodisktest.RandomBytes(r, 5000)
	if err := st.WriteAt(ctx, bytes.Clone(data), grown-5000); err != nil {
		t.Fatalf("WriteAt in grown range: %v", err)
	}
	copy(m[grown-5000:], data)
	m.check(t, st)
	if err := st.Grow(ctx, grown); err != nil {
		t.Errorf("Grow to the same size: %v", err)
	}
	if err := st.Grow(ctx, storeSize); err == nil {
		t.Errorf("Grow to a smaller size succeeded")
	}
	if got := st.Size(); got != grown {
		t.Errorf("Size after failed shrink = %d, want %d", got, grown)
	}
}

func (s Suite) testSync(t *testing.T) {
	ctx := context.Background()
	st := s.open(t, storeSize)
	defer closeStore(t, st)
	if err := st.Sync(ctx); err != nil {
		t.Fatalf("Sync of a fresh store: %v", err)
	}
	m := make(model, storeSize)
	copy(m[70000:], "durable")
	if err := st.WriteAt(ctx, []byte("durable"), 70000); err != nil {
		t.Fatalf("WriteAt: %v", err)
	}
	if err := st.Punch(ctx, 0, 4096); err != nil {
		t.Fatalf("Punch: %v", err)
	}
	// Concurrent syncs are allowed and all succeed.
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() { errs <- st.Sync(ctx) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("concurrent Sync: %v", err)
		}
	}
	m.check(t, st)
}

// testConcurrent has goroutines write, read and punch byte ranges that are
// disjoint but share pages: goroutine g owns the 512-byte chunks whose index
// is g modulo the number of goroutines. Run under -race.
func (s Suite) testConcurrent(t *testing.T) {
	ctx := context.Background()
	st := s.open(t, storeSize)
	defer closeStore(t, st)
	const (
		workers = 4
		chunk   = 512
		ops     = 300
	)
	m := make(model, storeSize)
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for g := range workers {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 7))
			mine := func() int64 { // a random chunk of this goroutine
				return (int64(r.IntN(storeSize/chunk/workers))*workers + int64(g)) * chunk
			}
			for range ops {
				off := mine()
				switch r.IntN(4) {
				case 0, 1:
					// A sub-range of one chunk, so neighbours stay untouched.
					lo := int64(r.IntN(chunk))
					n := 1 + r.IntN(chunk-int(lo))
					data := cryptodisktest.RandomBytes(r, n)
					if err := st.WriteAt(ctx, bytes.Clone(data), off+lo); err != nil {
						errs <- fmt.Errorf("goroutine %d: WriteAt: %w", g, err)
						return
					}
					copy(m[off+lo:], data) // only g touches these bytes
				case 2:
					if err := st.Punch(ctx, off, chunk); err != nil {
						errs <- fmt.Errorf("goroutine %d: Punch: %w", g, err)
						return
					}
					clear(m[off : off+chunk])
				case 3:
					got := make([]byte, chunk)
					if err := st.ReadAt(ctx, got, off); err != nil {
						errs <- fmt.Errorf("goroutine %d: ReadAt: %w", g, err)
						return
					}
					if i := cryptodisktest.FirstDiff(got, m[off:off+chunk]); i >= 0 {
						errs <- fmt.Errorf("goroutine %d: chunk at %d differs at +%d", g, off, i)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	m.check(t, st)
}

func (s Suite) testReopen(t *testing.T) {
	ctx := context.Background()
	st := s.open(t, storeSize)
	r := rand.New(rand.NewPCG(8, 9))
	m := make(model, storeSize)
	data := cryptodisktest.RandomBytes(r, 3*unit)
	if err := st.WriteAt(ctx, bytes.Clone(data), unit+123); err != nil {
		t.Fatalf("WriteAt: %v", err)
	}
	copy(m[unit+123:], data)
	if err := st.Punch(ctx, 2*unit, unit); err != nil {
		t.Fatalf("Punch: %v", err)
	}
	clear(m[2*unit : 3*unit])
	if err := st.Grow(ctx, 2*storeSize); err != nil {
		t.Fatalf("Grow: %v", err)
	}
	m = append(m, make([]byte, storeSize)...)
	if err := st.Sync(ctx); err != nil {
		t.Fatalf("Sync: %v", err)
	}
	if err := st.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	st2 := s.Reopen(t, st)
	defer closeStore(t, st2)
	if got := st2.Size(); got != 2*storeSize {
		t.Fatalf("Size after reopen = %d, want %d", got, 2*storeSize)
	}
	m.check(t, st2)
	if !s.AllocationUnknown {
		if got := state(t, st2, 2*unit, unit); got != 0 {
			t.Errorf("punched unit after reopen: state %d, want 0 (hole)", got)
		}
	}
}
