// Package nbdclient is a small NBD client for import and export: fixed
// newstyle handshake, NBD_OPT_GO, simple replies only, and READ, WRITE,
// WRITE_ZEROES, FLUSH and DISC, one request at a time.
package nbdclient

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"sync"
	"time"
)

// Protocol constants, from the NBD protocol specification.
const (
	magicNBD       = 0x4e42444d41474943 // "NBDMAGIC"
	magicIHaveOpt  = 0x49484156454F5054 // "IHAVEOPT"
	magicOptReply  = 0x0003e889045565a9
	magicRequest   = 0x25609513
	magicSimple    = 0x67446698
	flagFixed      = 1 << 0
	flagNoZeroes   = 1 << 1
	optGo          = 7
	repAck         = 1
	repInfo        = 3
	repFlagError   = 1 << 31
	infoExport     = 0
	tflagReadOnly  = 1 << 1
	tflagSendZeroe = 1 << 6
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdWriteZeroes = 6
)

// ErrUnsupportedURI: the URI is not nbd://, nbds+ or nbd+unix:// as this
// client understands them.
var ErrUnsupportedURI = errors.New("nbdclient: unsupported URI")

// Conn is one NBD connection to one export. It is safe for concurrent use,
// though requests are sent one at a time.
type Conn struct {
	mu       sync.Mutex
	c        net.Conn
	r        *bufio.Reader
	w        *bufio.Writer
	size     int64
	flags    uint16
	handle   uint64
	hdr      [28]byte
	export   string
	brokenBy error
}

// Target is a parsed NBD URI.
type Target struct {
	Network, Addr, Export string
}

// ParseURI reads nbd://HOST[:PORT]/EXPORT and nbd+unix:///EXPORT?socket=PATH
// (the libnbd forms, without TLS).
func ParseURI(s string) (Target, error) {
	u, err := url.Parse(s)
	if err != nil {
		return Target{}, fmt.Errorf("%w: %q: %w", ErrUnsupportedURI, s, err)
	}
	export := strings.TrimPrefix(u.Path, "/")
	switch u.Scheme {
	case "nbd":
		host := u.Host
		if host == "" {
			return Target{}, fmt.Errorf("%w: %q has no host", ErrUnsupportedURI, s)
		}
		if u.Port() == "" {
			host = net.JoinHostPort(u.Hostname(), "10809")
		}
		return Target{Network: "tcp", Addr: host, Export: export}, nil
	case "nbd+unix":
		sock := u.Query().Get("socket")
		if sock == "" {
			return Target{}, fmt.Errorf("%w: %q needs ?socket=PATH", ErrUnsupportedURI, s)
		}
		return Target{Network: "unix", Addr: sock, Export: export}, nil
	}
	return Target{}, fmt.Errorf("%w: %q: use nbd:// or nbd+unix:// (TLS is not supported)", ErrUnsupportedURI, s)
}

// Dial connects to the export named in uri and negotiates with NBD_OPT_GO.
// The handshake is bounded by ctx and by 30 s.
func Dial(ctx context.Context, uri string) (*Conn, error) {
	t, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, t.Network, t.Addr)
	if err != nil {
		return nil, fmt.Errorf("nbdclient: %w", err)
	}
	c := &Conn{c: nc, r: bufio.NewReaderSize(nc, 1<<20), w: bufio.NewWriterSize(nc, 1<<20), export: t.Export}
	deadline := time.Now().Add(30 * time.Second)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	nc.SetDeadline(deadline)
	if err := c.handshake(); err != nil {
		nc.Close()
		return nil, fmt.Errorf("nbdclient: %s: %w", uri, err)
	}
	nc.SetDeadline(time.Time{})
	return c, nil
}

func (c *Conn) handshake() error {
	var b [18]byte
	if _, err := io.ReadFull(c.r, b[:18]); err != nil {
		return fmt.Errorf("greeting: %w", err)
	}
	if binary.BigEndian.Uint64(b[0:]) != magicNBD || binary.BigEndian.Uint64(b[8:]) != magicIHaveOpt {
		return errors.New("not a newstyle NBD server")
	}
	sflags := binary.BigEndian.Uint16(b[16:])
	if sflags&flagFixed == 0 {
		return errors.New("server does not speak fixed newstyle")
	}
	cflags := uint32(flagFixed)
	if sflags&flagNoZeroes != 0 {
		cflags |= flagNoZeroes
	}
	// NBD_OPT_GO: export name, then zero information requests.
	opt := make([]byte, 0, 32+len(c.export))
	opt = binary.BigEndian.AppendUint32(opt, cflags)
	opt = binary.BigEndian.AppendUint64(opt, magicIHaveOpt)
	opt = binary.BigEndian.AppendUint32(opt, optGo)
	opt = binary.BigEndian.AppendUint32(opt, uint32(4+len(c.export)+2))
	opt = binary.BigEndian.AppendUint32(opt, uint32(len(c.export)))
	opt = append(opt, c.export...)
	opt = binary.BigEndian.AppendUint16(opt, 0)
	if _, err := c.w.Write(opt); err != nil {
		return err
	}
	if err := c.w.Flush(); err != nil {
		return err
	}
	gotInfo := false
	for {
		var h [20]byte
		if _, err := io.ReadFull(c.r, h[:]); err != nil {
			return fmt.Errorf("option reply: %w", err)
		}
		if binary.BigEndian.Uint64(h[0:]) != magicOptReply {
			return errors.New("bad option reply magic")
		}
		typ, n := binary.BigEndian.Uint32(h[12:]), binary.BigEndian.Uint32(h[16:])
		if n > 64<<10 {
			return fmt.Errorf("option reply of %d bytes", n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(c.r, data); err != nil {
			return fmt.Errorf("option reply: %w", err)
		}
		switch {
		case typ&repFlagError != 0:
			return fmt.Errorf("export %q refused (NBD_REP error %#x): %s", c.export, typ, data)
		case typ == repInfo:
			if len(data) >= 12 && binary.BigEndian.Uint16(data) == infoExport {
				c.size = int64(binary.BigEndian.Uint64(data[2:]))
				c.flags = binary.BigEndian.Uint16(data[10:])
				gotInfo = true
			}
		case typ == repAck:
			if !gotInfo {
				return errors.New("server sent no NBD_INFO_EXPORT")
			}
			return nil
		}
	}
}

// Size is the export size in bytes.
func (c *Conn) Size() int64 { return c.size }

// ReadOnly reports whether the server refuses writes.
func (c *Conn) ReadOnly() bool { return c.flags&tflagReadOnly != 0 }

// Error is an NBD error reply: Errno is the NBD error code (EIO = 5, ...).
type Error struct {
	Op    string
	Off   int64
	Errno uint32
}

func (e *Error) Error() string {
	return fmt.Sprintf("nbdclient: %s at %d: server error %d", e.Op, e.Off, e.Errno)
}

// ReadAt fills p from off.
func (c *Conn) ReadAt(p []byte, off int64) (int, error) {
	if err := c.request(cmdRead, off, uint32(len(p)), nil, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt writes p at off.
func (c *Conn) WriteAt(p []byte, off int64) (int, error) {
	if err := c.request(cmdWrite, off, uint32(len(p)), p, nil); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Zero makes length bytes at off read as zeros: WRITE_ZEROES where the
// server has it, else a write of zeros.
func (c *Conn) Zero(off, length int64) error {
	if c.flags&tflagSendZeroe != 0 {
		for length > 0 {
			n := min(length, 1<<30)
			if err := c.request(cmdWriteZeroes, off, uint32(n), nil, nil); err != nil {
				return err
			}
			off, length = off+n, length-n
		}
		return nil
	}
	zero := make([]byte, min(length, 1<<20))
	for length > 0 {
		n := min(length, int64(len(zero)))
		if _, err := c.WriteAt(zero[:n], off); err != nil {
			return err
		}
		off, length = off+n, length-n
	}
	return nil
}

// Flush makes the writes so far durable.
func (c *Conn) Flush() error { return c.request(cmdFlush, 0, 0, nil, nil) }

// Close says goodbye with NBD_CMD_DISC and closes the connection.
func (c *Conn) Close() error {
	c.mu.Lock()
	if c.brokenBy == nil {
		c.putHeader(cmdDisc, 0, 0)
		c.w.Write(c.hdr[:])
		c.w.Flush()
	}
	c.mu.Unlock()
	return c.c.Close()
}

func (c *Conn) putHeader(cmd uint16, off int64, n uint32) {
	c.handle++
	h := c.hdr[:]
	binary.BigEndian.PutUint32(h[0:], magicRequest)
	binary.BigEndian.PutUint16(h[4:], 0)
	binary.BigEndian.PutUint16(h[6:], cmd)
	binary.BigEndian.PutUint64(h[8:], c.handle)
	binary.BigEndian.PutUint64(h[16:], uint64(off))
	binary.BigEndian.PutUint32(h[24:], n)
}

var opNames = map[uint16]string{cmdRead: "read", cmdWrite: "write", cmdFlush: "flush", cmdWriteZeroes: "write-zeroes"}

// request sends one command and reads its simple reply. An I/O or protocol
// failure breaks the connection for every later request.
func (c *Conn) request(cmd uint16, off int64, n uint32, payload, into []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.brokenBy != nil {
		return c.brokenBy
	}
	err := func() error {
		c.putHeader(cmd, off, n)
		if _, err := c.w.Write(c.hdr[:]); err != nil {
			return err
		}
		if payload != nil {
			if _, err := c.w.Write(payload); err != nil {
				return err
			}
		}
		if err := c.w.Flush(); err != nil {
			return err
		}
		var r [16]byte
		if _, err := io.ReadFull(c.r, r[:]); err != nil {
			return err
		}
		if binary.BigEndian.Uint32(r[0:]) != magicSimple {
			return errors.New("bad reply magic (structured replies are not supported)")
		}
		if binary.BigEndian.Uint64(r[8:]) != c.handle {
			return errors.New("reply to an unknown handle")
		}
		if e := binary.BigEndian.Uint32(r[4:]); e != 0 {
			return &Error{Op: opNames[cmd], Off: off, Errno: e}
		}
		if into != nil {
			if _, err := io.ReadFull(c.r, into); err != nil {
				return err
			}
		}
		return nil
	}()
	var ne *Error
	if err != nil && !errors.As(err, &ne) {
		c.brokenBy = fmt.Errorf("nbdclient: %s at %d: %w", opNames[cmd], off, err)
		return c.brokenBy
	}
	return err
}
