package nbd_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cryptnbd/cryptnbd/nbd"
	"github.com/cryptnbd/cryptnbd/nbd/nbdtest"
)

func TestReadWrite(t *testing.T) {
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			e := newEnv(t, nbd.Options{})
			c := e.open(t, "disk", structured)
			data := bytes.Repeat([]byte("0123456789abcdef"), 4096) // 64 KiB
			if r := c.do(0, cmdWrite, 1000, uint32(len(data)), data); r.errno != 0 {
				t.Fatalf("write errno %d", r.errno)
			}
			got, errno := c.readData(1000, uint32(len(data)))
			if errno != 0 || !bytes.Equal(got, data) {
				t.Fatalf("read back: errno %d, equal %v", errno, bytes.Equal(got, data))
			}
			// A read at the very end of the export.
			if _, errno := c.readData(diskSize-1, 1); errno != 0 {
				t.Errorf("read last byte: errno %d", errno)
			}
		})
	}
}

func TestRequestErrors(t *testing.T) {
	tests := []struct {
		name    string
		export  string
		flags   uint16
		cmd     uint16
		off     uint64
		length  uint32
		payload bool
		want    uint32
	}{
		{"read past end", "disk", 0, cmdRead, diskSize - 10, 20, false, einval},
		{"read offset overflow", "disk", 0, cmdRead, 1<<64 - 1, 2, false, einval},
		{"read too large", "disk", 0, cmdRead, 0, 32<<20 + 1, false, einval},
		{"write past end", "disk", 0, cmdWrite, diskSize - 10, 20, true, enospc},
		{"write offset past end", "disk", 0, cmdWrite, diskSize + 4096, 512, true, enospc},
		{"trim past end", "disk", 0, cmdTrim, diskSize, 1, false, einval},
		{"zero past end", "disk", 0, cmdWriteZeroes, 0, diskSize + 1, false, einval},
		{"cache past end", "disk", 0, cmdCache, diskSize - 1, 2, false, einval},
		{"block status past end", "disk", 0, cmdBlockStatus, diskSize - 1, 2, false, einval},
		{"flush with length", "disk", 0, cmdFlush, 0, 1, false, einval},
		{"unknown command", "disk", 0, 42, 0, 512, false, einval},
		{"unknown flag", "disk", 1 << 9, cmdRead, 0, 512, false, einval},
		{"no hole on write", "disk", flagNoHole, cmdWrite, 0, 512, true, einval},
		{"fast zero on trim", "disk", flagFastZero, cmdTrim, 0, 512, false, einval},
		{"req one on read", "disk", flagReqOne, cmdRead, 0, 512, false, einval},
		{"DF without structured", "disk", flagDF, cmdRead, 0, 512, false, einval},
		{"block status without structured", "disk", 0, cmdBlockStatus, 0, 512, false, einval},
		{"write read-only", "ro", 0, cmdWrite, 0, 512, true, eperm},
		{"write read-only past end", "ro", 0, cmdWrite, diskSize, 512, true, eperm},
		{"trim read-only", "ro", 0, cmdTrim, 0, 512, false, eperm},
		{"zero read-only", "ro", 0, cmdWriteZeroes, 0, 512, false, eperm},
	}
	for _, structured := range []bool{false, true} {
		e := newEnv(t, nbd.Options{})
		conns := map[string]*client{"disk": e.open(t, "disk", structured), "ro": e.open(t, "ro", structured)}
		for _, tt := range tests {
			if structured && (tt.name == "DF without structured" || tt.name == "block status without structured") {
				continue
			}
			t.Run(fmt.Sprintf("%s/structured=%v", tt.name, structured), func(t *testing.T) {
				c := conns[tt.export]
				var payload []byte
				if tt.payload {
					payload = make([]byte, tt.length)
				}
				r := c.do(tt.flags, tt.cmd, tt.off, tt.length, payload)
				if r.errno != tt.want {
					t.Errorf("errno %d, want %d", r.errno, tt.want)
				}
				if structured && !r.simple && (r.typ != 1<<15+1 || r.flags&1 == 0) {
					t.Errorf("error chunk type %#x flags %#x", r.typ, r.flags)
				}
				if tt.cmd == cmdRead && structured && r.simple {
					t.Errorf("READ answered with a simple reply after structured negotiation")
				}
				// The connection stays usable.
				if _, errno := c.readData(0, 512); errno != 0 {
					t.Errorf("read after error: errno %d", errno)
				}
			})
		}
		if n := e.ro.Writes() + e.disk.Writes(); n != 0 {
			t.Errorf("%d rejected writes reached a backend", n)
		}
	}
}

func TestOversizedWrite(t *testing.T) {
	e := newEnv(t, nbd.Options{})
	c := e.open(t, "disk", false)
	// Skippable: EINVAL, payload discarded, connection carries on.
	n := uint32(32<<20 + 4096)
	c.request(0, cmdWrite, 1, 0, n, make([]byte, n))
	if r := c.readReply(0); r.errno != einval || r.handle != 1 {
		t.Fatalf("oversized write: errno %d handle %d, want EINVAL", r.errno, r.handle)
	}
	if _, errno := c.readData(0, 512); errno != 0 {
		t.Fatalf("read after oversized write: errno %d", errno)
	}
	if e.disk.Writes() != 0 {
		t.Errorf("oversized write reached the backend")
	}
	// Too large to skip: the connection is closed.
	c.request(0, cmdWrite, 2, 0, 1<<31, nil)
	c.expectClosed()
	e.waitReleased(t)
}

func TestConnectionClosedOnProtocolErrors(t *testing.T) {
	tests := []struct {
		name string
		send func(c *client)
	}{
		{"bad magic", func(c *client) { c.write(make([]byte, 28)) }},
		{"truncated payload", func(c *client) {
			c.request(0, cmdWrite, 1, 0, 4096, make([]byte, 100))
			c.nc.(interface{ CloseWrite() error }).CloseWrite()
		}},
		{"truncated header", func(c *client) {
			c.write([]byte{0x25, 0x60, 0x95, 0x13, 0, 0})
			c.nc.(interface{ CloseWrite() error }).CloseWrite()
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, nbd.Options{})
			good := e.open(t, "disk", false)
			bad := e.open(t, "disk", false)
			tt.send(bad)
			bad.expectClosed()
			if e.disk.Writes() != 0 {
				t.Errorf("truncated write reached the backend")
			}
			// The other client is still served.
			if r := good.do(0, cmdWrite, 0, 3, []byte("abc")); r.errno != 0 {
				t.Errorf("other client: errno %d", r.errno)
			}
		})
	}
}

func TestBackendErrors(t *testing.T) {
	tests := []struct {
		name  string
		ops   nbdtest.Op
		err   error
		flags uint16
		cmd   uint16
		want  uint32
	}{
		{"read EIO", nbdtest.OpRead, syscall.EIO, 0, cmdRead, eio},
		{"write ENOSPC", nbdtest.OpWrite, fmt.Errorf("store: %w", syscall.ENOSPC), 0, cmdWrite, enospc},
		{"write EDQUOT", nbdtest.OpWrite, syscall.EDQUOT, 0, cmdWrite, enospc},
		{"flush EIO", nbdtest.OpFlush, syscall.EIO, 0, cmdFlush, eio},
		{"fua flush fails", nbdtest.OpFlush, syscall.EIO, flagFUA, cmdWrite, eio},
		{"trim ESHUTDOWN", nbdtest.OpTrim, syscall.ESHUTDOWN, 0, cmdTrim, eshutdown},
		{"fast zero ENOTSUP", nbdtest.OpZero, syscall.ENOTSUP, flagFastZero, cmdWriteZeroes, enotsup},
		{"cache EINVAL", nbdtest.OpCache, syscall.EINVAL, 0, cmdCache, einval},
		{"plain error is EIO", nbdtest.OpRead, errors.New("boom"), 0, cmdRead, eio},
		{"unlisted errno is EIO", nbdtest.OpRead, syscall.EBADF, 0, cmdRead, eio},
		{"block status EPERM", nbdtest.OpExtents, syscall.EPERM, 0, cmdBlockStatus, eperm},
	}
	for _, structured := range []bool{false, true} {
		for _, tt := range tests {
			if tt.cmd == cmdBlockStatus && !structured {
				continue
			}
			t.Run(fmt.Sprintf("%s/structured=%v", tt.name, structured), func(t *testing.T) {
				e := newEnv(t, nbd.Options{})
				c := e.open(t, "disk", structured)
				e.disk.Fail(tt.ops, 4096, 4096, tt.err)
				var payload []byte
				if tt.cmd == cmdWrite {
					payload = make([]byte, 4096)
				}
				off, n := uint64(4096), uint32(4096)
				if tt.cmd == cmdFlush {
					off, n = 0, 0
				}
				if r := c.do(tt.flags, tt.cmd, off, n, payload); r.errno != tt.want {
					t.Errorf("errno %d, want %d", r.errno, tt.want)
				}
				if _, errno := c.readData(0, 4096); errno != 0 {
					t.Errorf("read elsewhere after error: errno %d", errno)
				}
			})
		}
	}
}

func TestFUAAndFlush(t *testing.T) {
	e := newEnv(t, nbd.Options{})
	c := e.open(t, "disk", false)
	steps := []struct {
		flags, cmd uint16
		payload    []byte
		flushes    int64
	}{
		{0, cmdWrite, []byte("data"), 0},
		{flagFUA, cmdWrite, []byte("data"), 1},
		{flagFUA, cmdTrim, nil, 2},
		{flagFUA | flagNoHole, cmdWriteZeroes, nil, 3},
		{0, cmdFlush, nil, 4},
		{flagFUA, cmdFlush, nil, 5},
	}
	for i, s := range steps {
		off, n := uint64(0), uint32(4)
		if s.cmd == cmdFlush {
			n = 0
		} else if s.cmd != cmdWrite {
			n = 4096
		}
		if r := c.do(s.flags, s.cmd, off, n, s.payload); r.errno != 0 {
			t.Fatalf("step %d: errno %d", i, r.errno)
		}
		if got := e.disk.Flushes(); got != s.flushes {
			t.Errorf("step %d: %d flushes, want %d", i, got, s.flushes)
		}
	}
}

func TestTrimZeroBlockStatus(t *testing.T) {
	e := newEnv(t, nbd.Options{})
	c := e.open(t, "disk", true)
	const chunk = nbdtest.ChunkBytes
	fill := bytes.Repeat([]byte{0xab}, 8*chunk)
	if r := c.do(0, cmdWrite, 0, uint32(len(fill)), fill); r.errno != 0 {
		t.Fatalf("write errno %d", r.errno)
	}
	ops := []struct {
		flags, cmd uint16
		off        uint64
		n          uint32
	}{
		{0, cmdTrim, 2 * chunk, chunk},                 // hole at chunk 2
		{0, cmdWriteZeroes, 4 * chunk, 2 * chunk},      // holes at 4, 5
		{flagNoHole, cmdWriteZeroes, 6 * chunk, chunk}, // zeroed but allocated
		{0, cmdCache, 0, 8 * chunk},
	}
	for _, o := range ops {
		if r := c.do(o.flags, o.cmd, o.off, o.n, nil); r.errno != 0 {
			t.Fatalf("cmd %d: errno %d", o.cmd, r.errno)
		}
	}
	got, errno := c.readData(0, 8*chunk)
	if errno != 0 {
		t.Fatalf("read errno %d", errno)
	}
	want := bytes.Clone(fill)
	clear(want[2*chunk : 3*chunk])
	clear(want[4*chunk : 7*chunk])
	if !bytes.Equal(got, want) {
		t.Errorf("contents after trim/zero differ")
	}
	if !e.disk.Allocated(6*chunk) || e.disk.Allocated(4*chunk) {
		t.Errorf("NO_HOLE zero freed a chunk, or plain zero kept one")
	}

	type ext struct{ n, status uint32 }
	status := func(flags uint16, off uint64, n uint32) []ext {
		t.Helper()
		r := c.do(flags, cmdBlockStatus, off, n, nil)
		if r.errno != 0 || r.typ != 5 || r.flags&1 == 0 {
			t.Fatalf("block status: errno %d type %d flags %#x", r.errno, r.typ, r.flags)
		}
		if id := binary.BigEndian.Uint32(r.payload); id == 0 {
			t.Errorf("context id 0")
		}
		var es []ext
		for p := r.payload[4:]; len(p) >= 8; p = p[8:] {
			es = append(es, ext{binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])})
		}
		return es
	}
	const hz = 3 // HOLE|ZERO
	tests := []struct {
		name  string
		flags uint16
		off   uint64
		n     uint32
		want  []ext
	}{
		{"all", 0, 0, 8 * chunk, []ext{{2 * chunk, 0}, {chunk, hz}, {chunk, 0}, {2 * chunk, hz}, {2 * chunk, 0}}},
		{"unaligned", 0, chunk + 100, chunk, []ext{{chunk - 100, 0}, {100, hz}}},
		{"req one", flagReqOne, 0, 8 * chunk, []ext{{2 * chunk, 0}}},
		{"tail hole", 0, 8 * chunk, 100, []ext{{100, hz}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := status(tt.flags, tt.off, tt.n)
			if fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Errorf("extents %v, want %v", got, tt.want)
			}
		})
	}
}

// gateBackend blocks each ReadAt until its offset's gate is opened, and
// reports arrivals.
type gateBackend struct {
	nbdtest.Null
	arrived chan int64
	mu      sync.Mutex
	gates   map[int64]chan struct{}
}

func newGate(size int64) *gateBackend {
	return &gateBackend{Null: nbdtest.Null{SizeBytes: size}, arrived: make(chan int64, 1024), gates: map[int64]chan struct{}{}}
}

func (g *gateBackend) gate(off int64) chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	ch, ok := g.gates[off]
	if !ok {
		ch = make(chan struct{})
		g.gates[off] = ch
	}
	return ch
}

func (g *gateBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	g.arrived <- off
	select {
	case <-g.gate(off):
		p[0] = byte(off / 4096)
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func gateEnv(t *testing.T, o nbd.Options) (*env, *gateBackend) {
	g := newGate(1 << 30)
	e := &env{cat: nbdtest.NewCatalog()}
	e.cat.Add(nbd.ExportInfo{Name: "g"}, g)
	e.start(t, o)
	return e, g
}

func waitArrivals(t *testing.T, g *gateBackend, n int) {
	t.Helper()
	for i := range n {
		select {
		case <-g.arrived:
		case <-time.After(10 * time.Second):
			t.Fatalf("only %d of %d requests reached the backend", i, n)
		}
	}
}

func TestManyInFlightOutOfOrder(t *testing.T) {
	const n = 200
	e, g := gateEnv(t, nbd.Options{Workers: n})
	c := e.open(t, "g", false)
	for i := range n {
		c.request(0, cmdRead, uint64(i), uint64(i)*4096, 4096, nil)
	}
	// All n requests are in the backend at once.
	waitArrivals(t, g, n)
	for i := n - 1; i >= 0; i-- {
		close(g.gate(int64(i) * 4096))
		r := c.readReply(4096)
		if r.errno != 0 || r.handle != uint64(i) {
			t.Fatalf("reply errno %d handle %d, want handle %d", r.errno, r.handle, i)
		}
		if r.payload[0] != byte(i) {
			t.Fatalf("reply %d carries data of %d", i, r.payload[0])
		}
	}
}

func TestInflightBytesCap(t *testing.T) {
	e, g := gateEnv(t, nbd.Options{Workers: 8, MaxInflightBytes: 8192})
	c := e.open(t, "g", false)
	for i := range 4 {
		c.request(0, cmdRead, uint64(i), uint64(i)*4096, 4096, nil)
	}
	waitArrivals(t, g, 2)
	time.Sleep(50 * time.Millisecond)
	if extra := len(g.arrived); extra != 0 {
		t.Fatalf("%d requests beyond the byte cap reached the backend", extra)
	}
	for i := range 4 {
		close(g.gate(int64(i) * 4096))
	}
	seen := map[uint64]bool{}
	for range 4 {
		r := c.readReply(4096)
		if r.errno != 0 {
			t.Errorf("errno %d", r.errno)
		}
		seen[r.handle] = true
	}
	if len(seen) != 4 {
		t.Errorf("replies for %v", seen)
	}
}

// TestInflightBytesTotalCap: connections share MaxInflightBytesTotal, but
// one holding nothing is still admitted a request, so a full budget never
// stalls a connection that has nothing in flight.
func TestInflightBytesTotalCap(t *testing.T) {
	const total = 4 * 4096
	e, g := gateEnv(t, nbd.Options{Workers: 8, MaxInflightBytesTotal: total})
	a, b := e.open(t, "g", false), e.open(t, "g", false)
	// a fills the budget on its own; then b, holding nothing, gets one
	// request in and no more.
	for i := range 6 {
		a.request(0, cmdRead, uint64(i), uint64(i)*4096, 4096, nil)
	}
	waitArrivals(t, g, 4)
	for i := range 3 {
		b.request(0, cmdRead, uint64(10+i), uint64(10+i)*4096, 4096, nil)
	}
	select {
	case off := <-g.arrived:
		if off != 10*4096 {
			t.Fatalf("request at %d reached the backend past a full budget", off)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a connection holding nothing was not admitted")
	}
	time.Sleep(50 * time.Millisecond)
	if extra := len(g.arrived); extra != 0 {
		t.Fatalf("%d requests beyond the shared byte cap reached the backend", extra)
	}

	// b's admission counts against the budget: a's first reply leaves it
	// full, its second makes room for exactly one more request.
	for i := range 2 {
		close(g.gate(int64(i) * 4096))
		if r := a.readReply(4096); r.errno != 0 || r.handle != uint64(i) {
			t.Fatalf("reply errno %d handle %d, want handle %d", r.errno, r.handle, i)
		}
		time.Sleep(50 * time.Millisecond)
		if got := len(g.arrived); got != i {
			t.Fatalf("after %d replies, %d more requests reached the backend, want %d", i+1, got, i)
		}
	}

	for _, off := range []int64{2, 3, 4, 5, 10, 11, 12} {
		close(g.gate(off * 4096))
	}
	for c, n := range map[*client]int{a: 4, b: 3} {
		for range n {
			if r := c.readReply(4096); r.errno != 0 {
				t.Errorf("errno %d for handle %d", r.errno, r.handle)
			}
		}
	}
}

func TestDiscDrainsInFlight(t *testing.T) {
	e, g := gateEnv(t, nbd.Options{})
	c := e.open(t, "g", false)
	c.request(0, cmdRead, 1, 0, 4096, nil)
	waitArrivals(t, g, 1)
	c.request(0, cmdDisc, 2, 0, 0, nil)
	close(g.gate(0))
	if r := c.readReply(4096); r.errno != 0 || r.handle != 1 {
		t.Errorf("reply before disconnect: errno %d handle %d", r.errno, r.handle)
	}
	c.expectClosed()
	e.waitReleased(t)
}

type panicBackend struct{ nbdtest.Null }

func (panicBackend) Flush(context.Context) error { panic("flush exploded") }

func TestPanicClosesOnlyThatConnection(t *testing.T) {
	e := newEnv(t, nbd.Options{})
	e.cat.Add(nbd.ExportInfo{Name: "panic"}, panicBackend{nbdtest.Null{SizeBytes: 4096}})
	good := e.open(t, "disk", false)
	bad := e.open(t, "panic", false)
	bad.request(0, cmdFlush, 1, 0, 0, nil)
	bad.expectClosed()
	if r := good.do(0, cmdFlush, 0, 0, nil); r.errno != 0 {
		t.Errorf("other connection: errno %d", r.errno)
	}
	bad2 := e.open(t, "panic", false)
	if _, errno := bad2.readData(0, 10); errno != 0 {
		t.Errorf("new connection to the same export: errno %d", errno)
	}
}

func TestShutdownIdle(t *testing.T) {
	e := newEnv(t, nbd.Options{})
	c := e.open(t, "disk", false)
	hs := e.dial(t)
	hs.hello(3)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := e.srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := <-e.done; !errors.Is(err, nbd.ErrServerClosed) {
		t.Errorf("Serve returned %v", err)
	}
	e.done <- nbd.ErrServerClosed // for the cleanup
	c.expectClosed()
	hs.expectClosed()
	e.waitReleased(t)
}

func TestShutdownDrains(t *testing.T) {
	e, g := gateEnv(t, nbd.Options{})
	c := e.open(t, "g", false)
	c.request(0, cmdRead, 1, 0, 4096, nil)
	waitArrivals(t, g, 1)
	var shutdownErr atomic.Value
	done := make(chan struct{})
	go func() {
		defer close(done)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := e.srv.Shutdown(ctx); err != nil {
			shutdownErr.Store(err)
		}
	}()
	// Wait until the listener is closed, so the shutdown has begun.
	for deadline := time.Now().Add(5 * time.Second); ; {
		select {
		case err := <-e.done:
			e.done <- err
		default:
			if time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
				continue
			}
			t.Fatal("Serve did not return")
		}
		break
	}
	// New requests get ESHUTDOWN; a rejected write's payload is skipped.
	c.request(0, cmdWrite, 2, 0, 8, []byte("12345678"))
	if r := c.readReply(0); r.errno != eshutdown || r.handle != 2 {
		t.Errorf("request during shutdown: errno %d handle %d, want ESHUTDOWN", r.errno, r.handle)
	}
	select {
	case <-done:
		t.Fatal("Shutdown returned with a request in flight")
	default:
	}
	close(g.gate(0))
	if r := c.readReply(4096); r.errno != 0 || r.handle != 1 {
		t.Errorf("in-flight read: errno %d handle %d", r.errno, r.handle)
	}
	<-done
	if err := shutdownErr.Load(); err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	c.expectClosed()
	e.waitReleased(t)
}

func TestShutdownDeadline(t *testing.T) {
	e, g := gateEnv(t, nbd.Options{})
	c := e.open(t, "g", false)
	c.request(0, cmdRead, 1, 0, 4096, nil)
	waitArrivals(t, g, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := e.srv.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown = %v, want DeadlineExceeded", err)
	}
	// The blocked backend call sees its context cancelled and the
	// connection is closed.
	c.expectClosed()
	e.waitReleased(t)
}

func TestServeAfterClose(t *testing.T) {
	e := newEnv(t, nbd.Options{})
	e.srv.Close()
	l, err := netListenUnix(t)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.srv.Serve(context.Background(), l); !errors.Is(err, nbd.ErrServerClosed) {
		t.Errorf("Serve after Close = %v", err)
	}
}

func TestServeContextCancel(t *testing.T) {
	cat := nbdtest.NewCatalog()
	cat.Add(nbd.ExportInfo{Name: "d"}, nbdtest.NewMem(4096))
	srv := nbd.NewServer(cat, nbd.Options{})
	l, err := netListenUnix(t)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Serve = %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}
}

// flakyListener fails Accept a few times before handing out connections.
type flakyListener struct {
	net.Listener
	fails atomic.Int32
}

func (l *flakyListener) Accept() (net.Conn, error) {
	if l.fails.Add(-1) >= 0 {
		return nil, errors.New("accept: too many open files")
	}
	return l.Listener.Accept()
}

func TestServeRetriesAcceptErrors(t *testing.T) {
	e := newEnv(t, nbd.Options{})
	inner, err := netListenUnix(t)
	if err != nil {
		t.Fatal(err)
	}
	fl := &flakyListener{Listener: inner}
	fl.fails.Store(3)
	go e.srv.Serve(context.Background(), fl)
	e2 := &env{sock: inner.Addr().String()}
	c := e2.dial(t)
	c.hello(3)
	c.goExport("disk")
	if _, errno := c.readData(0, 512); errno != 0 {
		t.Errorf("read after accept errors: errno %d", errno)
	}
	if n := fl.fails.Load(); n >= 0 {
		t.Errorf("accept errors not all seen: %d left", n)
	}
}
