package nbd_test

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cryptnbd/cryptnbd/nbd"
	"github.com/cryptnbd/cryptnbd/nbd/nbdtest"
)

// refusedWithoutGreeting checks that the server closed nc without
// sending anything.
func refusedWithoutGreeting(t *testing.T, nc net.Conn) {
	t.Helper()
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := io.Copy(io.Discard, nc)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("refused connection not closed")
	}
	if n != 0 {
		t.Errorf("refused connection got %d bytes", n)
	}
}

// waitOpen waits until the server has n connections open.
func waitOpen(t *testing.T, s *nbd.Server, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for s.Stats().Open != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections open, want %d", s.Stats().Open, n)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func TestMaxConns(t *testing.T) {
	var ref refusals
	e := newEnv(t, nbd.Options{MaxConns: 2, OnRefused: ref.hook})
	a := e.dial(t)
	a.hello(3)
	b := e.open(t, "disk", false)
	nc, err := e.dialRaw()
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	refusedWithoutGreeting(t, nc)
	if st := e.srv.Stats(); st.Refused[nbd.RefusedMaxConns] != 1 || st.Open != 2 || st.Accepted != 2 {
		t.Errorf("stats %+v, want 1 refused, 2 open, 2 accepted", st)
	}
	if got := ref.list(); len(got) != 1 || got[0] != nbd.RefusedMaxConns {
		t.Errorf("refusals %v", got)
	}
	// Room again once a connection goes.
	a.nc.Close()
	waitOpen(t, e.srv, 1)
	d := e.open(t, "disk", false)
	if r := d.do(0, cmdFlush, 0, 0, nil); r.errno != 0 {
		t.Errorf("flush on new connection: errno %d", r.errno)
	}
	if r := b.do(0, cmdFlush, 0, 0, nil); r.errno != 0 {
		t.Errorf("flush on old connection: errno %d", r.errno)
	}
}

func TestMaxConnsPerAddr(t *testing.T) {
	var ref refusals
	e := &env{cat: nbdtest.NewCatalog(), disk: nbdtest.NewMem(diskSize)}
	e.cat.Add(nbd.ExportInfo{Name: "disk"}, e.disk)
	e.startTCP(t, nbd.Options{MaxConnsPerAddr: 2, OnRefused: ref.hook})
	for range 2 {
		e.dial(t).hello(3)
	}
	nc, err := e.dialRaw()
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	refusedWithoutGreeting(t, nc)
	if got := ref.list(); len(got) != 1 || got[0] != nbd.RefusedMaxConnsPerAddr {
		t.Errorf("refusals %v", got)
	}
	// Another source address is not affected (all of 127/8 is local).
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	other, err := d.Dial("tcp", e.tcp)
	if err != nil {
		t.Fatal(err)
	}
	c := &client{t: t, nc: other, br: bufio.NewReader(other)}
	t.Cleanup(func() { other.Close() })
	other.SetDeadline(time.Now().Add(10 * time.Second))
	c.hello(3)
	c.goExport("disk")
	if st := e.srv.Stats(); st.Refused[nbd.RefusedMaxConnsPerAddr] != 1 || st.Open != 3 {
		t.Errorf("stats %+v", st)
	}
}

func TestIdleTimeout(t *testing.T) {
	const idle = 500 * time.Millisecond
	e, g := gateEnv(t, nbd.Options{IdleTimeout: idle})

	quiet := e.open(t, "g", false)
	busy := e.open(t, "g", false)
	active := e.open(t, "g", false)
	busy.request(0, cmdRead, 1, 0, 4096, nil)
	waitArrivals(t, g, 1)
	// active sends a request every idle/10.
	for range 12 {
		if r := active.do(0, cmdFlush, 0, 0, nil); r.errno != 0 {
			t.Fatalf("active connection: errno %d", r.errno)
		}
		time.Sleep(idle / 10)
	}
	quiet.expectClosed()
	// busy has had a request in flight all along and must still be
	// there to answer it.
	close(g.gate(0))
	if r := busy.readReply(4096); r.errno != 0 || r.handle != 1 {
		t.Errorf("busy connection: errno %d handle %d", r.errno, r.handle)
	}
	busy.expectClosed()
	if n := e.srv.Stats().IdleClosed; n < 2 {
		t.Errorf("IdleClosed = %d, want at least 2", n)
	}
}

// raiseNoFile makes sure n more file descriptors can be opened.
func raiseNoFile(t *testing.T, n uint64) {
	t.Helper()
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	if rl.Cur >= n+256 {
		return
	}
	if rl.Max < n+256 {
		t.Skipf("RLIMIT_NOFILE hard limit %d is below %d", rl.Max, n+256)
	}
	old := rl
	rl.Cur = rl.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		t.Skipf("cannot raise RLIMIT_NOFILE: %v", err)
	}
	t.Cleanup(func() { syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })
}

func heapInuse() (heap, sys uint64) {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse, ms.Sys
}

// TestHandshakeFlood: 1000 clients connect and send nothing. Each is
// dropped at the handshake deadline, the server's heap grows by a few
// KiB per connection, and a well-behaved client is served throughout.
func TestHandshakeFlood(t *testing.T) {
	const n = 1000
	// Short, but long enough for all n to be open at once on a busy
	// machine under -race.
	const timeout = 3 * time.Second
	raiseNoFile(t, 2*n)
	e := &env{cat: nbdtest.NewCatalog(), disk: nbdtest.NewMem(diskSize)}
	e.cat.Add(nbd.ExportInfo{Name: "disk"}, e.disk)
	e.startTCP(t, nbd.Options{HandshakeTimeout: timeout})
	before := e.open(t, "disk", false)
	heap0, sys0 := heapInuse()

	conns := make([]net.Conn, 0, n)
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	start := time.Now()
	for range n {
		nc, err := e.dialRaw()
		if err != nil {
			t.Fatalf("dial %d: %v", len(conns), err)
		}
		conns = append(conns, nc)
	}
	dialled := time.Since(start)
	waitOpen(t, e.srv, n+1)
	heap1, sys1 := heapInuse()
	t.Logf("%d idle handshakes (dialled in %v): heap in use %.1f MiB -> %.1f MiB (%+.1f KiB per connection), sys %.1f -> %.1f MiB",
		n, dialled, mib(heap0), mib(heap1), (float64(heap1)-float64(heap0))/1024/n, mib(sys0), mib(sys1))
	if heap1 > heap0 && heap1-heap0 > 32<<10*n {
		t.Errorf("heap grew by %d bytes for %d idle connections, more than 32 KiB each", heap1-heap0, n)
	}

	// Served during the flood: the connection from before, and a new one.
	during := e.open(t, "disk", false)
	during.do(0, cmdWrite, 0, 6, []byte("during"))
	if got, errno := before.readData(0, 6); errno != 0 || string(got) != "during" {
		t.Errorf("old connection during the flood: %q errno %d", got, errno)
	}

	// Every flood connection gets the greeting and then EOF.
	var wg sync.WaitGroup
	var bad atomic.Int64
	for _, nc := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			nc.SetReadDeadline(time.Now().Add(timeout + 20*time.Second))
			b, err := io.ReadAll(nc)
			if err != nil || len(b) != 18 {
				bad.Add(1)
			}
		}()
	}
	wg.Wait()
	if b := bad.Load(); b != 0 {
		t.Errorf("%d flood connections not closed cleanly after the greeting", b)
	}
	waitOpen(t, e.srv, 2)
	if st := e.srv.Stats(); st.Refused[nbd.RefusedHandshakeTimeout] != n {
		t.Errorf("handshake timeouts %d, want %d", st.Refused[nbd.RefusedHandshakeTimeout], n)
	}
	after := e.open(t, "disk", false)
	if got, errno := after.readData(0, 6); errno != 0 || string(got) != "during" {
		t.Errorf("connection after the flood: %q errno %d", got, errno)
	}
	if got, errno := during.readData(0, 6); errno != 0 || string(got) != "during" {
		t.Errorf("connection from during the flood: %q errno %d", got, errno)
	}
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

// blockBackend's writes block until their context ends.
type blockBackend struct {
	nbdtest.Null
	arrived chan struct{}
}

func (b *blockBackend) WriteAt(ctx context.Context, p []byte, off int64) error {
	b.arrived <- struct{}{}
	<-ctx.Done()
	return ctx.Err()
}

// TestWriteFloodBounded: a client sends 128 WRITEs of 32 MiB to a backend
// that never finishes them, without reading replies. The reader stops
// once MaxInflightBytes are held, so the heap stays within the cap plus a
// fixed overhead, and another client is served meanwhile.
func TestWriteFloodBounded(t *testing.T) {
	const (
		writes  = 128
		size    = nbd.MaxPayload
		capB    = 64 << 20
		slackB  = 16 << 20
		expectN = capB / size
	)
	blk := &blockBackend{Null: nbdtest.Null{SizeBytes: writes * size}, arrived: make(chan struct{}, writes)}
	e := &env{cat: nbdtest.NewCatalog(), disk: nbdtest.NewMem(diskSize)}
	e.cat.Add(nbd.ExportInfo{Name: "block"}, blk)
	e.cat.Add(nbd.ExportInfo{Name: "disk"}, e.disk)
	e.start(t, nbd.Options{MaxInflightBytes: capB})

	payload := make([]byte, size)
	hdr := make([]byte, 28)
	binary.BigEndian.PutUint32(hdr, magicRequest)
	binary.BigEndian.PutUint16(hdr[6:], cmdWrite)
	binary.BigEndian.PutUint32(hdr[24:], size)
	c := e.open(t, "block", false)
	c.nc.SetDeadline(time.Time{})
	heap0, _ := heapInuse()

	var sent atomic.Int64
	done := make(chan error, 1)
	go func() {
		for i := range writes {
			binary.BigEndian.PutUint64(hdr[8:], uint64(i))
			binary.BigEndian.PutUint64(hdr[16:], uint64(i)*size)
			if _, err := c.nc.Write(hdr); err != nil {
				done <- err
				return
			}
			if _, err := c.nc.Write(payload); err != nil {
				done <- err
				return
			}
			sent.Add(1)
		}
		done <- nil
	}()
	for i := range expectN {
		select {
		case <-blk.arrived:
		case <-time.After(10 * time.Second):
			t.Fatalf("only %d writes reached the backend", i)
		}
	}
	// Let the client push as much as it can.
	for prev := int64(-1); prev != sent.Load(); {
		prev = sent.Load()
		time.Sleep(200 * time.Millisecond)
	}
	if extra := len(blk.arrived); extra != 0 {
		t.Errorf("%d writes beyond the byte cap reached the backend", extra)
	}
	if s := sent.Load(); s >= writes/2 {
		t.Errorf("client sent %d of %d writes: the server kept reading", s, writes)
	}
	heap1, _ := heapInuse()
	grew := int64(heap1) - int64(heap0)
	t.Logf("%d x %d MiB writes, client pushed %d, cap %d MiB: heap in use %.1f -> %.1f MiB (%+.1f MiB)",
		writes, size>>20, sent.Load(), capB>>20, mib(heap0), mib(heap1), float64(grew)/(1<<20))
	if grew > capB+slackB {
		t.Errorf("heap grew by %d MiB, more than the %d MiB cap + %d MiB", grew>>20, capB>>20, slackB>>20)
	}

	other := e.open(t, "disk", false)
	other.do(0, cmdWrite, 512, 5, []byte("other"))
	if got, errno := other.readData(512, 5); errno != 0 || string(got) != "other" {
		t.Errorf("other client during the flood: %q errno %d", got, errno)
	}

	c.nc.Close()
	if err := <-done; err == nil {
		t.Errorf("all %d writes went through", writes)
	}
}
