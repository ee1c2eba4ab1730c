package cryptodisk_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/cryptnbd/cryptnbd/cryptodisk/cryptodisktest"
	"math/rand/v2"
	"syscall"
	"testing"
	"time"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
)

const diskSize = 1 << 20

func TestNewDiskReadsZeros(t *testing.T) {
	forEach(t, func(t *testing.T, b backend, ss int) {
		e := newEnv(t, b, ss, diskSize, cryptodisk.Options{})
		if got := e.d.Size(); got != diskSize {
			t.Errorf("Size() = %d, want %d", got, diskSize)
		}
		if got := e.d.SectorSize(); got != ss {
			t.Errorf("SectorSize() = %d, want %d", got, ss)
		}
		checkDisk(t, e.d, make([]byte, diskSize))
		if got := holeState(t, e.d, 0, diskSize); got != 1 {
			t.Errorf("fresh disk: Extents %v, want one hole", extents(t, e.d, 0, diskSize))
		}
	})
}

func TestWriteReadRoundTrip(t *testing.T) {
	forEach(t, func(t *testing.T, b backend, ss int) {
		e := newEnv(t, b, ss, diskSize, cryptodisk.Options{})
		r := rand.New(rand.NewPCG(uint64(ss), 1))
		model := make([]byte, diskSize)
		for _, tc := range []struct{ off, n int64 }{
			{0, 1},
			{0, 4096},
			{1, 511},
			{100, 8000},            // head, body, tail
			{4095, 2},              // two partial sectors
			{8192, 3 * 4096},       // aligned body only
			{20000, 100},           // inside one sector
			{65536 - 3, 65536 + 7}, // long unaligned
			{diskSize - 513, 513},  // up to the end
			{300000, 0},
		} {
			data := cryptodisktest.RandomBytes(r, int(tc.n))
			write(t, e.d, data, tc.off)
			copy(model[tc.off:], data)
			got := make([]byte, tc.n)
			if err := e.d.ReadAt(context.Background(), got, tc.off); err != nil {
				t.Fatalf("ReadAt(%d+%d): %v", tc.off, tc.n, err)
			}
			if i := cryptodisktest.FirstDiff(got, data); i >= 0 {
				t.Errorf("ReadAt(%d+%d) after WriteAt: differs at +%d", tc.off, tc.n, i)
			}
		}
		checkDisk(t, e.d, model)
		// Unaligned reads of what was written, at every phase.
		for off := int64(90); off < 130; off += 13 {
			got := make([]byte, 5000)
			if err := e.d.ReadAt(context.Background(), got, off); err != nil {
				t.Fatal(err)
			}
			if i := cryptodisktest.FirstDiff(got, model[off:off+5000]); i >= 0 {
				t.Errorf("ReadAt(%d+5000) differs at +%d", off, i)
			}
		}
	})
}

// TestWriteZeroLengthUnaligned: an empty write changes nothing, even at an
// offset inside a sector, where a read-modify-write would be tempting.
func TestWriteZeroLengthUnaligned(t *testing.T) {
	forEach(t, func(t *testing.T, b backend, ss int) {
		e := newEnv(t, b, ss, diskSize, cryptodisk.Options{})
		model := bytes.Repeat([]byte{0x5A}, diskSize)
		write(t, e.d, model, 0)
		for _, p := range [][]byte{nil, {}} {
			if err := e.d.WriteAt(context.Background(), p, 100); err != nil {
				t.Errorf("WriteAt(%v, 100): %v", p, err)
			}
		}
		checkDisk(t, e.d, model)
	})
}

type zeroMode struct {
	name   string
	zero   func(d *cryptodisk.Disk, off, n int64) error
	noHole bool
}

var zeroModes = []zeroMode{
	{"Trim", func(d *cryptodisk.Disk, off, n int64) error { return d.Trim(context.Background(), off, n) }, false},
	{"Zero", func(d *cryptodisk.Disk, off, n int64) error {
		return d.Zero(context.Background(), off, n, false, false)
	}, false},
	{"ZeroFast", func(d *cryptodisk.Disk, off, n int64) error { return d.Zero(context.Background(), off, n, false, true) }, false},
	{"ZeroNoHole", func(d *cryptodisk.Disk, off, n int64) error { return d.Zero(context.Background(), off, n, true, false) }, true},
}

func TestZeroAndTrim(t *testing.T) {
	ranges := []struct {
		name   string
		off, n int64
	}{
		{"AlignedOne4K", 8192, 4096},
		{"Aligned512", 8192 + 512, 512},
		{"InsideSector", 10000, 100},
		{"TwoPartial", 4096 - 10, 20},
		{"HeadBodyTail", 100, 3*4096 + 200},
		{"ManySectors", 65536 + 1, 300000},
		{"Whole", 0, diskSize},
		{"End", diskSize - 700, 700},
		{"Empty", 5000, 0},
	}
	forEach(t, func(t *testing.T, b backend, ss int) {
		e := newEnv(t, b, ss, diskSize, cryptodisk.Options{})
		r := rand.New(rand.NewPCG(uint64(ss), 2))
		model := cryptodisktest.RandomBytes(r, diskSize)
		write(t, e.d, model, 0)
		for _, m := range zeroModes {
			for _, rg := range ranges {
				t.Run(m.name+"/"+rg.name, func(t *testing.T) {
					// Fresh data around the range, so each case zeroes
					// written sectors, then check the surroundings too.
					lo, hi := max(0, rg.off-8192), min(diskSize, rg.off+rg.n+8192)
					copy(model[lo:hi], cryptodisktest.RandomBytes(r, int(hi-lo)))
					write(t, e.d, model[lo:hi], lo)
					if err := m.zero(e.d, rg.off, rg.n); err != nil {
						t.Fatalf("zero(%d, %d): %v", rg.off, rg.n, err)
					}
					clear(model[rg.off : rg.off+rg.n])
					got := make([]byte, hi-lo)
					if err := e.d.ReadAt(context.Background(), got, lo); err != nil {
						t.Fatal(err)
					}
					if i := cryptodisktest.FirstDiff(got, model[lo:hi]); i >= 0 {
						t.Fatalf("after zero(%d, %d): byte %d is %#x, want %#x", rg.off, rg.n, lo+int64(i), got[i], model[lo+int64(i)])
					}
					// Whole 64 KiB units inside the range are holes unless
					// noHole; every allocation unit is for noHole.
					ulo := (rg.off + 65535) / 65536 * 65536
					uhi := (rg.off + rg.n) / 65536 * 65536
					if uhi > ulo {
						want := 1
						if m.noHole {
							want = 0
						}
						if got := holeState(t, e.d, ulo, uhi-ulo); got != want {
							t.Errorf("Extents of zeroed [%d,%d) = %v, want hole=%v", ulo, uhi, extents(t, e.d, ulo, uhi-ulo), want == 1)
						}
					}
				})
			}
		}
		checkDisk(t, e.d, model)
	})
}

func TestZeroFastNoHole(t *testing.T) {
	e := newEnv(t, backends[0], 4096, diskSize, cryptodisk.Options{})
	model := cryptodisktest.RandomBytes(rand.New(rand.NewPCG(3, 3)), diskSize)
	write(t, e.d, model, 0)
	for _, rg := range []struct{ off, n int64 }{{0, diskSize}, {100, 10}, {4096, 4096}} {
		err := e.d.Zero(context.Background(), rg.off, rg.n, true, true)
		if !errors.Is(err, syscall.ENOTSUP) {
			t.Errorf("Zero(%d, %d, noHole, fast): got %v, want ENOTSUP", rg.off, rg.n, err)
		}
	}
	checkDisk(t, e.d, model)
}

func TestExtents(t *testing.T) {
	forEach(t, func(t *testing.T, b backend, ss int) {
		e := newEnv(t, b, ss, diskSize, cryptodisk.Options{})
		const u = 65536
		write(t, e.d, []byte{1}, 3*u+5)
		write(t, e.d, make([]byte, 2*u), 6*u) // zeros written are still data
		for _, tc := range []struct {
			name   string
			off, n int64
			want   int
		}{
			{"Before", 0, 3 * u, 1},
			{"Written", 3 * u, 4096, 0},
			{"Between", 4 * u, 2 * u, 1},
			{"WrittenZeros", 6 * u, 2 * u, 0},
			{"Mixed", 2 * u, 2 * u, -1},
			{"WrittenThenHole", 3 * u, u, -1},
			{"After", 8 * u, diskSize - 8*u, 1},
		} {
			if got := holeState(t, e.d, tc.off, tc.n); got != tc.want {
				t.Errorf("%s: Extents(%d, %d) = %v, want state %d", tc.name, tc.off, tc.n, extents(t, e.d, tc.off, tc.n), tc.want)
			}
		}
		if err := e.d.Trim(context.Background(), 6*u, 2*u); err != nil {
			t.Fatal(err)
		}
		if got := holeState(t, e.d, 4*u, diskSize-4*u); got != 1 {
			t.Errorf("after Trim: Extents = %v, want one hole", extents(t, e.d, 4*u, diskSize-4*u))
		}
		// fn returning false stops the walk.
		calls := 0
		if err := e.d.Extents(context.Background(), 0, diskSize, func(int64, bool) bool { calls++; return false }); err != nil {
			t.Fatal(err)
		}
		if calls != 1 {
			t.Errorf("Extents called fn %d times after it returned false", calls)
		}
	})
}

func TestOutOfRange(t *testing.T) {
	e := newEnv(t, backends[0], 4096, diskSize, cryptodisk.Options{})
	ctx := context.Background()
	buf := make([]byte, 4096)
	type call struct {
		name string
		do   func() error
		want error
	}
	var calls []call
	for _, rg := range []struct{ off, n int64 }{
		{diskSize, 1}, {diskSize - 4096, 4097}, {-4096, 4096}, {1 << 62, 4096}, {1<<63 - 100, 4096},
	} {
		p := buf[:min(rg.n, 4096)]
		if rg.n > 4096 {
			p = make([]byte, rg.n)
		}
		tag := fmt.Sprintf("[%d,+%d)", rg.off, rg.n)
		calls = append(calls,
			call{"ReadAt" + tag, func() error { return e.d.ReadAt(ctx, p, rg.off) }, syscall.EINVAL},
			call{"WriteAt" + tag, func() error { return e.d.WriteAt(ctx, p, rg.off) }, syscall.ENOSPC},
			call{"Trim" + tag, func() error { return e.d.Trim(ctx, rg.off, rg.n) }, syscall.ENOSPC},
			call{"Zero" + tag, func() error { return e.d.Zero(ctx, rg.off, rg.n, false, false) }, syscall.ENOSPC},
			call{"Cache" + tag, func() error { return e.d.Cache(ctx, rg.off, rg.n) }, syscall.EINVAL},
			call{"Extents" + tag, func() error {
				return e.d.Extents(ctx, rg.off, rg.n, func(int64, bool) bool { return true })
			}, syscall.EINVAL},
		)
	}
	for _, c := range calls {
		if err := c.do(); !errors.Is(err, c.want) {
			t.Errorf("%s: got %v, want an error wrapping %v", c.name, err, c.want)
		}
	}
	checkDisk(t, e.d, make([]byte, diskSize))
}

// TestStoreErrors checks that a failing store's errno reaches the caller.
func TestStoreErrors(t *testing.T) {
	// See gate_test.go for the hooked store; here only errno propagation.
	e, h := newHookedEnv(t, 4096)
	ctx := context.Background()
	write(t, e.d, bytes.Repeat([]byte{1}, 8192), 0)
	h.Fail(opRead, syscall.EIO)
	if err := e.d.ReadAt(ctx, make([]byte, 100), 10); !errors.Is(err, syscall.EIO) {
		t.Errorf("ReadAt on a failing store: got %v, want EIO", err)
	}
	// A partial write needs a read first, so it fails too.
	if err := e.d.WriteAt(ctx, make([]byte, 100), 10); !errors.Is(err, syscall.EIO) {
		t.Errorf("partial WriteAt on a failing store: got %v, want EIO", err)
	}
	h.Fail(opRead, nil)
	h.Fail(opWrite, syscall.ENOSPC)
	if err := e.d.WriteAt(ctx, make([]byte, 4096), 0); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("WriteAt on a full store: got %v, want ENOSPC", err)
	}
	h.Fail(opWrite, nil)
	h.Fail(opSync, syscall.EIO)
	if err := e.d.Flush(ctx); !errors.Is(err, syscall.EIO) {
		t.Errorf("Flush on a failing store: got %v, want EIO", err)
	}
	h.Fail(opSync, nil)
	h.Fail(opPunch, syscall.EIO)
	if err := e.d.Trim(ctx, 0, 8192); !errors.Is(err, syscall.EIO) {
		t.Errorf("Trim on a failing store: got %v, want EIO", err)
	}
	h.Fail(opPunch, nil)
	checkDisk(t, e.d, append(bytes.Repeat([]byte{1}, 8192), make([]byte, diskSize-8192)...))
}

// TestZeroNoHoleVersusPartialWrite zeroes a whole sector with encrypted
// zeros while a partial write to it is between its read and its write. The
// outcome must be one of the two serial orders: all zeros, or zeros plus
// the written bytes; never the sector's old bytes brought back by the
// read-modify-write.
func TestZeroNoHoleVersusPartialWrite(t *testing.T) {
	for _, noHole := range []bool{true, false} {
		t.Run(fmt.Sprintf("noHole=%v", noHole), func(t *testing.T) {
			e, h := newHookedEnv(t, 4096)
			ctx := context.Background()
			old := bytes.Repeat([]byte{0x77}, 4096)
			write(t, e.d, old, 4096)
			gate := h.Stop(opWrite)
			wrote := goErr(func() error { return e.d.WriteAt(ctx, []byte("partial"), 4096+100) })
			<-gate.Entered // it has read the old sector and is about to write
			zeroed := goErr(func() error { return e.d.Zero(ctx, 4096, 4096, noHole, false) })
			select {
			case err := <-zeroed:
				gate.Release()
				await(t, "write", wrote)
				t.Fatalf("Zero of the sector finished during a read-modify-write of it (err %v)", err)
			case <-time.After(20 * time.Millisecond):
			}
			gate.Release()
			for name, ch := range map[string]<-chan error{"write": wrote, "zero": zeroed} {
				if err := await(t, name, ch); err != nil {
					t.Fatalf("%s: %v", name, err)
				}
			}
			got := make([]byte, 4096)
			if err := e.d.ReadAt(ctx, got, 4096); err != nil {
				t.Fatal(err)
			}
			zerosThenWrite := make([]byte, 4096)
			copy(zerosThenWrite[100:], "partial")
			if !bytes.Equal(got, make([]byte, 4096)) && !bytes.Equal(got, zerosThenWrite) {
				t.Errorf("sector after racing Zero and WriteAt is neither serial outcome; first bytes %x", got[:16])
			}
		})
	}
}
