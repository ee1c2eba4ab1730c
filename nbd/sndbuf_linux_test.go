package nbd_test

import (
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/cryptnbd/cryptnbd/nbd"
	"github.com/cryptnbd/cryptnbd/nbd/nbdtest"
)

// keepingListener hands the server the accepted *net.TCPConn itself, so
// the server still sees a TCP connection, and remembers it for the test.
type keepingListener struct {
	net.Listener
	mu    sync.Mutex
	conns []*net.TCPConn
}

func (l *keepingListener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if tc, ok := nc.(*net.TCPConn); ok {
		l.mu.Lock()
		l.conns = append(l.conns, tc)
		l.mu.Unlock()
	}
	return nc, err
}

func (l *keepingListener) last(t *testing.T) *net.TCPConn {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.conns) == 0 {
		t.Fatal("no connection accepted")
	}
	return l.conns[len(l.conns)-1]
}

func sndbuf(t *testing.T, tc *net.TCPConn) int {
	t.Helper()
	rc, err := tc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	var serr error
	if err := rc.Control(func(fd uintptr) {
		n, serr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF)
	}); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatal(serr)
	}
	return n
}

// TestLoopbackSendBuffer checks the send buffer of the server's side of a
// loopback connection: capped when the option is set, autotuned by
// default. Linux reports twice the size asked for (the
// rest is its bookkeeping), at most net.core.wmem_max.
func TestLoopbackSendBuffer(t *testing.T) {
	b, err := os.ReadFile("/proc/sys/net/core/wmem_max")
	if err != nil {
		t.Skipf("cannot read wmem_max: %v", err)
	}
	wmemMax, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	granted := func(n int) int { return 2 * min(n, wmemMax) }
	for _, tc := range []struct {
		name string
		opt  int
		want func(got int) bool
		what string
	}{
		{"set", 96 << 10, func(got int) bool { return got == granted(96<<10) }, strconv.Itoa(granted(96 << 10))},
		{"set larger", 256 << 10, func(got int) bool { return got == granted(256<<10) }, strconv.Itoa(granted(256 << 10))},
		{"default", 0, func(got int) bool { return got != granted(256<<10) && got != granted(96<<10) }, "the kernel's own size"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := &env{cat: nbdtest.NewCatalog(), disk: nbdtest.NewMem(diskSize)}
			e.cat.Add(nbd.ExportInfo{Name: "disk"}, e.disk)
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			kl := &keepingListener{Listener: l}
			e.tcp = l.Addr().String()
			e.serve(t, kl, nbd.Options{LoopbackSendBuffer: tc.opt})
			c := e.open(t, "disk", true)
			// A READ answered proves the connection is in transmission,
			// past everything the server does to a new socket.
			if r := c.do(0, cmdRead, 0, 4096, nil); r.errno != 0 {
				t.Fatalf("READ failed: errno %d", r.errno)
			}
			if got := sndbuf(t, kl.last(t)); !tc.want(got) {
				t.Errorf("server SO_SNDBUF = %d, want %s", got, tc.what)
			}
		})
	}
}
