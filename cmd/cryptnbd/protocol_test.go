package main_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

const demoSize = 64 << 20

// TestExportNameClient is the oldest client a fixed-newstyle server must
// serve: no OPT_GO, just NBD_OPT_EXPORT_NAME, then simple replies.
func TestExportNameClient(t *testing.T) {
	t.Parallel()
	need(t, "qemu-utils", "qemu-io")
	d := startDaemon(t, daemonOpts{Demo: "demo"})

	for i, noZeroes := range []bool{false, true} {
		t.Run(fmt.Sprintf("noZeroes=%v", noZeroes), func(t *testing.T) {
			r, hs := dialRaw(t, d.Sock)
			cf := uint32(flagFixedNewstyle)
			if noZeroes {
				if hs&flagNoZeroes == 0 {
					t.Skip("server does not offer NO_ZEROES")
				}
				cf |= flagNoZeroes
			}
			if err := r.clientFlags(cf); err != nil {
				t.Fatal(err)
			}
			size, tflags, err := r.exportName("demo", noZeroes)
			if err != nil {
				t.Fatalf("EXPORT_NAME: %v", err)
			}
			if size != demoSize {
				t.Errorf("size %d, want %d", size, demoSize)
			}
			for _, f := range []struct {
				bit  uint16
				name string
			}{{tflagHasFlags, "HAS_FLAGS"}, {tflagSendFlush, "SEND_FLUSH"}, {tflagSendFUA, "SEND_FUA"},
				{tflagSendTrim, "SEND_TRIM"}, {tflagSendZeroes, "SEND_WRITE_ZEROES"}, {tflagMultiConn, "CAN_MULTI_CONN"}} {
				if tflags&f.bit == 0 {
					t.Errorf("transmission flags %#x lack %s", tflags, f.name)
				}
			}
			if tflags&tflagReadOnly != 0 {
				t.Errorf("transmission flags %#x say read-only", tflags)
			}

			// An unaligned WRITE (FUA), read back, then FLUSH.
			off := uint64(1<<20 + 512 + i*(64<<10))
			data := make([]byte, 5000)
			fillRandom(data, uint64(i+7))
			if e, _ := r.roundTrip(t, cmdFlagFUA, cmdWrite, 0x1111, off, uint32(len(data)), data); e != 0 {
				t.Fatalf("WRITE: error %d", e)
			}
			e, got := r.roundTrip(t, 0, cmdRead, 0x2222, off-100, uint32(len(data)+200), nil)
			if e != 0 {
				t.Fatalf("READ: error %d", e)
			}
			if !bytes.Equal(got[100:100+len(data)], data) {
				t.Errorf("READ after WRITE: %s", firstDiff(got[100:100+len(data)], data))
			}
			if !bytes.Equal(got[:100], make([]byte, 100)) || !bytes.Equal(got[100+len(data):], make([]byte, 100)) {
				t.Errorf("bytes around the write changed: % x ... % x", got[:8], got[len(got)-8:])
			}
			pat := bytes.Repeat([]byte{0xc3}, 4096)
			if e, _ := r.roundTrip(t, 0, cmdWrite, 0x3333, off+8192, 4096, pat); e != 0 {
				t.Fatalf("WRITE: error %d", e)
			}
			if e, _ := r.roundTrip(t, 0, cmdFlush, 0x4444, 0, 0, nil); e != 0 {
				t.Fatalf("FLUSH: error %d", e)
			}
			if err := r.request(0, cmdDisc, 0x5555, 0, 0, nil); err != nil {
				t.Fatal(err)
			}
			r.expectClosed(t, "after NBD_CMD_DISC")
			// Another client sees the pattern.
			qemuIOOK(t, d.URI("demo"), fmt.Sprintf("read -P 0xc3 %d 4096", off+8192))
		})
	}

	t.Run("unknown export", func(t *testing.T) {
		r, _ := dialRaw(t, d.Sock)
		if err := r.clientFlags(flagFixedNewstyle); err != nil {
			t.Fatal(err)
		}
		if err := r.option(optExportName, []byte("no-such-disk")); err != nil {
			t.Fatal(err)
		}
		// EXPORT_NAME has no error reply: the server must disconnect.
		r.expectClosed(t, "EXPORT_NAME of a missing export")
	})
}

// TestMalformedInput sends what no well-behaved client sends and checks
// the answer the protocol prescribes, while a witness connection keeps
// working and other clients are still served afterwards.
func TestMalformedInput(t *testing.T) {
	t.Parallel()
	need(t, "libnbd-bin", "nbdinfo")
	d := startDaemon(t, daemonOpts{Demo: "demo"})

	// The witness: one long-lived connection, with known data at 0.
	witness, size := transmit(t, d.Sock, "demo")
	if size != demoSize {
		t.Fatalf("size %d, want %d", size, demoSize)
	}
	known := make([]byte, 64<<10)
	fillRandom(known, 42)
	if e, _ := witness.roundTrip(t, 0, cmdWrite, 1, 0, uint32(len(known)), known); e != 0 {
		t.Fatalf("witness WRITE: error %d", e)
	}
	handle := uint64(100)
	witnessOK := func(t *testing.T) {
		t.Helper()
		handle++
		e, got := witness.roundTrip(t, 0, cmdRead, handle, 0, uint32(len(known)), nil)
		if e != 0 || !bytes.Equal(got, known) {
			t.Errorf("witness connection: READ error %d, data %s", e, firstDiff(got, known))
		}
		r := runCmd(t, "nbdinfo", "--size", d.URI("demo"))
		if r.Code != 0 || strings.TrimSpace(r.Stdout) != strconv.Itoa(demoSize) {
			t.Errorf("a new client afterwards: nbdinfo --size: %v", r)
		}
	}

	// Requests answered with an error, after which the connection goes on.
	for _, tc := range []struct {
		name    string
		flags   uint16
		cmd     uint16
		off     uint64
		length  uint32
		payload bool
		want    uint32
	}{
		{name: "oversized READ", cmd: cmdRead, off: 0, length: 32<<20 + 4096, want: errEINVAL},
		{name: "READ past the end", cmd: cmdRead, off: demoSize - 512, length: 1024, want: errEINVAL},
		{name: "READ beyond the end", cmd: cmdRead, off: demoSize + 4096, length: 512, want: errEINVAL},
		{name: "READ at offset overflow", cmd: cmdRead, off: 1<<64 - 512, length: 1024, want: errEINVAL},
		{name: "WRITE past the end", cmd: cmdWrite, off: demoSize - 512, length: 1024, payload: true, want: errENOSPC},
		{name: "WRITE beyond the end", cmd: cmdWrite, off: demoSize, length: 4096, payload: true, want: errENOSPC},
		{name: "TRIM past the end", cmd: cmdTrim, off: demoSize - 4096, length: 8192, want: errEINVAL},
		{name: "unknown command", cmd: 99, off: 0, length: 512, want: errEINVAL},
		{name: "unknown command flag", flags: 1 << 12, cmd: cmdRead, off: 0, length: 512, want: errEINVAL},
		{name: "FLUSH with a length", cmd: cmdFlush, off: 0, length: 512, want: errEINVAL},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, _ := transmit(t, d.Sock, "demo")
			var payload []byte
			if tc.payload {
				payload = bytes.Repeat([]byte{0xee}, int(tc.length))
			}
			e, _ := r.roundTrip(t, tc.flags, tc.cmd, 7, tc.off, tc.length, payload)
			if e != tc.want {
				t.Errorf("error %d, want %d", e, tc.want)
			}
			// The connection is still in sync: a normal READ works.
			e, got := r.roundTrip(t, 0, cmdRead, 8, 0, 4096, nil)
			if e != 0 || !bytes.Equal(got, known[:4096]) {
				t.Errorf("READ after the rejected request: error %d, data %s", e, firstDiff(got, known[:4096]))
			}
			witnessOK(t)
		})
	}

	t.Run("bad request magic", func(t *testing.T) {
		r, _ := transmit(t, d.Sock, "demo")
		b := make([]byte, 28)
		binary.BigEndian.PutUint32(b, 0xdeadbeef)
		binary.BigEndian.PutUint32(b[24:], 512)
		if err := r.write(b); err != nil {
			t.Fatal(err)
		}
		r.expectClosed(t, "bad request magic")
		witnessOK(t)
	})

	t.Run("WRITE truncated mid-payload", func(t *testing.T) {
		r, _ := transmit(t, d.Sock, "demo")
		b := make([]byte, 28+1000)
		binary.BigEndian.PutUint32(b, requestMagic)
		binary.BigEndian.PutUint16(b[6:], cmdWrite)
		binary.BigEndian.PutUint64(b[8:], 9)
		binary.BigEndian.PutUint32(b[24:], 8192) // promises 8192, sends 1000
		for i := range b[28:] {
			b[28+i] = 0xee
		}
		if err := r.write(b); err != nil {
			t.Fatal(err)
		}
		if err := r.c.(*net.UnixConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		r.expectClosed(t, "EOF inside a WRITE payload")
		// Nothing of the partial write landed.
		witnessOK(t)
	})

	t.Run("unknown option", func(t *testing.T) {
		r, _ := dialRaw(t, d.Sock)
		if err := r.clientFlags(flagFixedNewstyle | flagNoZeroes); err != nil {
			t.Fatal(err)
		}
		const unknownOpt = 0x4242
		if err := r.option(unknownOpt, []byte("some option data")); err != nil {
			t.Fatal(err)
		}
		opt, typ, _, err := r.optReply()
		if err != nil {
			t.Fatalf("reply to unknown option: %v", err)
		}
		if opt != unknownOpt || typ != repErrUnsup {
			t.Errorf("reply to unknown option: opt %#x type %#x, want opt %#x NBD_REP_ERR_UNSUP", opt, typ, unknownOpt)
		}
		// The handshake continues.
		if _, _, err := r.optGo("demo"); err != nil {
			t.Fatalf("OPT_GO after an unknown option: %v", err)
		}
		e, got := r.roundTrip(t, 0, cmdRead, 1, 0, 4096, nil)
		if e != 0 || !bytes.Equal(got, known[:4096]) {
			t.Errorf("READ: error %d, data %s", e, firstDiff(got, known[:4096]))
		}
		witnessOK(t)
	})

	t.Run("unknown client flags", func(t *testing.T) {
		r, _ := dialRaw(t, d.Sock)
		if err := r.clientFlags(flagFixedNewstyle | 1<<20); err != nil {
			t.Fatal(err)
		}
		r.expectClosed(t, "unknown client flags")
		witnessOK(t)
	})

	t.Run("GO for a missing export", func(t *testing.T) {
		r, _ := dialRaw(t, d.Sock)
		if err := r.clientFlags(flagFixedNewstyle); err != nil {
			t.Fatal(err)
		}
		if _, _, err := r.optGo("no-such-disk"); err == nil {
			t.Fatal("OPT_GO of a missing export succeeded")
		}
		// The error is an option reply; the handshake goes on.
		if _, _, err := r.optGo("demo"); err != nil {
			t.Fatalf("OPT_GO after a failed one: %v", err)
		}
		witnessOK(t)
	})
}

// nbdshPython finds a python3 that has libnbd's binding: nbdsh runs
// "python3 -m nbd" from $PATH, and a python3 from pyenv or a virtualenv
// earlier in $PATH than the system one lacks it. It returns the directory
// to put first in $PATH, or skips the test.
func nbdshPython(t *testing.T) string {
	t.Helper()
	need(t, "libnbd-bin", "nbdsh")
	var dirs []string
	if p, err := exec.LookPath("python3"); err == nil {
		dirs = append(dirs, filepath.Dir(p))
	}
	dirs = append(dirs, "/usr/bin", "/bin")
	for _, dir := range dirs {
		py := filepath.Join(dir, "python3")
		cmd := exec.Command(py, "-c", "import nbd; nbd.NBD")
		cmd.Dir = t.TempDir() // not a directory with an nbd/ package in it
		if cmd.Run() == nil {
			return dir
		}
	}
	t.Skip("no python3 with libnbd's binding for nbdsh: apt-get install python3-libnbd")
	return ""
}

// nbdsh runs Python statements against an export with libnbd's shell.
func nbdsh(t *testing.T, uri string, stmts ...string) {
	t.Helper()
	pyDir := nbdshPython(t)
	args := []string{"-u", uri}
	for _, s := range stmts {
		args = append(args, "-c", s)
	}
	r := runIn(t, t.TempDir(), []string{"PATH=" + pyDir + ":" + os.Getenv("PATH")}, "nbdsh", args...)
	if r.Code != 0 {
		t.Fatalf("nbdsh %q: %v", stmts, r)
	}
}

// writeRefusedByServer sends a 4 KiB WRITE at offset 0 with libnbd's own
// checks off (qemu-io and libnbd's strict mode refuse to write to a
// READ_ONLY export without asking), so that the refusal has to come from
// the daemon; it must be EPERM and leave the data as it was.
func writeRefusedByServer(t *testing.T, uri string) {
	t.Helper()
	pyDir := nbdshPython(t)
	script := `
import errno
h.set_uri_allow_local_file(True)  # tls-certificates=DIR in nbds:// URIs
h.connect_uri(URI)
h.set_strict_mode(0)
before = h.pread(4096, 0)
try:
    h.pwrite(b"\x5a" * 4096, 0)
    raise SystemExit("a write to a read-only export succeeded")
except nbd.Error as ex:
    assert ex.errnum == errno.EPERM, ex
assert h.pread(4096, 0) == before, "the refused write changed the data"
print("refused")
`
	script = strings.ReplaceAll(script, "URI", strconv.Quote(uri))
	r := runIn(t, t.TempDir(), []string{"PATH=" + pyDir + ":" + os.Getenv("PATH")}, "nbdsh", "-c", script)
	if r.Code != 0 || !strings.Contains(r.Stdout, "refused") {
		t.Errorf("write to a read-only export at %s: %v", uri, r)
	}
}

// TestKill9AfterFlush: what a FLUSH acknowledged is on disk even if the
// daemon is killed the next instant.
func TestKill9AfterFlush(t *testing.T) {
	t.Parallel()
	need(t, "libnbd-bin", "nbdsh")
	need(t, "qemu-utils", "qemu-io")
	d := startDaemon(t, daemonOpts{Demo: "demo"})
	u := d.URI("demo")

	// Plain writes (no FUA) made durable only by the FLUSH.
	nbdsh(t, u,
		`h.pwrite(b"\xcd" * (4 << 20), 1 << 20)`,
		`h.pwrite(b"\x7e" * 1024, 7 * 4096 + 512)`, // libnbd enforces the 512-byte minimum block
		`h.pwrite(b"\x11" * 16384, 40 << 20)`,
		`h.zero(8192, 40 << 20)`,
		`h.flush()`)
	d.Kill()
	d.Start()
	qemuIOOK(t, u, "read -P 0xcd 1M 4M", "read -P 0x7e 29184 1024",
		"read -P 0 40M 8k", "read -P 0x11 40968k 8k")

	// Again with qemu in writeback mode (no FUA: only the flush makes the
	// writes stable), overwriting.
	if r := runCmd(t, "qemu-io", "-t", "writeback", "-f", "raw", u,
		"-c", "write -P 0x3c 2M 1M", "-c", "write -P 0x3d 6000 3000", "-c", "flush"); r.Code != 0 {
		t.Fatalf("qemu-io: %v", r)
	}
	d.Kill()
	d.Start()
	qemuIOOK(t, u, "read -P 0xcd 1M 1M", "read -P 0x3c 2M 1M", "read -P 0xcd 3M 2M",
		"read -P 0x3d 6000 3000", "read -P 0 9000 100")
}

// TestConcurrentSubSectorWrites is the byte-exact companion of the fio
// sub-sector test: eight raw connections each write their own 512-byte
// slot of the same 4096-byte sectors, pipelined, all at once; nbdcopy then
// reads the whole disk, which must hold every slot as written.
func TestConcurrentSubSectorWrites(t *testing.T) {
	t.Parallel()
	need(t, "libnbd-bin", "nbdcopy")
	const (
		slots   = 8
		sectors = 2048
		size    = 16 << 20
	)
	d := startDaemon(t, daemonOpts{Disks: []diskSpec{{Name: "rmw", Size: "16M", SectorSize: 4096}}})
	want := make([]byte, size)
	fillRandom(want[:sectors*4096], 77)

	conns := make([]*rawConn, slots)
	for i := range conns {
		conns[i], _ = transmit(t, d.Sock, "rmw")
	}
	errc := make(chan error, 2*slots)
	for i, r := range conns {
		go func() { // sender: every sector's slot i, in order, FUA on odd slots
			var flags uint16
			if i%2 == 1 {
				flags = cmdFlagFUA
			}
			for s := range sectors {
				off := s*4096 + i*512
				if err := r.request(flags, cmdWrite, uint64(s), uint64(off), 512, want[off:off+512]); err != nil {
					errc <- fmt.Errorf("conn %d: send: %w", i, err)
					return
				}
			}
			errc <- nil
		}()
		go func() { // receiver: one reply per request, no errors
			seen := make([]bool, sectors)
			for range sectors {
				errno, h, _, err := r.simpleReply(0)
				switch {
				case err != nil:
					errc <- fmt.Errorf("conn %d: reply: %w", i, err)
					return
				case errno != 0:
					errc <- fmt.Errorf("conn %d: write of sector %d failed with %d", i, h, errno)
					return
				case h >= sectors || seen[h]:
					errc <- fmt.Errorf("conn %d: unexpected handle %d", i, h)
					return
				}
				seen[h] = true
			}
			errc <- nil
		}()
	}
	for range 2 * slots {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	if e, _ := conns[0].roundTrip(t, 0, cmdFlush, 1<<40, 0, 0, nil); e != 0 {
		t.Fatalf("FLUSH: error %d", e)
	}

	out := filepath.Join(t.TempDir(), "disk.raw")
	mustRun(t, "nbdcopy", d.URI("rmw"), out)
	got := readFile(t, out)
	if len(got) != size {
		t.Fatalf("nbdcopy read %d bytes, want %d", len(got), size)
	}
	for s := range sectors {
		for i := range slots {
			off := s*4096 + i*512
			if !bytes.Equal(got[off:off+512], want[off:off+512]) {
				t.Fatalf("sector %d slot %d (written by connection %d) lost: %s", s, i, i, firstDiff(got[off:off+512], want[off:off+512]))
			}
		}
	}
	if !bytes.Equal(got, want) {
		t.Errorf("disk: %s", firstDiff(got, want))
	}
}

// TestGracefulShutdown: SIGTERM with clients connected. The daemon does
// not wait for idle clients: it exits 0 (within 45 s, d.Stop), and writes
// already acknowledged without a FLUSH are on disk afterwards. What a
// client sees while the server drains (ESHUTDOWN for new requests, idle
// connections closed) is tested where the daemon is still running, in
// nbd's TestShutdown*.
func TestGracefulShutdown(t *testing.T) {
	t.Parallel()
	need(t, "qemu-utils", "qemu-io")
	d := startDaemon(t, daemonOpts{Demo: "demo"})
	busy, _ := transmit(t, d.Sock, "demo")
	transmit(t, d.Sock, "demo") // an idle client
	data := bytes.Repeat([]byte{0x6b}, 1<<20)
	if e, _ := busy.roundTrip(t, 0, cmdWrite, 1, 3<<20, uint32(len(data)), data); e != 0 {
		t.Fatalf("WRITE: error %d", e)
	}
	d.Stop()
	d.Start()
	qemuIOOK(t, d.URI("demo"), "read -P 0x6b 3M 1M")
}
