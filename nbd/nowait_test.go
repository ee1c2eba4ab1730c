package nbd_test

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/cryptnbd/cryptnbd/nbd"
	"github.com/cryptnbd/cryptnbd/nbd/nbdtest"
)

var _ nbd.NoWaitBackend = (*nbdtest.Mem)(nil)

// TestNoWaitServedByReader: with a NoWaitBackend, READs and WRITEs of any
// size without FUA are served through the Try methods, and everything
// else, or all of it once the backend declines, through the workers; the
// data and the replies are the same either way, in both reply styles.
func TestNoWaitServedByReader(t *testing.T) {
	for _, structured := range []bool{false, true} {
		for _, noWait := range []bool{true, false} {
			t.Run(fmt.Sprintf("structured=%v/nowait=%v", structured, noWait), func(t *testing.T) {
				e := newEnv(t, nbd.Options{})
				e.disk.SetNoWait(noWait)
				c := e.open(t, "disk", structured)
				steps := []struct {
					flags  uint16
					off    uint64
					length uint32
					inline bool
				}{
					{0, 4096, 4096, true},
					{0, 100, 333, true},
					{0, 0, 64 << 10, true},
					{0, 64 << 10, 512<<10 + 512, true},
					{flagFUA, 700 << 10, 4096, false}, // FUA flushes, which may wait
				}
				want := make([]byte, diskSize)
				served := 0
				for i, s := range steps {
					data := bytes.Repeat([]byte{byte(i + 1)}, int(s.length))
					if r := c.do(s.flags, cmdWrite, s.off, s.length, data); r.errno != 0 {
						t.Fatalf("write %d: errno %d", i, r.errno)
					}
					copy(want[s.off:], data)
					got, errno := c.readData(s.off, s.length)
					if errno != 0 || !bytes.Equal(got, data) {
						t.Fatalf("read back %d: errno %d, equal %v", i, errno, bytes.Equal(got, data))
					}
					if s.inline {
						served += 2 // the write and the read
					} else if s.flags&flagFUA != 0 {
						served++ // the read
					}
				}
				if !noWait {
					served = 0
				}
				if got := e.disk.ServedNoWait(); got != int64(served) {
					t.Errorf("ServedNoWait() = %d, want %d", got, served)
				}

				// Pipelined: 64 requests in flight at once, the replies in
				// any order: seven of 64 KiB with FUA for the workers at
				// the start of the disk, the rest small ones after them,
				// none overlapping another (their order would be
				// undefined).
				const n = 64
				var bigs, smalls uint64
				for i := range n {
					flags, size, off := uint16(0), uint32(4096>>(i%2*3)), 512<<10+smalls*4096
					if i%10 == 0 {
						flags, size, off = flagFUA, 64<<10, bigs*(64<<10)
						bigs++
					} else {
						smalls++
					}
					data := bytes.Repeat([]byte{byte(0x80 + i)}, int(size))
					copy(want[off:], data)
					c.request(flags, cmdWrite, uint64(i), off, size, data)
				}
				for range n {
					if r := c.readReply(0); r.errno != 0 {
						t.Fatalf("pipelined write %d: errno %d", r.handle, r.errno)
					}
				}
				got, errno := c.readData(0, diskSize)
				if errno != 0 || !bytes.Equal(got, want) {
					t.Fatalf("whole disk after pipelined writes: errno %d, equal %v", errno, bytes.Equal(got, want))
				}
				if noWait && e.disk.ServedNoWait() <= int64(served) {
					t.Errorf("no pipelined request was served by the reader")
				}
			})
		}
	}
}

// bigReadsWait is a Mem whose READs of more than 64 KiB wait until release
// is closed; its Try method declines them, so the server hands them to its
// workers.
type bigReadsWait struct {
	*nbdtest.Mem
	arrived chan struct{}
	release chan struct{}
}

func (b *bigReadsWait) ReadAt(ctx context.Context, p []byte, off int64) error {
	if len(p) > 64<<10 {
		b.arrived <- struct{}{}
		select {
		case <-b.release:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return b.Mem.ReadAt(ctx, p, off)
}

func (b *bigReadsWait) TryReadAt(ctx context.Context, p []byte, off int64) (bool, error) {
	if len(p) > 64<<10 {
		return false, nil
	}
	return b.Mem.TryReadAt(ctx, p, off)
}

// TestNoWaitRepliesNotHeld: a reply the reader wrote is sent before the
// reader waits for anything, here for a free request slot or for room in
// the byte budget while other requests are stuck in the backend. Held back,
// the client would wait for it as long as they stay stuck.
func TestNoWaitRepliesNotHeld(t *testing.T) {
	const big = 128 << 10
	for _, c := range []struct {
		name  string
		o     nbd.Options
		sizes []uint32 // the stuck big reads, then the small one served, then one that waits
	}{
		// The third request takes the slot the served one gave back; the
		// fourth finds none.
		{"slots", nbd.Options{MaxInflightRequests: 2}, []uint32{big, 4096, big, 4096}},
		// 8 KiB more does not fit beside the stuck read.
		{"bytes", nbd.Options{MaxInflightBytes: big + 4096}, []uint32{big, 4096, 8192}},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := &bigReadsWait{Mem: nbdtest.NewMem(diskSize), arrived: make(chan struct{}, 4), release: make(chan struct{})}
			e := &env{cat: nbdtest.NewCatalog()}
			e.cat.Add(nbd.ExportInfo{Name: "b"}, b)
			e.start(t, c.o)
			released := false
			release := func() {
				if !released {
					close(b.release)
					released = true
				}
			}
			t.Cleanup(release)
			cl := e.open(t, "b", false)
			for i, size := range c.sizes {
				cl.request(0, cmdRead, uint64(i), 0, size, nil)
			}
			<-b.arrived
			cl.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
			r := cl.readReply(4096)
			if r.handle != 1 || r.errno != 0 {
				t.Fatalf("first reply: handle %d errno %d, want the small read (1) served", r.handle, r.errno)
			}
			release()
			for range len(c.sizes) - 1 {
				r := cl.readReply(0)
				if r.errno != 0 {
					t.Fatalf("handle %d: errno %d", r.handle, r.errno)
				}
				cl.read(int(c.sizes[r.handle]))
			}
			if b.ServedNoWait() == 0 {
				t.Errorf("the small read was not served by the reader")
			}
		})
	}
}
