package nbd_test

import (
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/cryptnbd/cryptnbd/nbd"
	"github.com/cryptnbd/cryptnbd/nbd/nbdtest"
)

// BenchmarkRequest measures the request path: a pipelined Go client over a
// Unix socket against a Null backend, 16 requests in flight; the "nowait"
// cases against a NoWaitNull, whose requests the reader serves itself. Neither side allocates per request in steady state, so allocs/op
// should be 0.
func BenchmarkRequest(b *testing.B) {
	cases := []struct {
		name       string
		cmd        uint16
		size       int
		structured bool
		tls        bool // over TLS (STARTTLS)
		idle       bool // with Options.IdleTimeout set
		nowait     bool // against a NoWaitBackend
	}{
		{"read/4KiB", cmdRead, 4 << 10, false, false, false, false},
		{"read/1MiB", cmdRead, 1 << 20, false, false, false, false},
		{"read-structured/4KiB", cmdRead, 4 << 10, true, false, false, false},
		{"write/4KiB", cmdWrite, 4 << 10, false, false, false, false},
		{"write/1MiB", cmdWrite, 1 << 20, false, false, false, false},
		{"flush", cmdFlush, 0, false, false, false, false},
		{"read-idle-timeout/4KiB", cmdRead, 4 << 10, false, false, true, false},
		{"read-tls/4KiB", cmdRead, 4 << 10, false, true, false, false},
		{"read-tls/1MiB", cmdRead, 1 << 20, false, true, false, false},
		{"write-tls/4KiB", cmdWrite, 4 << 10, false, true, false, false},
		{"write-tls/1MiB", cmdWrite, 1 << 20, false, true, false, false},
		{"read-nowait/4KiB", cmdRead, 4 << 10, false, false, false, true},
		{"read-nowait-structured/4KiB", cmdRead, 4 << 10, true, false, false, true},
		{"read-nowait/1MiB", cmdRead, 1 << 20, false, false, false, true},
		{"write-nowait/4KiB", cmdWrite, 4 << 10, false, false, false, true},
		{"write-nowait/1MiB", cmdWrite, 1 << 20, false, false, false, true},
		{"read-nowait-tls/4KiB", cmdRead, 4 << 10, false, true, false, true},
	}
	pki := newPKI(b)
	for _, bc := range cases {
		b.Run(bc.name, func(b *testing.B) {
			cat := nbdtest.NewCatalog()
			var be nbd.Backend = nbdtest.Null{SizeBytes: 1 << 30}
			if bc.nowait {
				be = nbdtest.NoWaitNull{Null: nbdtest.Null{SizeBytes: 1 << 30}}
			}
			cat.Add(nbd.ExportInfo{Name: "null"}, be)
			e := &env{cat: cat}
			o := nbd.Options{}
			if bc.idle {
				o.IdleTimeout = time.Minute
			}
			if bc.tls {
				o.TLSMode, o.TLSConfig = nbd.TLSRequire, serverCreds(b, pki, true).Config()
			}
			e.start(b, o)
			c := e.dial(b)
			c.hello(3)
			if bc.tls {
				c.startTLS(clientConf(b, pki))
			}
			c.structured = bc.structured
			if bc.structured {
				c.sendOpt(optStructured, nil)
				c.readOptReply()
			}
			c.goExport("null")
			benchPipeline(b, c.nc, bc.cmd, bc.size, bc.structured)
		})
	}
}

func benchPipeline(b *testing.B, nc net.Conn, cmd uint16, size int, structured bool) {
	const depth = 16
	req := make([]byte, 28+size)
	if cmd != cmdWrite {
		req = req[:28]
	}
	binary.BigEndian.PutUint32(req, magicRequest)
	binary.BigEndian.PutUint16(req[6:], cmd)
	if cmd != cmdFlush {
		binary.BigEndian.PutUint32(req[24:], uint32(size))
	}
	replyLen := 16
	if cmd == cmdRead {
		replyLen += size
		if structured {
			replyLen += 4 + 8 // chunk header is 20 bytes, plus the offset
		}
	}
	window := make(chan struct{}, depth)
	readErr := make(chan error, 1)
	reply := make([]byte, replyLen)
	if size > 0 {
		b.SetBytes(int64(size))
	}
	b.ReportAllocs()
	b.ResetTimer()
	go func() {
		for range b.N {
			if _, err := io.ReadFull(nc, reply); err != nil {
				readErr <- err
				return
			}
			if binary.BigEndian.Uint32(reply[4:]) != 0 && !structured {
				readErr <- io.ErrUnexpectedEOF
				return
			}
			<-window
		}
		readErr <- nil
	}()
	for range b.N {
		window <- struct{}{}
		if _, err := nc.Write(req); err != nil {
			b.Fatalf("write: %v", err)
		}
	}
	if err := <-readErr; err != nil {
		b.Fatalf("read replies: %v", err)
	}
	b.StopTimer()
}
