package nbd_test

import (
	"encoding/binary"
	"strings"
	"testing"
	"time"

	"github.com/cryptnbd/cryptnbd/nbd"
)

func TestHandshakeList(t *testing.T) {
	e := newEnv(t, nbd.Options{})
	c := e.dial(t)
	c.hello(3)
	c.sendOpt(optList, nil)
	rs := c.readOptReplies()
	var got []string
	for _, r := range rs[:len(rs)-1] {
		if r.typ != repServer {
			t.Fatalf("reply type %#x, want SERVER", r.typ)
		}
		n := binary.BigEndian.Uint32(r.data)
		got = append(got, string(r.data[4:4+n])+"="+string(r.data[4+n:]))
	}
	if want := "disk=test disk,ro=read-only disk"; strings.Join(got, ",") != want {
		t.Errorf("list = %q, want %q", strings.Join(got, ","), want)
	}
	if rs[len(rs)-1].typ != repAck {
		t.Errorf("final reply %#x, want ACK", rs[len(rs)-1].typ)
	}
	// LIST with data is invalid, and negotiation continues.
	c.sendOpt(optList, []byte("x"))
	if r := c.readOptReply(); r.typ != repErrInvalid {
		t.Errorf("LIST with data: %#x, want ERR_INVALID", r.typ)
	}
	c.goExport("disk")
}

func TestHandshakeInfoGo(t *testing.T) {
	e := newEnv(t, nbd.Options{})
	c := e.dial(t)
	c.hello(3)
	c.sendOpt(optInfo, infoData("disk", 1, 2, 3))
	rs := c.readOptReplies()
	infos := map[uint16][]byte{}
	for _, r := range rs[:len(rs)-1] {
		if r.typ != repInfo || r.opt != optInfo {
			t.Fatalf("reply %#x to option %d, want INFO to INFO", r.typ, r.opt)
		}
		infos[binary.BigEndian.Uint16(r.data)] = r.data[2:]
	}
	if rs[len(rs)-1].typ != repAck {
		t.Fatalf("final %#x, want ACK", rs[len(rs)-1].typ)
	}
	exp := infos[0]
	if len(exp) != 10 {
		t.Fatalf("INFO_EXPORT length %d", len(exp))
	}
	if got := binary.BigEndian.Uint64(exp); got != diskSize {
		t.Errorf("size %d, want %d", got, diskSize)
	}
	want := uint16(tflagHasFlags | tflagFlush | tflagFUA | tflagTrim | tflagZeroes | tflagMultiConn | tflagCache | tflagFastZero)
	if got := binary.BigEndian.Uint16(exp[8:]); got != want {
		t.Errorf("flags %#x, want %#x", got, want)
	}
	if got := string(infos[1]); got != "disk" {
		t.Errorf("INFO_NAME %q", got)
	}
	if got := string(infos[2]); got != "test disk" {
		t.Errorf("INFO_DESCRIPTION %q", got)
	}
	bs := infos[3]
	if len(bs) != 12 {
		t.Fatalf("INFO_BLOCK_SIZE length %d", len(bs))
	}
	if lo, pref, hi := binary.BigEndian.Uint32(bs), binary.BigEndian.Uint32(bs[4:]), binary.BigEndian.Uint32(bs[8:]); lo != 512 || pref != 4096 || hi != 1<<20 {
		t.Errorf("block sizes %d/%d/%d, want 512/4096/1048576", lo, pref, hi)
	}
	if n := e.cat.Open(); n != 0 {
		t.Errorf("%d exports open after INFO, want 0", n)
	}
	// Structured replies change the flags (DF), then GO enters transmission.
	c.sendOpt(optStructured, nil)
	if r := c.readOptReply(); r.typ != repAck {
		t.Fatalf("STRUCTURED_REPLY %#x", r.typ)
	}
	c.goExport("disk")
	if c.tflags != want|tflagDF {
		t.Errorf("GO flags %#x, want %#x", c.tflags, want|tflagDF)
	}
	c.structured = true
	if _, errno := c.readData(0, 512); errno != 0 {
		t.Errorf("read after GO: errno %d", errno)
	}
}

func TestHandshakeReadOnlyFlags(t *testing.T) {
	e := newEnv(t, nbd.Options{})
	c := e.open(t, "ro", false)
	want := uint16(tflagHasFlags | tflagReadOnly | tflagFlush | tflagFUA | tflagMultiConn | tflagCache)
	if c.tflags != want {
		t.Errorf("flags %#x, want %#x", c.tflags, want)
	}
}

func TestHandshakeUnknownExportLeavesNoState(t *testing.T) {
	e := newEnv(t, nbd.Options{})
	c := e.dial(t)
	c.hello(3)
	for _, opt := range []uint32{optInfo, optGo} {
		c.sendOpt(opt, infoData("nope"))
		rs := c.readOptReplies()
		if len(rs) != 1 || rs[0].typ != repErrUnknown {
			t.Fatalf("option %d on unknown export: %+v, want one ERR_UNKNOWN", opt, rs)
		}
	}
	c.sendOpt(optStructured, nil)
	c.readOptReply()
	// A SET_META_CONTEXT that fails clears an earlier selection.
	c.sendOpt(optSetMeta, metaData("disk", "base:allocation"))
	c.readOptReplies()
	c.sendOpt(optSetMeta, metaData("nope", "base:allocation"))
	if rs := c.readOptReplies(); rs[0].typ != repErrUnknown {
		t.Fatalf("SET_META_CONTEXT unknown export: %#x", rs[0].typ)
	}
	if n := e.cat.Open(); n != 0 {
		t.Errorf("%d exports open, want 0", n)
	}
	c.goExport("disk")
	c.structured = true
	if r := c.do(0, cmdBlockStatus, 0, 4096, nil); r.errno != einval {
		t.Errorf("block status without a context: errno %d, want EINVAL", r.errno)
	}
}

func TestHandshakeUnknownOption(t *testing.T) {
	e := newEnv(t, nbd.Options{})
	c := e.dial(t)
	c.hello(3)
	for _, opt := range []uint32{99, 5 /* STARTTLS */, 11 /* EXTENDED_HEADERS */} {
		c.sendOpt(opt, []byte("some data"))
		if r := c.readOptReply(); r.typ != repErrUnsup || r.opt != opt {
			t.Errorf("option %d: reply %#x for %d, want ERR_UNSUP", opt, r.typ, r.opt)
		}
	}
	// An oversized unknown option is skipped too.
	c.sendOpt(98, make([]byte, 100<<10))
	if r := c.readOptReply(); r.typ&(1<<31) == 0 {
		t.Errorf("oversized option: %#x, want an error", r.typ)
	}
	c.goExport("disk")
}

func TestHandshakeMetaContext(t *testing.T) {
	e := newEnv(t, nbd.Options{})
	c := e.dial(t)
	c.hello(3)
	c.sendOpt(optListMeta, metaData("disk"))
	if r := c.readOptReply(); r.typ != repErrInvalid {
		t.Errorf("LIST_META_CONTEXT before structured: %#x, want ERR_INVALID", r.typ)
	}
	c.sendOpt(optStructured, []byte{1})
	if r := c.readOptReply(); r.typ != repErrInvalid {
		t.Errorf("STRUCTURED_REPLY with data: %#x, want ERR_INVALID", r.typ)
	}
	c.sendOpt(optStructured, nil)
	c.readOptReply()
	tests := []struct {
		name    string
		opt     uint32
		data    []byte
		want    []uint32
		context string
	}{
		{"list all", optListMeta, metaData("disk"), []uint32{repMeta, repAck}, "base:allocation"},
		{"list base:", optListMeta, metaData("disk", "base:"), []uint32{repMeta, repAck}, "base:allocation"},
		{"list other", optListMeta, metaData("disk", "qemu:dirty-bitmap:x"), []uint32{repAck}, ""},
		{"list malformed", optListMeta, []byte{0, 0, 0, 9}, []uint32{repErrInvalid}, ""},
		{"set other", optSetMeta, metaData("disk", "x-foo:bar"), []uint32{repAck}, ""},
		{"set unknown export", optSetMeta, metaData("zz", "base:allocation"), []uint32{repErrUnknown}, ""},
		{"set", optSetMeta, metaData("disk", "base:allocation"), []uint32{repMeta, repAck}, "base:allocation"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c.sendOpt(tt.opt, tt.data)
			rs := c.readOptReplies()
			var got []uint32
			for _, r := range rs {
				got = append(got, r.typ)
				if r.typ == repMeta {
					if s := string(r.data[4:]); s != tt.context {
						t.Errorf("context %q, want %q", s, tt.context)
					}
					if id := binary.BigEndian.Uint32(r.data); (tt.opt == optSetMeta) != (id != 0) {
						t.Errorf("context id %d", id)
					}
				}
			}
			if len(got) != len(tt.want) {
				t.Fatalf("replies %#x, want %#x", got, tt.want)
			}
			for i := range got {
				if got[i] != tt.want[i] {
					t.Errorf("replies %#x, want %#x", got, tt.want)
				}
			}
		})
	}
	c.goExport("disk")
	c.structured = true
	if r := c.do(0, cmdBlockStatus, 0, 4096, nil); r.errno != 0 || r.typ != 5 {
		t.Errorf("block status: errno %d type %d", r.errno, r.typ)
	}
}

func TestHandshakeMetaContextOtherExport(t *testing.T) {
	e := newEnv(t, nbd.Options{})
	c := e.dial(t)
	c.hello(3)
	c.sendOpt(optStructured, nil)
	c.readOptReply()
	c.sendOpt(optSetMeta, metaData("ro", "base:allocation"))
	c.readOptReplies()
	c.goExport("disk")
	c.structured = true
	if r := c.do(0, cmdBlockStatus, 0, 4096, nil); r.errno != einval {
		t.Errorf("block status with context for another export: errno %d, want EINVAL", r.errno)
	}
}

func TestHandshakeExportName(t *testing.T) {
	for _, tt := range []struct {
		name   string
		cflags uint32
		reply  int
	}{
		{"zeroes", 1, 134},
		{"no zeroes", 3, 10},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, nbd.Options{})
			c := e.dial(t)
			c.hello(tt.cflags)
			c.sendOpt(optExportName, []byte("disk"))
			b := c.read(tt.reply)
			if got := binary.BigEndian.Uint64(b); got != diskSize {
				t.Errorf("size %d", got)
			}
			if f := binary.BigEndian.Uint16(b[8:]); f&tflagHasFlags == 0 || f&tflagFlush == 0 {
				t.Errorf("flags %#x", f)
			}
			for _, z := range b[10:] {
				if z != 0 {
					t.Fatalf("reserved bytes not zero")
				}
			}
			// The next bytes are the transmission phase.
			c.do(0, cmdWrite, 0, 4, []byte("abcd"))
			if got, errno := c.readData(0, 4); errno != 0 || string(got) != "abcd" {
				t.Errorf("read back %q errno %d", got, errno)
			}
		})
	}
}

func TestHandshakeDefaultExport(t *testing.T) {
	e := newEnv(t, nbd.Options{})
	c := e.dial(t)
	c.hello(1)
	c.sendOpt(optExportName, nil)
	if b := c.read(134); binary.BigEndian.Uint64(b) != diskSize {
		t.Errorf("default export size %d", binary.BigEndian.Uint64(b))
	}
}

func TestHandshakeCloses(t *testing.T) {
	tests := []struct {
		name string
		run  func(c *client)
	}{
		{"unknown client flags", func(c *client) { c.hello(1 | 1<<5) }},
		{"export name unknown", func(c *client) { c.hello(3); c.sendOpt(optExportName, []byte("nope")) }},
		{"bad option magic", func(c *client) { c.hello(3); c.write(make([]byte, 16)) }},
		{"abort", func(c *client) {
			c.hello(3)
			c.sendOpt(optAbort, nil)
			if r := c.readOptReply(); r.typ != repAck {
				c.t.Errorf("ABORT reply %#x, want ACK", r.typ)
			}
		}},
		{"truncated option", func(c *client) {
			c.hello(3)
			c.write([]byte{0x49, 0x48, 0x41, 0x56, 0x45, 0x4F, 0x50, 0x54, 0, 0, 0, 7, 0, 0, 0, 40, 1, 2})
			c.nc.(interface{ CloseWrite() error }).CloseWrite()
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, nbd.Options{})
			c := e.dial(t)
			tt.run(c)
			c.expectClosed()
			e.waitReleased(t)
		})
	}
}

func TestHandshakeTimeout(t *testing.T) {
	e := newEnv(t, nbd.Options{HandshakeTimeout: 500 * time.Millisecond})
	c := e.dial(t)
	c.hello(3) // and then say nothing
	start := time.Now()
	c.expectClosed()
	if d := time.Since(start); d > 4*time.Second {
		t.Errorf("closed after %v", d)
	}
	// A connection that completes the handshake is not affected later.
	c2 := e.open(t, "disk", false)
	time.Sleep(700 * time.Millisecond)
	if _, errno := c2.readData(0, 512); errno != 0 {
		t.Errorf("read after handshake: errno %d", errno)
	}
}
