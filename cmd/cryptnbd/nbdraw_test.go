package main_test

// A minimal raw NBD client, written from the protocol document, for the
// cases real clients never produce: EXPORT_NAME-only negotiation, malformed
// requests, and byte-exact concurrent sub-sector writes.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"
)

// Protocol constants from the NBD protocol document (doc/proto.md).
const (
	nbdMagic      = 0x4e42444d41474943 // "NBDMAGIC"
	nbdOptMagic   = 0x49484156454f5054 // "IHAVEOPT"
	nbdReplyMagic = 0x0003e889045565a9

	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	optExportName = 1
	optAbort      = 2
	optList       = 3
	optGo         = 7

	repAck        = 1
	repInfo       = 3
	repErrUnsup   = 1<<31 + 1
	repErrUnknown = 1<<31 + 6

	infoExport = 0

	tflagHasFlags   = 1 << 0
	tflagReadOnly   = 1 << 1
	tflagSendFlush  = 1 << 2
	tflagSendFUA    = 1 << 3
	tflagSendTrim   = 1 << 5
	tflagMultiConn  = 1 << 8
	tflagSendZeroes = 1 << 6

	requestMagic     = 0x25609513
	simpleReplyMagic = 0x67446698

	cmdRead    = 0
	cmdWrite   = 1
	cmdDisc    = 2
	cmdFlush   = 3
	cmdTrim    = 4
	cmdFlagFUA = 1 << 0

	errEINVAL = 22
	errENOSPC = 28
)

// rawConn is one raw NBD connection. Not safe for concurrent use, except
// that requests may be sent by one goroutine while replies are read by
// another.
type rawConn struct {
	c net.Conn
}

// dialRaw connects to a Unix socket and reads the server greeting,
// checking the fixed-newstyle magic and handshake flags.
func dialRaw(t *testing.T, sock string) (*rawConn, uint16) {
	t.Helper()
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", sock, err)
	}
	t.Cleanup(func() { c.Close() })
	// A generous deadline: a test that expects an answer never hangs.
	c.SetDeadline(time.Now().Add(60 * time.Second))
	r := &rawConn{c: c}
	var b [18]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		t.Fatalf("read greeting: %v", err)
	}
	if got := binary.BigEndian.Uint64(b[0:]); got != nbdMagic {
		t.Fatalf("greeting magic %#x, want NBDMAGIC", got)
	}
	if got := binary.BigEndian.Uint64(b[8:]); got != nbdOptMagic {
		t.Fatalf("greeting opt magic %#x, want IHAVEOPT (newstyle)", got)
	}
	hs := binary.BigEndian.Uint16(b[16:])
	if hs&flagFixedNewstyle == 0 {
		t.Fatalf("handshake flags %#x lack FIXED_NEWSTYLE", hs)
	}
	return r, hs
}

func (r *rawConn) write(b []byte) error {
	_, err := r.c.Write(b)
	return err
}

func (r *rawConn) clientFlags(f uint32) error {
	return r.write(binary.BigEndian.AppendUint32(nil, f))
}

func (r *rawConn) option(opt uint32, data []byte) error {
	b := binary.BigEndian.AppendUint64(nil, nbdOptMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return r.write(append(b, data...))
}

// optReply reads one option reply.
func (r *rawConn) optReply() (opt, typ uint32, data []byte, err error) {
	var h [20]byte
	if _, err := io.ReadFull(r.c, h[:]); err != nil {
		return 0, 0, nil, err
	}
	if m := binary.BigEndian.Uint64(h[0:]); m != nbdReplyMagic {
		return 0, 0, nil, fmt.Errorf("option reply magic %#x", m)
	}
	opt = binary.BigEndian.Uint32(h[8:])
	typ = binary.BigEndian.Uint32(h[12:])
	n := binary.BigEndian.Uint32(h[16:])
	if n > 1<<20 {
		return 0, 0, nil, fmt.Errorf("option reply of %d bytes", n)
	}
	data = make([]byte, n)
	_, err = io.ReadFull(r.c, data)
	return opt, typ, data, err
}

// exportName ends the handshake with NBD_OPT_EXPORT_NAME and reads the
// export size and transmission flags, plus 124 zero bytes unless NO_ZEROES
// was negotiated.
func (r *rawConn) exportName(name string, noZeroes bool) (size uint64, tflags uint16, err error) {
	if err := r.option(optExportName, []byte(name)); err != nil {
		return 0, 0, err
	}
	n := 10 + 124
	if noZeroes {
		n = 10
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r.c, b); err != nil {
		return 0, 0, fmt.Errorf("read export info: %w", err)
	}
	for i, v := range b[10:] {
		if v != 0 {
			return 0, 0, fmt.Errorf("padding byte %d is %#x, want 0", i, v)
		}
	}
	return binary.BigEndian.Uint64(b[0:]), binary.BigEndian.Uint16(b[8:]), nil
}

// optGo ends the handshake with NBD_OPT_GO (no info requests) and returns
// the export size and flags from NBD_INFO_EXPORT.
func (r *rawConn) optGo(name string) (size uint64, tflags uint16, err error) {
	d := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	d = append(d, name...)
	d = binary.BigEndian.AppendUint16(d, 0)
	if err := r.option(optGo, d); err != nil {
		return 0, 0, err
	}
	gotExport := false
	for {
		opt, typ, data, err := r.optReply()
		if err != nil {
			return 0, 0, err
		}
		if opt != optGo {
			return 0, 0, fmt.Errorf("reply for option %d, want GO", opt)
		}
		switch {
		case typ == repAck:
			if !gotExport {
				return 0, 0, errors.New("GO acked without NBD_INFO_EXPORT")
			}
			return size, tflags, nil
		case typ == repInfo:
			if len(data) >= 12 && binary.BigEndian.Uint16(data) == infoExport {
				size = binary.BigEndian.Uint64(data[2:])
				tflags = binary.BigEndian.Uint16(data[10:])
				gotExport = true
			}
		case typ&(1<<31) != 0:
			return 0, 0, fmt.Errorf("GO failed: reply type %#x %q", typ, data)
		}
	}
}

// request sends one transmission request, with payload for a WRITE.
func (r *rawConn) request(flags, cmd uint16, handle, off uint64, length uint32, payload []byte) error {
	b := make([]byte, 28, 28+len(payload))
	binary.BigEndian.PutUint32(b[0:], requestMagic)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], cmd)
	binary.BigEndian.PutUint64(b[8:], handle)
	binary.BigEndian.PutUint64(b[16:], off)
	binary.BigEndian.PutUint32(b[24:], length)
	return r.write(append(b, payload...))
}

// simpleReply reads a simple reply header, and for a successful READ of
// readLen bytes, its data.
func (r *rawConn) simpleReply(readLen int) (errno uint32, handle uint64, data []byte, err error) {
	var h [16]byte
	if _, err := io.ReadFull(r.c, h[:]); err != nil {
		return 0, 0, nil, err
	}
	if m := binary.BigEndian.Uint32(h[0:]); m != simpleReplyMagic {
		return 0, 0, nil, fmt.Errorf("reply magic %#x, want simple reply (no structured replies were negotiated)", m)
	}
	errno = binary.BigEndian.Uint32(h[4:])
	handle = binary.BigEndian.Uint64(h[8:])
	if errno == 0 && readLen > 0 {
		data = make([]byte, readLen)
		if _, err := io.ReadFull(r.c, data); err != nil {
			return errno, handle, nil, fmt.Errorf("read data: %w", err)
		}
	}
	return errno, handle, data, nil
}

// expectClosed checks that the server closes the connection: a read
// returns EOF (or a reset) rather than data or a timeout.
func (r *rawConn) expectClosed(t *testing.T, what string) {
	t.Helper()
	r.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var b [512]byte
	n, err := r.c.Read(b[:])
	var ne net.Error
	switch {
	case err == nil:
		t.Errorf("%s: server sent %d bytes (% x), want the connection closed", what, n, b[:min(n, 32)])
	case errors.As(err, &ne) && ne.Timeout():
		t.Errorf("%s: connection still open after 10s, want it closed", what)
	}
}

// transmit opens a connection and negotiates export name with OPT_GO,
// without structured replies, ready for requests.
func transmit(t *testing.T, sock, name string) (*rawConn, uint64) {
	t.Helper()
	r, _ := dialRaw(t, sock)
	if err := r.clientFlags(flagFixedNewstyle | flagNoZeroes); err != nil {
		t.Fatal(err)
	}
	size, _, err := r.optGo(name)
	if err != nil {
		t.Fatalf("OPT_GO %q: %v", name, err)
	}
	return r, size
}

// roundTrip sends one request and waits for its simple reply.
func (r *rawConn) roundTrip(t *testing.T, flags, cmd uint16, handle, off uint64, length uint32, payload []byte) (uint32, []byte) {
	t.Helper()
	if err := r.request(flags, cmd, handle, off, length, payload); err != nil {
		t.Fatalf("send %d: %v", cmd, err)
	}
	readLen := 0
	if cmd == cmdRead {
		readLen = int(length)
	}
	errno, h, data, err := r.simpleReply(readLen)
	if err != nil {
		t.Fatalf("reply to cmd %d: %v", cmd, err)
	}
	if h != handle {
		t.Fatalf("reply handle %#x, want %#x", h, handle)
	}
	return errno, data
}
