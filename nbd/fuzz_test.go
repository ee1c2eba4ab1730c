package nbd_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/cryptnbd/cryptnbd/nbd"
	"github.com/cryptnbd/cryptnbd/nbd/nbdtest"
	"github.com/cryptnbd/cryptnbd/nbd/tlsfiles"
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

// fuzzPKI makes TLS credentials for a fuzz target once.
func fuzzPKI(f *testing.F) (server *tls.Config, client *tls.Config) {
	dir := filepath.Join(f.TempDir(), "pki")
	if err := tlsfiles.Init(dir, tlsfiles.Options{}); err != nil {
		f.Fatal(err)
	}
	creds, err := tlsfiles.LoadServer(tlsfiles.InDir(dir, false))
	if err != nil {
		f.Fatal(err)
	}
	client, err = tlsfiles.LoadClient(dir, "localhost")
	if err != nil {
		f.Fatal(err)
	}
	return creds.Config(), client
}

// FuzzServe feeds raw client bytes to a server over an in-memory
// connection (net.Pipe, half-closed after the input): handshake, options
// and requests. The server must neither panic nor hang; a deadline bounds
// the wait for it to finish. TLS is on, so STARTTLS in the input starts
// a TLS handshake on whatever bytes follow.
func FuzzServe(f *testing.F) {
	tlsConf, _ := fuzzPKI(f)
	f.Add([]byte{0, 0, 0, 3})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 1<<20 {
			t.Skip("input too large")
		}
		cat := nbdtest.NewCatalog()
		cat.Add(nbd.ExportInfo{Name: "disk", Description: "d"}, nbdtest.NewMem(1<<16))
		cat.Add(nbd.ExportInfo{Name: "ro", ReadOnly: true}, nbdtest.NewMem(1<<16))
		srv := nbd.NewServer(cat, nbd.Options{HandshakeTimeout: 2 * time.Second, Workers: 2, MaxInflightRequests: 8,
			TLSMode: nbd.TLSOn, TLSConfig: tlsConf})
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

// FuzzServeTLS drives negotiation with a script instead of raw bytes, so
// that it can get through a real TLS handshake: the first script byte is
// the client flags (low byte), then each option is one byte (taken modulo
// 12), a 16-bit length and that many data bytes. The client sends one
// option at a time and reads its replies; after an ACKed STARTTLS it
// starts TLS (Go client), and after EXPORT_NAME or an ACKed GO it sends
// the rest of the script as raw transmission bytes while draining
// replies. mode selects TLSOn (even) or TLSRequire (odd). The server must
// neither panic nor hang, and must release every export.
func FuzzServeTLS(f *testing.F) {
	tlsConf, cliConf := fuzzPKI(f)
	f.Add([]byte{3, optStartTLS, 0, 0, optGo, 0, 10, 0, 0, 0, 4, 'd', 'i', 's', 'k', 0, 0}, uint8(1))
	f.Fuzz(func(t *testing.T, script []byte, mode uint8) {
		if len(script) > 1<<16 {
			t.Skip("script too large")
		}
		cat := nbdtest.NewCatalog()
		cat.Add(nbd.ExportInfo{Name: "disk", Description: "d"}, nbdtest.NewMem(1<<16))
		cat.Add(nbd.ExportInfo{Name: "ro", ReadOnly: true}, nbdtest.NewMem(1<<16))
		tm := nbd.TLSOn
		if mode&1 != 0 {
			tm = nbd.TLSRequire
		}
		srv := nbd.NewServer(cat, nbd.Options{HandshakeTimeout: 2 * time.Second, Workers: 2, MaxInflightRequests: 8,
			TLSMode: tm, TLSConfig: tlsConf})
		l := newPipeListener()
		served := make(chan error, 1)
		go func() { served <- srv.Serve(context.Background(), l) }()

		cli := l.dial()
		cli.SetDeadline(time.Now().Add(5 * time.Second))
		runScript(cli, script, cliConf)
		cli.Close()

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

// runScript plays a FuzzServeTLS script against the server on nc. It
// stops at the first error: the server may hang up at any point.
func runScript(nc net.Conn, s []byte, cliConf *tls.Config) {
	take := func(n int) []byte {
		n = min(n, len(s))
		b := s[:n]
		s = s[n:]
		return b
	}
	br := bufio.NewReader(nc)
	if _, err := io.ReadFull(br, make([]byte, 18)); err != nil || len(s) == 0 {
		return
	}
	if _, err := nc.Write([]byte{0, 0, 0, take(1)[0]}); err != nil {
		return
	}
	for len(s) >= 3 {
		opt := uint32(take(1)[0] % 12)
		data := take(int(binary.BigEndian.Uint16(take(2))))
		b := binary.BigEndian.AppendUint64(nil, magicOpt)
		b = binary.BigEndian.AppendUint32(b, opt)
		b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
		if _, err := nc.Write(append(b, data...)); err != nil {
			return
		}
		if opt == optExportName {
			transmit(nc, br, s)
			return
		}
		final, ok := finalReply(br)
		if !ok || opt == optAbort {
			return
		}
		switch {
		case opt == optStartTLS && final == repAck:
			tc := tls.Client(nc, cliConf)
			if tc.Handshake() != nil {
				return
			}
			nc, br = tc, bufio.NewReader(tc)
		case opt == optGo && final == repAck:
			transmit(nc, br, s)
			return
		}
	}
}

// finalReply reads option replies up to the final one and returns its
// type.
func finalReply(br *bufio.Reader) (uint32, bool) {
	var h [20]byte
	for {
		if _, err := io.ReadFull(br, h[:]); err != nil || binary.BigEndian.Uint64(h[:]) != magicOptReply {
			return 0, false
		}
		if _, err := br.Discard(int(binary.BigEndian.Uint32(h[16:]))); err != nil {
			return 0, false
		}
		if typ := binary.BigEndian.Uint32(h[12:]); typ == repAck || typ&(1<<31) != 0 {
			return typ, true
		}
	}
}

// transmit sends raw bytes while draining whatever the server answers.
func transmit(nc net.Conn, br *bufio.Reader, rest []byte) {
	drained := make(chan struct{})
	go func() {
		io.Copy(io.Discard, br)
		close(drained)
	}()
	nc.Write(rest)
	nc.Close()
	<-drained
}
