package nbd_test

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cryptnbd/cryptnbd/nbd"
	"github.com/cryptnbd/cryptnbd/nbd/nbdtest"
)

// Protocol numbers the test client needs, spelled out independently of
// the package under test.
const (
	magicInit     = 0x4e42444d41474943
	magicOpt      = 0x49484156454F5054
	magicOptReply = 0x3e889045565a9
	magicRequest  = 0x25609513
	magicSimple   = 0x67446698
	magicStruct   = 0x668e33ef

	optExportName = 1
	optAbort      = 2
	optList       = 3
	optInfo       = 6
	optGo         = 7
	optStructured = 8
	optListMeta   = 9
	optSetMeta    = 10

	repAck        = 1
	repServer     = 2
	repInfo       = 3
	repMeta       = 4
	repErrUnsup   = 1<<31 + 1
	repErrInvalid = 1<<31 + 3
	repErrUnknown = 1<<31 + 6

	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7

	flagFUA      = 1
	flagNoHole   = 2
	flagDF       = 4
	flagReqOne   = 8
	flagFastZero = 16

	tflagHasFlags  = 1 << 0
	tflagReadOnly  = 1 << 1
	tflagFlush     = 1 << 2
	tflagFUA       = 1 << 3
	tflagTrim      = 1 << 5
	tflagZeroes    = 1 << 6
	tflagDF        = 1 << 7
	tflagMultiConn = 1 << 8
	tflagCache     = 1 << 10
	tflagFastZero  = 1 << 11

	eperm     = 1
	eio       = 5
	einval    = 22
	enospc    = 28
	enotsup   = 95
	eshutdown = 108
)

const diskSize = 1 << 20

// env is a server on a Unix socket with a catalog of two exports:
// "disk" (writable, a Mem) and "ro" (read-only, a Mem).
type env struct {
	srv *nbd.Server
	cat *nbdtest.Catalog
	// serveCat, if set, is served instead of cat (a wrapper around it).
	serveCat nbd.Catalog
	disk     *nbdtest.Mem
	ro       *nbdtest.Mem
	sock     string // Unix socket, or "" when tcp is set
	tcp      string // host:port when listening on TCP
	done     chan error
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return nil
}

// shortTempDir returns a directory whose path is short enough for a Unix
// socket.
func shortTempDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "nbdt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func newEnv(t testing.TB, o nbd.Options) *env {
	t.Helper()
	e := &env{cat: nbdtest.NewCatalog(), disk: nbdtest.NewMem(diskSize), ro: nbdtest.NewMem(diskSize)}
	e.cat.Add(nbd.ExportInfo{Name: "disk", Description: "test disk", MinBlock: 512, PreferredBlock: 4096, MaxBlock: 1 << 20}, e.disk)
	e.cat.Add(nbd.ExportInfo{Name: "ro", Description: "read-only disk", ReadOnly: true}, e.ro)
	e.start(t, o)
	return e
}

func (e *env) start(t testing.TB, o nbd.Options) {
	t.Helper()
	e.sock = filepath.Join(shortTempDir(t), "s")
	l, err := net.Listen("unix", e.sock)
	if err != nil {
		t.Fatal(err)
	}
	e.serve(t, l, o)
}

// startTCP starts the server on a loopback TCP port.
func (e *env) startTCP(t testing.TB, o nbd.Options) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.tcp = l.Addr().String()
	e.serve(t, l, o)
}

func (e *env) serve(t testing.TB, l net.Listener, o nbd.Options) {
	t.Helper()
	if o.Logger == nil {
		o.Logger = testLogger(t)
	}
	var cat nbd.Catalog = e.cat
	if e.serveCat != nil {
		cat = e.serveCat
	}
	e.srv = nbd.NewServer(cat, o)
	e.done = make(chan error, 1)
	go func() { e.done <- e.srv.Serve(context.Background(), l) }()
	t.Cleanup(func() {
		e.srv.Close()
		if err := <-e.done; !errors.Is(err, nbd.ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
}

// waitReleased waits until every opened export has been released.
func (e *env) waitReleased(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for e.cat.Open() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("exports still open: %d", e.cat.Open())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// dialRaw connects to the server.
func (e *env) dialRaw() (net.Conn, error) {
	if e.tcp != "" {
		return net.Dial("tcp", e.tcp)
	}
	return net.Dial("unix", e.sock)
}

// client is a minimal raw NBD client for tests.
type client struct {
	t          testing.TB
	nc         net.Conn
	br         *bufio.Reader
	structured bool
	size       uint64
	tflags     uint16
}

func (e *env) dial(t testing.TB) *client {
	t.Helper()
	nc, err := e.dialRaw()
	if err != nil {
		t.Fatal(err)
	}
	nc.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { nc.Close() })
	return &client{t: t, nc: nc, br: bufio.NewReader(nc)}
}

func (c *client) write(b []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *client) read(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.br, b); err != nil {
		c.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// hello reads the greeting and sends client flags.
func (c *client) hello(cflags uint32) {
	c.t.Helper()
	b := c.read(18)
	if got := binary.BigEndian.Uint64(b); got != magicInit {
		c.t.Fatalf("init magic %#x", got)
	}
	if got := binary.BigEndian.Uint64(b[8:]); got != magicOpt {
		c.t.Fatalf("opt magic %#x", got)
	}
	if got := binary.BigEndian.Uint16(b[16:]); got != 3 {
		c.t.Errorf("handshake flags %#x, want FIXED_NEWSTYLE|NO_ZEROES", got)
	}
	c.write(binary.BigEndian.AppendUint32(nil, cflags))
}

func (c *client) sendOpt(opt uint32, data []byte) {
	c.t.Helper()
	b := binary.BigEndian.AppendUint64(nil, magicOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	c.write(append(b, data...))
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (c *client) readOptReply() optReply {
	c.t.Helper()
	b := c.read(20)
	if got := binary.BigEndian.Uint64(b); got != magicOptReply {
		c.t.Fatalf("option reply magic %#x", got)
	}
	r := optReply{opt: binary.BigEndian.Uint32(b[8:]), typ: binary.BigEndian.Uint32(b[12:])}
	r.data = c.read(int(binary.BigEndian.Uint32(b[16:])))
	return r
}

// readOptReplies reads replies up to and including the final one (ACK or
// an error).
func (c *client) readOptReplies() []optReply {
	c.t.Helper()
	var rs []optReply
	for {
		r := c.readOptReply()
		rs = append(rs, r)
		if r.typ == repAck || r.typ&(1<<31) != 0 {
			return rs
		}
	}
}

func infoData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

func metaData(name string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// goExport sends NBD_OPT_GO and checks it succeeded.
func (c *client) goExport(name string) {
	c.t.Helper()
	c.sendOpt(optGo, infoData(name))
	rs := c.readOptReplies()
	last := rs[len(rs)-1]
	if last.typ != repAck {
		c.t.Fatalf("GO %q: final reply %#x %q", name, last.typ, last.data)
	}
	for _, r := range rs {
		if r.typ == repInfo && binary.BigEndian.Uint16(r.data) == 0 {
			c.size = binary.BigEndian.Uint64(r.data[2:])
			c.tflags = binary.BigEndian.Uint16(r.data[10:])
		}
	}
}

// open connects and negotiates, with structured replies and
// base:allocation when structured is set.
func (e *env) open(t testing.TB, name string, structured bool) *client {
	t.Helper()
	c := e.dial(t)
	c.hello(3)
	if structured {
		c.sendOpt(optStructured, nil)
		if r := c.readOptReply(); r.typ != repAck {
			t.Fatalf("structured reply: %#x", r.typ)
		}
		c.sendOpt(optSetMeta, metaData(name, "base:allocation"))
		c.readOptReplies()
		c.structured = true
	}
	c.goExport(name)
	return c
}

func (c *client) request(flags, cmd uint16, handle, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	b := make([]byte, 28, 28+len(payload))
	binary.BigEndian.PutUint32(b, magicRequest)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], cmd)
	binary.BigEndian.PutUint64(b[8:], handle)
	binary.BigEndian.PutUint64(b[16:], off)
	binary.BigEndian.PutUint32(b[24:], length)
	c.write(append(b, payload...))
}

// reply is one decoded reply: a simple reply or a single structured
// chunk.
type reply struct {
	handle  uint64
	errno   uint32
	simple  bool
	flags   uint16 // structured
	typ     uint16 // structured
	payload []byte // structured payload, or READ data for a simple reply
}

// readReply reads one reply; readLen is the data length that follows a
// successful simple READ reply (0 otherwise).
func (c *client) readReply(readLen int) reply {
	c.t.Helper()
	b := c.read(4)
	switch binary.BigEndian.Uint32(b) {
	case magicSimple:
		h := c.read(12)
		r := reply{simple: true, errno: binary.BigEndian.Uint32(h), handle: binary.BigEndian.Uint64(h[4:])}
		if r.errno == 0 && readLen > 0 {
			r.payload = c.read(readLen)
		}
		return r
	case magicStruct:
		h := c.read(16)
		r := reply{flags: binary.BigEndian.Uint16(h), typ: binary.BigEndian.Uint16(h[2:]), handle: binary.BigEndian.Uint64(h[4:])}
		r.payload = c.read(int(binary.BigEndian.Uint32(h[12:])))
		if r.typ&(1<<15) != 0 {
			r.errno = binary.BigEndian.Uint32(r.payload)
		}
		return r
	default:
		c.t.Fatalf("reply magic %#x", binary.BigEndian.Uint32(b))
		return reply{}
	}
}

// do sends one request and reads its (single) reply.
func (c *client) do(flags, cmd uint16, off uint64, length uint32, payload []byte) reply {
	c.t.Helper()
	c.request(flags, cmd, 7, off, length, payload)
	n := 0
	if cmd == cmdRead {
		n = int(length)
	}
	r := c.readReply(n)
	if r.handle != 7 {
		c.t.Fatalf("reply handle %d, want 7", r.handle)
	}
	return r
}

// readData reads with either reply style and returns data and errno.
func (c *client) readData(off uint64, n uint32) ([]byte, uint32) {
	c.t.Helper()
	r := c.do(0, cmdRead, off, n, nil)
	if r.errno != 0 || r.simple {
		return r.payload, r.errno
	}
	if r.typ != 1 || r.flags&1 == 0 {
		c.t.Fatalf("structured read chunk type %d flags %#x", r.typ, r.flags)
	}
	if got := binary.BigEndian.Uint64(r.payload); got != off {
		c.t.Fatalf("chunk offset %d, want %d", got, off)
	}
	return r.payload[8:], 0
}

// expectClosed checks that the server closes the connection.
func (c *client) expectClosed() {
	c.t.Helper()
	c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, c.br)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		c.t.Fatalf("connection not closed by server")
	}
}

func netListenUnix(t testing.TB) (net.Listener, error) {
	return net.Listen("unix", filepath.Join(shortTempDir(t), "s"))
}
