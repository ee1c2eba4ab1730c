package nbd_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/cryptnbd/cryptnbd/nbd"
	"github.com/cryptnbd/cryptnbd/nbd/nbdtest"
)

// pipeListener hands out the server ends of net.Pipe connections.
type pipeListener struct {
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

// dial connects a new pipe to the server and returns the client end.
func (l *pipeListener) dial() net.Conn {
	cli, srv := net.Pipe()
	l.ch <- srv
	return cli
}

// scriptConn is the server end of a connection whose client sends fixed
// bytes, then half-closes: Read returns them and then io.EOF, Write
// discards. Unlike net.Pipe it lets the server see every byte and the EOF
// without a client goroutine racing it.
type scriptConn struct {
	net.Conn // the server end of a net.Pipe, for addresses
	r        io.Reader
	once     sync.Once
	closed   chan struct{}
}

func (c *scriptConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

func (c *scriptConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *scriptConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *scriptConn) SetDeadline(time.Time) error      { return nil }
func (c *scriptConn) SetReadDeadline(time.Time) error  { return nil }
func (c *scriptConn) SetWriteDeadline(time.Time) error { return nil }

// FuzzServe feeds raw client bytes to a server over an in-memory
// connection (net.Pipe, half-closed after the input): handshake, options
// and requests. The server must neither panic nor hang; a deadline bounds
// the wait for it to finish.
func FuzzServe(f *testing.F) {
	f.Add([]byte{0, 0, 0, 3})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 1<<20 {
			t.Skip("input too large")
		}
		cat := nbdtest.NewCatalog()
		cat.Add(nbd.ExportInfo{Name: "disk", Description: "d"}, nbdtest.NewMem(1<<16))
		cat.Add(nbd.ExportInfo{Name: "ro", ReadOnly: true}, nbdtest.NewMem(1<<16))
		srv := nbd.NewServer(cat, nbd.Options{HandshakeTimeout: 2 * time.Second, Workers: 2, MaxInflightRequests: 8})
		l := newPipeListener()
		served := make(chan error, 1)
		go func() { served <- srv.Serve(context.Background(), l) }()

		cli, srvEnd := net.Pipe()
		defer cli.Close()
		sc := &scriptConn{Conn: srvEnd, r: bytes.NewReader(data), closed: make(chan struct{})}
		l.ch <- sc
		// The connection ends by itself at the EOF; wait for that.
		select {
		case <-sc.closed:
		case <-time.After(5 * time.Second):
			t.Fatalf("connection still open 5s after its input ended")
		}

		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Fatalf("Shutdown: %v (a connection hung)", err)
		}
		if err := <-served; !errors.Is(err, nbd.ErrServerClosed) {
			t.Fatalf("Serve = %v", err)
		}
		if n := cat.Open(); n != 0 {
			t.Fatalf("%d exports not released", n)
		}
	})
}
