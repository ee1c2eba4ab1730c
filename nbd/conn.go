package nbd

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime/debug"
	"sync"
	"time"
)

const (
	ioBufferBytes = 64 << 10
	// maxSkipBytes is the largest oversized WRITE payload read and thrown
	// away so the connection can carry on; longer ones close it.
	maxSkipBytes = 2 * MaxPayload
	// maxExtents bounds the descriptors in one BLOCK_STATUS reply, so its
	// payload (4 + 8*n bytes) fits the smallest buffer class.
	maxExtents = 511
)

// conn is one client connection. The serve goroutine does the handshake
// and then reads requests; workers call the Backend; the writer sends
// replies. Where the backend can serve a request without waiting
// (NoWaitBackend), the reader does so itself and writes the reply too.
// Fields below the handshake results are owned as commented.
type conn struct {
	s      *Server
	nc     net.Conn
	addr   netip.Addr // key for Options.MaxConnsPerAddr
	id     uint64
	log    *slog.Logger
	cancel context.CancelFunc
	// ctx is cancelled when the connection is closed and carries the
	// Peer. The handshake replaces it (with a child) when TLS starts,
	// before any other goroutine reads it.
	ctx context.Context

	// tc is the TLS session after STARTTLS, nil before; set by the
	// handshake, then read-only.
	tc *tls.Conn
	// graceful is set by the reader when the client disconnected softly
	// (NBD_OPT_ABORT or NBD_CMD_DISC).
	graceful bool

	// br and bw are small during the handshake and replaced by
	// ioBufferBytes ones for transmission.
	br *bufio.Reader // reader goroutine (and handshake)
	bw *bufio.Writer // under wmu once transmission starts

	// Handshake results, read-only once transmission starts.
	exp        *Export
	nowait     NoWaitBackend // exp.Backend where it is one, else nil
	size       int64
	tflags     uint16
	structured bool
	baseAlloc  bool

	// Pipeline. free holds idle requests and, with nalloc, bounds the
	// requests in flight; work and replies never block since their
	// capacity is that bound.
	free       chan *request
	nalloc     int // reader only
	work       chan *request
	replies    chan *request
	workersWG  sync.WaitGroup
	writerDone chan struct{}
	bytes      byteSem
	hdr        [requestHeaderBytes]byte // reader only
	// unflushed counts the replies the reader wrote into bw and has not
	// yet flushed; it flushes them before anything that may block.
	unflushed int // reader only
	// wmu guards the reply side, which the reader and the writer share.
	wmu      sync.Mutex
	whdr     [32]byte // under wmu
	writeErr error    // under wmu

	// mu guards the shutdown state: inflight counts requests read but not
	// yet flushed to the socket, so Shutdown (and the idle watchdog) can
	// close a connection as soon as it has none.
	mu           sync.Mutex
	shutting     bool
	transmitting bool
	inflight     int
	reqs         uint64 // requests read, for the idle watchdog
}

// newConn sets up the state of an accepted connection; buffers are
// allocated by serve, once the connection is admitted.
func (s *Server) newConn(ctx context.Context, nc net.Conn) *conn {
	id := s.nextID.Add(1)
	c := &conn{
		s:    s,
		nc:   nc,
		addr: addrKey(nc.RemoteAddr()),
		id:   id,
		log:  s.log.With("conn", id),
	}
	ctx, c.cancel = context.WithCancel(ctx)
	c.ctx = context.WithValue(ctx, peerKey{}, peerOf(nc, nil))
	c.bytes.init(&s.held, s.opts.MaxInflightBytes)
	context.AfterFunc(ctx, func() {
		c.nc.Close()
		c.bytes.close()
	})
	return c
}

// stream is what the connection reads and writes after the handshake:
// the TLS session or the socket.
func (c *conn) stream() io.ReadWriter {
	if c.tc != nil {
		return c.tc
	}
	return c.nc
}

// startTransmission swaps the handshake's small buffers for full-size
// ones, keeping any request bytes the client already sent.
func (c *conn) startTransmission() {
	var src io.Reader = c.stream()
	if n := c.br.Buffered(); n > 0 {
		early, _ := c.br.Peek(n)
		src = io.MultiReader(bytes.NewReader(bytes.Clone(early)), src)
	}
	c.br = bufio.NewReaderSize(src, ioBufferBytes)
	c.bw = bufio.NewWriterSize(c.stream(), ioBufferBytes)
	// Not over TLS: the reader's reads come a record at a time, so it
	// would flush after each, sealing many small records, and it would
	// seal replies on the goroutine that opens requests. At 4 connections
	// × QD 128 of 4 KiB reads that cost a quarter of the rate.
	if c.tc == nil {
		c.nowait, _ = c.exp.Backend.(NoWaitBackend)
	}
}

// hardClose drops the connection: the socket is closed and the context
// of in-flight requests is cancelled.
func (c *conn) hardClose() { c.cancel() }

// beginShutdown marks the connection as shutting down and closes it at
// once if it is still in the handshake or has nothing in flight.
func (c *conn) beginShutdown() {
	c.mu.Lock()
	c.shutting = true
	idle := !c.transmitting || c.inflight == 0
	c.mu.Unlock()
	if idle {
		c.hardClose()
	}
}

func (c *conn) isShutting() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.shutting
}

// serve runs the connection until it ends. It is the reader goroutine.
func (c *conn) serve() {
	c.log.Debug("nbd: connection opened", "remote", c.nc.RemoteAddr().String())
	defer c.finish()
	defer func() {
		if p := recover(); p != nil {
			c.log.Error("nbd: panic in connection reader", "panic", p, "stack", string(debug.Stack()))
			c.hardClose()
		}
	}()
	c.br = bufio.NewReaderSize(c.nc, handshakeBufBytes)
	c.bw = bufio.NewWriterSize(c.nc, handshakeBufBytes)
	if err := c.handshake(); err != nil {
		c.graceful = errors.Is(err, errAbort)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			c.s.refuse(c.log, RefusedHandshakeTimeout, c.peer(), err)
		} else {
			c.log.Debug("nbd: handshake ended", "err", err)
		}
		return
	}
	c.startTransmission()
	c.startPipeline()
	// One line when a client starts using a disk and one when it stops;
	// handshake-only connections (probes, LIST) stay at debug.
	// A local logger: the pipeline's goroutines already read c.log.
	log := c.log.With("disk", c.exp.Name)
	started := time.Now()
	log.Info("nbd: connection opened", "remote", c.nc.RemoteAddr().String(), "tls", c.tc != nil, "readOnly", c.exp.ReadOnly)
	err := c.readLoop()
	if err == nil {
		c.graceful = true
	}
	defer func() {
		log.Info("nbd: connection closed", "duration", time.Since(started).Round(time.Millisecond).String(), "clean", c.graceful, "err", err)
	}()
}

// finish drains the pipeline, closes the socket and releases the export.
func (c *conn) finish() {
	if c.work != nil {
		c.flushInline()
		close(c.work)
		c.workersWG.Wait()
		close(c.replies)
		<-c.writerDone
	}
	if c.tc != nil && c.graceful && c.writeErr == nil && c.ctx.Err() == nil {
		// After a soft disconnect, say goodbye with close_notify as the
		// protocol asks; Close bounds the write to 5 seconds. Other
		// endings are hard disconnects, which must not wait on a
		// client that may not be reading.
		c.tc.Close()
	}
	c.hardClose()
	if c.exp != nil && c.exp.Release != nil {
		c.exp.Release()
	}
	c.s.untrackConn(c)
	c.log.Debug("nbd: connection closed")
}

func (c *conn) startPipeline() {
	n := c.s.opts.MaxInflightRequests
	c.free = make(chan *request, n)
	c.work = make(chan *request, n)
	c.replies = make(chan *request, n)
	c.writerDone = make(chan struct{})
	c.mu.Lock()
	c.transmitting = true
	shutting := c.shutting
	c.mu.Unlock()
	if shutting {
		c.hardClose()
	}
	for range c.s.opts.Workers {
		c.workersWG.Add(1)
		go c.worker()
	}
	go c.writer()
	if c.s.opts.IdleTimeout > 0 {
		c.watchIdle()
	}
}

// request is one transmission request. It moves reader → worker → writer
// → free list, with exactly one owner at a time.
type request struct {
	c      *conn
	handle uint64
	off    uint64
	length uint32
	cmd    uint16
	flags  uint16

	buf     *[]byte // WRITE payload or READ data; nil otherwise
	charged int64   // bytes held in conn.bytes
	errno   uint32  // NBD error to send, 0 for success
	cause   error   // the error behind errno, for the log

	ext       *[]byte // BLOCK_STATUS payload
	nExt      int
	extRemain int64
	extFn     func(length int64, hole bool) bool
}

func (r *request) reset() {
	r.buf, r.ext, r.cause = nil, nil, nil
	r.charged, r.errno, r.nExt, r.extRemain = 0, 0, 0, 0
}

// getRequest returns an idle request, waiting while the in-flight limit is
// reached. It returns nil if the connection is closed meanwhile.
func (c *conn) getRequest() *request {
	select {
	case r := <-c.free:
		return r
	default:
	}
	if c.nalloc < cap(c.free) {
		c.nalloc++
		r := &request{c: c}
		r.extFn = r.addExtent
		return r
	}
	c.flushInline()
	select {
	case r := <-c.free:
		return r
	case <-c.ctx.Done():
		return nil
	}
}

var errBadMagic = errors.New("nbd: bad request magic")

// readLoop reads requests until the client disconnects or breaks the
// protocol. It returns nil on NBD_CMD_DISC.
func (c *conn) readLoop() error {
	for {
		if c.br.Buffered() < requestHeaderBytes {
			// The next read may wait for the client, who may be waiting
			// for these replies.
			c.flushInline()
		}
		if _, err := io.ReadFull(c.br, c.hdr[:]); err != nil {
			return fmt.Errorf("nbd: read request: %w", err)
		}
		h := c.hdr[:]
		if binary.BigEndian.Uint32(h[0:]) != magicRequest {
			return errBadMagic
		}
		flags := binary.BigEndian.Uint16(h[4:])
		cmd := binary.BigEndian.Uint16(h[6:])
		if cmd == cmdDisc {
			return nil
		}
		r := c.getRequest()
		if r == nil {
			return net.ErrClosed
		}
		r.flags, r.cmd = flags, cmd
		r.handle = binary.BigEndian.Uint64(h[8:])
		r.off = binary.BigEndian.Uint64(h[16:])
		r.length = binary.BigEndian.Uint32(h[24:])

		c.mu.Lock()
		c.inflight++
		c.reqs++
		shutting := c.shutting
		c.mu.Unlock()

		errno := c.validate(r)
		if shutting && errno == 0 {
			errno = nbdESHUTDOWN
		}
		if cmd == cmdWrite {
			if errno != 0 || r.length > MaxPayload {
				if errno == 0 {
					errno = nbdEINVAL
				}
				if r.length > maxSkipBytes {
					c.log.Debug("nbd: write payload too large to skip", "len", r.length)
					return fmt.Errorf("nbd: write payload of %d bytes too large to skip", r.length)
				}
				if _, err := c.br.Discard(int(r.length)); err != nil {
					return fmt.Errorf("nbd: skip write payload: %w", err)
				}
			} else if r.length > 0 {
				if !c.chargeBuf(r) {
					return net.ErrClosed
				}
				if _, err := io.ReadFull(c.br, *r.buf); err != nil {
					return fmt.Errorf("nbd: read write payload: %w", err)
				}
			}
		} else if cmd == cmdRead && errno == 0 && r.length > 0 {
			if !c.chargeBuf(r) {
				return net.ErrClosed
			}
		}
		if errno != 0 {
			r.errno = errno
			c.logReqErr(r, nil)
			c.replies <- r
			continue
		}
		if c.tryInline(r) {
			continue
		}
		c.work <- r
	}
}

// tryInline serves r on the reader goroutine if it is a READ or WRITE
// that the backend can complete without waiting, writing its reply into
// bw; the reader flushes it before it next may block. It reports whether r
// was served.
//
// Large requests are tried too. Served by the goroutine that read the
// request, the payload stays in one core's cache from the socket through
// the cipher: on 2 cores shared with the client that took a 1 MiB READ from
// 0.67 to 0.52 s of server CPU per GiB and a WRITE from 0.56 to 0.37, where
// handing them to workers would spread one connection's cipher work over
// more cores (docs/performance.md). Clients that want more cores open more
// connections.
func (c *conn) tryInline(r *request) bool {
	if c.nowait == nil || r.buf == nil || r.flags&cmdFlagFUA != 0 ||
		(r.cmd != cmdRead && r.cmd != cmdWrite) {
		return false
	}
	if !c.tryDo(r) {
		return false
	}
	c.send(r)
	c.release(r)
	c.unflushed++
	return true
}

// tryDo calls the backend's Try method for r. A panic fails the request
// with EIO and closes the connection, as in handle.
func (c *conn) tryDo(r *request) (done bool) {
	defer func() {
		if p := recover(); p != nil {
			c.log.Error("nbd: panic in backend call", "op", cmdName(r.cmd), "panic", p, "stack", string(debug.Stack()))
			r.errno = nbdEIO
			c.hardClose()
			done = true
		}
	}()
	var err error
	if r.cmd == cmdRead {
		done, err = c.nowait.TryReadAt(c.ctx, *r.buf, int64(r.off))
	} else {
		done, err = c.nowait.TryWriteAt(c.ctx, *r.buf, int64(r.off))
	}
	if done && err != nil {
		r.errno = nbdErrno(err)
		c.logReqErr(r, err)
	}
	return done
}

// flushInline sends the replies the reader wrote, if any.
func (c *conn) flushInline() {
	if c.unflushed == 0 {
		return
	}
	c.flush(c.unflushed)
	c.unflushed = 0
}

// watchIdle closes the connection once it has had nothing in flight and
// read no request for Options.IdleTimeout. It checks four times per
// period from a timer rather than with read deadlines, so the request
// path pays nothing for it; a connection is closed between 1 and 1.25
// periods after it went idle.
func (c *conn) watchIdle() {
	idle := c.s.opts.IdleTimeout
	tick := max(idle/4, time.Millisecond)
	var seen uint64
	last := time.Now()
	var t *time.Timer
	ready := make(chan struct{}) // t is set
	t = time.AfterFunc(tick, func() {
		<-ready
		c.mu.Lock()
		busy, reqs := c.inflight > 0, c.reqs
		c.mu.Unlock()
		now := time.Now()
		if busy || reqs != seen {
			seen, last = reqs, now
		} else if now.Sub(last) >= idle {
			c.s.idleClosed.Add(1)
			c.log.Debug("nbd: closing idle connection", "idle", idle)
			c.hardClose()
			return
		}
		if c.ctx.Err() == nil {
			t.Reset(tick)
		}
	})
	close(ready)
	context.AfterFunc(c.ctx, func() { t.Stop() })
}

// chargeBuf waits for room in the in-flight byte budget and gives r a
// buffer of r.length bytes.
func (c *conn) chargeBuf(r *request) bool {
	n := int64(r.length)
	if !c.bytes.acquire(n, false) {
		c.flushInline()
		if !c.bytes.acquire(n, true) {
			return false
		}
	}
	r.charged = n
	r.buf = c.s.bufs.get(int(r.length))
	return true
}

// validate checks a request against the export and the negotiated
// features, returning the NBD error for an invalid one.
func (c *conn) validate(r *request) uint32 {
	const known = cmdFlagFUA | cmdFlagNoHole | cmdFlagDF | cmdFlagReqOne | cmdFlagFastZero
	f := r.flags
	switch {
	case f&^known != 0,
		f&(cmdFlagNoHole|cmdFlagFastZero) != 0 && r.cmd != cmdWriteZeroes,
		f&cmdFlagDF != 0 && (r.cmd != cmdRead || !c.structured),
		f&cmdFlagReqOne != 0 && r.cmd != cmdBlockStatus:
		return nbdEINVAL
	}
	inRange := r.off <= uint64(c.size) && uint64(r.length) <= uint64(c.size)-r.off
	switch r.cmd {
	case cmdRead, cmdCache:
		if !inRange || (r.cmd == cmdRead && r.length > MaxPayload) {
			return nbdEINVAL
		}
	case cmdWrite, cmdTrim, cmdWriteZeroes:
		if c.exp.ReadOnly {
			return nbdEPERM
		}
		if r.cmd == cmdWrite && r.length > MaxPayload {
			return nbdEINVAL
		}
		if !inRange {
			if r.cmd == cmdWrite {
				return nbdENOSPC
			}
			return nbdEINVAL
		}
	case cmdFlush:
		if r.off != 0 || r.length != 0 {
			return nbdEINVAL
		}
	case cmdBlockStatus:
		if !c.structured || !c.baseAlloc || r.length == 0 || !inRange {
			return nbdEINVAL
		}
	default:
		return nbdEINVAL
	}
	return 0
}

var cmdNames = [...]string{"read", "write", "disc", "flush", "trim", "cache", "write_zeroes", "block_status"}

func cmdName(cmd uint16) string {
	if int(cmd) < len(cmdNames) {
		return cmdNames[cmd]
	}
	return "unknown"
}

func (c *conn) logReqErr(r *request, err error) {
	if !c.log.Enabled(c.ctx, slog.LevelDebug) {
		return
	}
	c.log.Debug("nbd: request failed", "op", cmdName(r.cmd), "handle", r.handle,
		"off", r.off, "len", r.length, "flags", r.flags, "nbd_errno", r.errno, "err", err)
}

// worker calls the Backend for requests until the work queue is closed.
func (c *conn) worker() {
	defer c.workersWG.Done()
	for r := range c.work {
		c.handle(r)
		c.replies <- r
	}
}

// handle runs one request against the Backend. A panic fails the request
// with EIO and closes the connection.
func (c *conn) handle(r *request) {
	defer func() {
		if p := recover(); p != nil {
			c.log.Error("nbd: panic in backend call", "op", cmdName(r.cmd), "panic", p, "stack", string(debug.Stack()))
			r.errno = nbdEIO
			c.hardClose()
		}
	}()
	err := c.do(r)
	if err != nil {
		r.errno = nbdErrno(err)
		c.logReqErr(r, err)
	}
}

func (c *conn) do(r *request) error {
	be, ctx := c.exp.Backend, c.ctx
	off, n := int64(r.off), int64(r.length)
	var err error
	switch r.cmd {
	case cmdRead:
		if r.buf != nil {
			err = be.ReadAt(ctx, *r.buf, off)
		}
		return err
	case cmdWrite:
		if r.buf != nil {
			err = be.WriteAt(ctx, *r.buf, off)
		}
	case cmdFlush:
		return be.Flush(ctx)
	case cmdTrim:
		if n > 0 {
			err = be.Trim(ctx, off, n)
		}
	case cmdWriteZeroes:
		if n > 0 {
			err = be.Zero(ctx, off, n, r.flags&cmdFlagNoHole != 0, r.flags&cmdFlagFastZero != 0)
		}
	case cmdCache:
		if n > 0 {
			err = be.Cache(ctx, off, n)
		}
		return err
	case cmdBlockStatus:
		return c.blockStatus(r)
	}
	if err == nil && r.flags&cmdFlagFUA != 0 {
		err = be.Flush(ctx)
	}
	return err
}

func (c *conn) blockStatus(r *request) error {
	r.ext = c.s.bufs.get(4 + 8*maxExtents)
	r.nExt = 0
	r.extRemain = int64(r.length)
	if err := c.exp.Backend.Extents(c.ctx, int64(r.off), int64(r.length), r.extFn); err != nil {
		return err
	}
	if r.nExt == 0 {
		// The backend said nothing: report the range as allocated data,
		// which is always safe.
		r.addExtent(int64(r.length), false)
	}
	return nil
}

// addExtent is the Extents callback; it appends or merges one descriptor.
func (r *request) addExtent(length int64, hole bool) bool {
	if length <= 0 || r.extRemain <= 0 {
		return r.extRemain > 0
	}
	length = min(length, r.extRemain)
	var status uint32
	if hole {
		status = stateHole | stateZero
	}
	b := *r.ext
	if r.nExt > 0 {
		p := b[4+8*(r.nExt-1):]
		if binary.BigEndian.Uint32(p[4:]) == status {
			// length ≤ extRemain ≤ request length, so the sum fits.
			binary.BigEndian.PutUint32(p, binary.BigEndian.Uint32(p)+uint32(length))
			r.extRemain -= length
			return r.extRemain > 0
		}
		if r.nExt == maxExtents || r.flags&cmdFlagReqOne != 0 {
			return false
		}
	}
	p := b[4+8*r.nExt:]
	binary.BigEndian.PutUint32(p, uint32(length))
	binary.BigEndian.PutUint32(p[4:], status)
	r.nExt++
	r.extRemain -= length
	return r.extRemain > 0
}

// writer sends replies until the reply queue is closed, flushing whenever
// the queue is empty. After a socket error it keeps draining the queue to
// return buffers, without writing.
func (c *conn) writer() {
	defer close(c.writerDone)
	pending := 0
	for {
		var r *request
		var ok bool
		select {
		case r, ok = <-c.replies:
		default:
			c.flush(pending)
			pending = 0
			r, ok = <-c.replies
		}
		if !ok {
			c.flush(pending)
			return
		}
		c.send(r)
		c.release(r)
		pending++
	}
}

// flush writes out buffered replies, then counts the n requests behind
// them as no longer in flight.
func (c *conn) flush(n int) {
	c.wmu.Lock()
	if c.writeErr == nil {
		if err := c.bw.Flush(); err != nil {
			c.failWrite(err)
		}
	}
	c.wmu.Unlock()
	if n == 0 {
		return
	}
	c.mu.Lock()
	c.inflight -= n
	idle := c.shutting && c.inflight == 0
	c.mu.Unlock()
	if idle {
		c.hardClose()
	}
}

// failWrite records a socket write error and closes the connection. The
// caller holds wmu.
func (c *conn) failWrite(err error) {
	c.writeErr = err
	c.log.Debug("nbd: write reply failed", "err", err)
	c.hardClose()
}

func (c *conn) release(r *request) {
	c.s.bufs.put(r.buf)
	c.s.bufs.put(r.ext)
	if r.charged > 0 {
		c.bytes.release(r.charged)
	}
	r.reset()
	c.free <- r
}

// send writes one reply into the buffered writer. A panic closes the
// connection.
func (c *conn) send(r *request) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.writeErr != nil {
		return
	}
	defer func() {
		if p := recover(); p != nil {
			c.log.Error("nbd: panic in connection writer", "panic", p, "stack", string(debug.Stack()))
			c.failWrite(errors.New("nbd: writer panic"))
		}
	}()
	var err error
	switch {
	case c.structured && r.errno != 0:
		err = c.sendChunk(r, chunkError, 6, nil, func(p []byte) {
			binary.BigEndian.PutUint32(p, r.errno)
			binary.BigEndian.PutUint16(p[4:], 0)
		})
	case c.structured && r.cmd == cmdRead && r.buf != nil:
		err = c.sendReadChunk(r)
	case c.structured && r.cmd == cmdRead:
		err = c.sendChunk(r, chunkNone, 0, nil, nil)
	case r.cmd == cmdBlockStatus && r.errno == 0:
		b := (*r.ext)[:4+8*r.nExt]
		binary.BigEndian.PutUint32(b, metaBaseAllocID)
		err = c.sendChunk(r, chunkBlockStatus, 0, b, nil)
	default:
		h := c.whdr[:16]
		binary.BigEndian.PutUint32(h, magicSimpleReply)
		binary.BigEndian.PutUint32(h[4:], r.errno)
		binary.BigEndian.PutUint64(h[8:], r.handle)
		_, err = c.bw.Write(h)
		if err == nil && r.cmd == cmdRead && r.errno == 0 && r.buf != nil {
			_, err = c.bw.Write(*r.buf)
		}
	}
	if err != nil {
		c.failWrite(err)
	}
}

// sendChunk writes one structured chunk flagged DONE: fixed bytes of
// header-side payload filled by fill, then payload.
func (c *conn) sendChunk(r *request, typ uint16, fixed int, payload []byte, fill func([]byte)) error {
	h := c.whdr[:structReplyHeaderSize+fixed]
	binary.BigEndian.PutUint32(h, magicStructReply)
	binary.BigEndian.PutUint16(h[4:], replyFlagDone)
	binary.BigEndian.PutUint16(h[6:], typ)
	binary.BigEndian.PutUint64(h[8:], r.handle)
	binary.BigEndian.PutUint32(h[16:], uint32(fixed+len(payload)))
	if fill != nil {
		fill(h[structReplyHeaderSize:])
	}
	if _, err := c.bw.Write(h); err != nil {
		return err
	}
	if len(payload) > 0 {
		_, err := c.bw.Write(payload)
		return err
	}
	return nil
}

func (c *conn) sendReadChunk(r *request) error {
	h := c.whdr[:structReplyHeaderSize+8]
	binary.BigEndian.PutUint32(h, magicStructReply)
	binary.BigEndian.PutUint16(h[4:], replyFlagDone)
	binary.BigEndian.PutUint16(h[6:], chunkOffsetData)
	binary.BigEndian.PutUint64(h[8:], r.handle)
	binary.BigEndian.PutUint32(h[16:], uint32(8+len(*r.buf)))
	binary.BigEndian.PutUint64(h[20:], r.off)
	if _, err := c.bw.Write(h); err != nil {
		return err
	}
	_, err := c.bw.Write(*r.buf)
	return err
}

// byteBudget bounds the payload bytes held by all the connections of one
// Server, and byteSem is one connection's share of it, with its own bound.
// A connection that holds nothing is always admitted one request, of any
// size up to MaxPayload, past both bounds: so a client that stops reading
// its replies stalls only itself, and any request can proceed.
type byteBudget struct {
	mu      sync.Mutex
	cond    sync.Cond
	used    int64
	max     int64 // 0: no bound across connections
	waiting int   // readers waiting in acquire
}

func (b *byteBudget) init(max int64) {
	b.max = max
	b.cond.L = &b.mu
}

// wake lets waiting readers recheck; call it without b.mu held, after
// bytes were released or a connection closed.
func (b *byteBudget) wake(waiting bool) {
	if waiting {
		b.cond.Broadcast()
	}
}

// byteSem is one connection's counting semaphore of bytes.
type byteSem struct {
	b      *byteBudget
	used   int64
	max    int64
	closed bool
}

func (s *byteSem) init(b *byteBudget, max int64) {
	s.b, s.max = b, max
}

// admits reports whether n more bytes may be taken now: they fit both
// bounds, or this connection holds nothing. The caller holds b.mu.
func (s *byteSem) admits(n int64) bool {
	return s.used == 0 || s.used+n <= s.max && (s.b.max == 0 || s.b.used+n <= s.b.max)
}

// acquire takes n bytes once they are admitted, waiting for that if wait
// is set; it returns false if they are not admitted without waiting, or
// once the connection is closed.
func (s *byteSem) acquire(n int64, wait bool) bool {
	b := s.b
	b.mu.Lock()
	defer b.mu.Unlock()
	for wait && !s.closed && !s.admits(n) {
		b.waiting++
		b.cond.Wait()
		b.waiting--
	}
	if s.closed || !s.admits(n) {
		return false
	}
	s.used += n
	b.used += n
	return true
}

func (s *byteSem) release(n int64) {
	b := s.b
	b.mu.Lock()
	s.used -= n
	b.used -= n
	waiting := b.waiting > 0
	b.mu.Unlock()
	b.wake(waiting)
}

func (s *byteSem) close() {
	b := s.b
	b.mu.Lock()
	s.closed = true
	waiting := b.waiting > 0
	b.mu.Unlock()
	b.wake(waiting)
}
