package nbd

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"
)

// maxOptionBytes is the largest option payload the server reads; larger
// ones are skipped and refused. Names and queries are at most 4096 bytes.
const maxOptionBytes = 64 << 10

var (
	errAbort              = errors.New("nbd: client sent NBD_OPT_ABORT")
	errUnknownClientFlags = errors.New("nbd: unknown client flags")
	errTLSRequired        = errors.New("nbd: NBD_OPT_EXPORT_NAME before TLS")
	errEarlyTLSData       = errors.New("nbd: client sent data after NBD_OPT_STARTTLS before its reply")
)

// handshake runs fixed newstyle negotiation under the handshake deadline.
// It returns nil with c.exp set when transmission should start.
func (c *conn) handshake() error {
	if err := c.nc.SetDeadline(time.Now().Add(c.s.opts.HandshakeTimeout)); err != nil {
		return fmt.Errorf("nbd: set handshake deadline: %w", err)
	}
	var b [18]byte
	binary.BigEndian.PutUint64(b[0:], magicInit)
	binary.BigEndian.PutUint64(b[8:], magicOpt)
	binary.BigEndian.PutUint16(b[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := c.bw.Write(b[:18]); err != nil {
		return err
	}
	if err := c.bw.Flush(); err != nil {
		return err
	}
	if _, err := io.ReadFull(c.br, b[:4]); err != nil {
		return fmt.Errorf("nbd: read client flags: %w", err)
	}
	cflags := binary.BigEndian.Uint32(b[:4])
	if cflags&^(clientFlagFixedNewstyle|clientFlagNoZeroes) != 0 {
		return errUnknownClientFlags
	}
	h := &handshake{c: c, noZeroes: cflags&clientFlagNoZeroes != 0}
	for {
		done, err := h.option()
		if err != nil {
			return err
		}
		if done {
			break
		}
	}
	if err := c.bw.Flush(); err != nil {
		return err
	}
	if err := c.nc.SetDeadline(time.Time{}); err != nil {
		return fmt.Errorf("nbd: clear handshake deadline: %w", err)
	}
	return nil
}

// handshake holds the negotiation state of one connection. Everything
// below noZeroes is option state, forgotten when TLS starts.
type handshake struct {
	c *conn
	// tlsRefused is set once a RefusedTLSRequired has been reported.
	tlsRefused bool
	noZeroes   bool
	structured bool
	// metaExport is the export the base:allocation context was selected
	// for; baseAlloc is whether it was.
	metaExport string
	baseAlloc  bool
}

// option reads and answers one option. done reports that transmission
// starts.
func (h *handshake) option() (done bool, err error) {
	c := h.c
	var hdr [16]byte
	if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
		return false, fmt.Errorf("nbd: read option: %w", err)
	}
	if binary.BigEndian.Uint64(hdr[0:]) != magicOpt {
		return false, errors.New("nbd: bad option magic")
	}
	opt := binary.BigEndian.Uint32(hdr[8:])
	n := binary.BigEndian.Uint32(hdr[12:])
	c.log.Debug("nbd: option", "opt", opt, "len", n)
	if n > maxOptionBytes {
		if opt == optExportName {
			return false, errors.New("nbd: export name too long")
		}
		if _, err := c.br.Discard(int(n)); err != nil {
			return false, fmt.Errorf("nbd: skip option: %w", err)
		}
		return false, h.reply(opt, repErrTooBig, []byte("option too long"))
	}
	// Read as the bytes arrive rather than allocating n up front, so a
	// client that announces a large option and then trickles holds
	// little memory.
	data, err := io.ReadAll(io.LimitReader(c.br, int64(n)))
	if err == nil && len(data) < int(n) {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		return false, fmt.Errorf("nbd: read option data: %w", err)
	}
	if c.isShutting() && opt != optAbort {
		return false, h.reply(opt, repErrShutdown, nil)
	}
	if c.s.opts.TLSMode == TLSRequire && c.tc == nil && opt != optStartTLS && opt != optAbort {
		if !h.tlsRefused {
			h.tlsRefused = true
			c.s.refuse(c.log, RefusedTLSRequired, c.peer(), nil)
		}
		if opt == optExportName {
			return false, errTLSRequired
		}
		return false, h.reply(opt, repErrTLSReqd, []byte("TLS required"))
	}
	switch opt {
	case optStartTLS:
		return false, h.startTLS(data)
	case optExportName:
		return true, h.exportName(string(data))
	case optAbort:
		h.reply(opt, repAck, nil)
		c.bw.Flush()
		return false, errAbort
	case optList:
		return false, h.list(data)
	case optInfo, optGo:
		return h.infoGo(opt, data)
	case optStructuredReply:
		if n != 0 {
			return false, h.reply(opt, repErrInvalid, []byte("structured reply takes no data"))
		}
		h.structured = true
		return false, h.reply(opt, repAck, nil)
	case optListMetaContext, optSetMetaContext:
		return false, h.metaContext(opt, data)
	default:
		return false, h.reply(opt, repErrUnsup, nil)
	}
}

// startTLS answers NBD_OPT_STARTTLS and, after an ACK, runs the TLS
// handshake and forgets every option negotiated before it.
func (h *handshake) startTLS(data []byte) error {
	c := h.c
	switch {
	case c.s.tls == nil:
		return h.reply(optStartTLS, repErrUnsup, []byte("TLS not configured"))
	case c.tc != nil:
		return h.reply(optStartTLS, repErrInvalid, []byte("TLS already started"))
	case len(data) != 0:
		return h.reply(optStartTLS, repErrInvalid, []byte("STARTTLS takes no data"))
	}
	if c.br.Buffered() != 0 {
		// Bytes the client sent before our reply would be taken as
		// coming from inside TLS: a plaintext injection. Hang up.
		c.s.refuse(c.log, RefusedTLSHandshake, c.peer(), errEarlyTLSData)
		return errEarlyTLSData
	}
	if err := h.reply(optStartTLS, repAck, nil); err != nil {
		return err
	}
	// The handshake deadline set on c.nc still bounds the TLS handshake.
	tc := tls.Server(c.nc, c.s.tls)
	if err := tc.HandshakeContext(c.ctx); err != nil {
		err = fmt.Errorf("nbd: TLS handshake: %w", err)
		c.s.refuse(c.log, RefusedTLSHandshake, c.peer(), err)
		return err
	}
	c.tc = tc
	c.br.Reset(tc)
	c.bw.Reset(tc)
	p := peerOf(c.nc, tc)
	c.ctx = context.WithValue(c.ctx, peerKey{}, p)
	st := tc.ConnectionState()
	if p.Certificate != nil {
		c.log.Debug("nbd: TLS started", "version", tls.VersionName(st.Version), "client", p.Certificate.Subject.String())
	} else {
		c.log.Debug("nbd: TLS started", "version", tls.VersionName(st.Version))
	}
	*h = handshake{c: c, noZeroes: h.noZeroes}
	return nil
}

// reply sends one option reply and flushes it.
func (h *handshake) reply(opt, typ uint32, data []byte) error {
	var b [20]byte
	binary.BigEndian.PutUint64(b[0:], magicOptReply)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], typ)
	binary.BigEndian.PutUint32(b[16:], uint32(len(data)))
	w := h.c.bw
	w.Write(b[:])
	w.Write(data)
	return w.Flush()
}

// transmissionFlags are the flags advertised for an export.
func (h *handshake) transmissionFlags(info *ExportInfo) uint16 {
	f := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendCache | tflagCanMultiConn)
	if info.ReadOnly {
		f |= tflagReadOnly
	} else {
		f |= tflagSendTrim | tflagSendWriteZeroes | tflagSendFastZero
	}
	if h.structured {
		f |= tflagSendDF
	}
	return f
}

// blockSizes returns the advertised minimum, preferred and maximum.
func blockSizes(info *ExportInfo) (lo, pref, hi uint32) {
	lo, pref, hi = info.MinBlock, info.PreferredBlock, info.MaxBlock
	if lo == 0 {
		lo = 1
	}
	if pref == 0 {
		pref = 4096
	}
	pref = max(pref, lo)
	if hi == 0 || hi > MaxPayload {
		hi = MaxPayload
	}
	hi = max(hi, pref)
	return lo, pref, hi
}

// enter commits to an export and the negotiated features.
func (h *handshake) enter(name string, exp *Export) {
	c := h.c
	c.exp = exp
	c.size = exp.Backend.Size()
	c.tflags = h.transmissionFlags(&exp.ExportInfo)
	c.structured = h.structured
	c.baseAlloc = h.baseAlloc && h.metaExport == name
}

func (h *handshake) exportName(name string) error {
	c := h.c
	exp, err := c.s.cat.Export(c.ctx, name)
	if err != nil {
		err = fmt.Errorf("nbd: export %q: %w", name, err)
		if errors.Is(err, ErrUnknownExport) {
			c.s.refuse(c.log, RefusedUnknownExport, c.peer(), err)
		}
		return err
	}
	h.enter(name, exp)
	var b [10 + 124]byte
	binary.BigEndian.PutUint64(b[0:], uint64(c.size))
	binary.BigEndian.PutUint16(b[8:], c.tflags)
	n := len(b)
	if h.noZeroes {
		n = 10
	}
	_, err = c.bw.Write(b[:n])
	return err
}

func (h *handshake) list(data []byte) error {
	c := h.c
	if len(data) != 0 {
		return h.reply(optList, repErrInvalid, []byte("list takes no data"))
	}
	infos, err := c.s.cat.Exports(c.ctx)
	if err != nil {
		c.log.Warn("nbd: listing exports failed", "err", err)
		return h.reply(optList, repErrPolicy, []byte("cannot list exports"))
	}
	for _, in := range infos {
		p := make([]byte, 4, 4+len(in.Name)+len(in.Description))
		binary.BigEndian.PutUint32(p, uint32(len(in.Name)))
		p = append(p, in.Name...)
		p = append(p, in.Description...)
		if err := h.reply(optList, repServer, p); err != nil {
			return err
		}
	}
	return h.reply(optList, repAck, nil)
}

// openExport asks the catalog for an export. When it fails, openExport
// sends the option error and returns a nil export, with the error from
// sending that reply.
func (h *handshake) openExport(opt uint32, name string) (*Export, error) {
	c := h.c
	exp, err := c.s.cat.Export(c.ctx, name)
	if err == nil {
		return exp, nil
	}
	if errors.Is(err, ErrUnknownExport) {
		c.s.refuse(c.log.With("export", name), RefusedUnknownExport, c.peer(), err)
		return nil, h.reply(opt, repErrUnknown, []byte("unknown export"))
	}
	c.log.Warn("nbd: opening export failed", "export", name, "err", err)
	return nil, h.reply(opt, repErrPolicy, []byte("export unavailable"))
}

func releaseExport(e *Export) {
	if e != nil && e.Release != nil {
		e.Release()
	}
}

func (h *handshake) infoGo(opt uint32, data []byte) (bool, error) {
	if len(data) < 6 {
		return false, h.reply(opt, repErrInvalid, []byte("short option"))
	}
	nameLen := binary.BigEndian.Uint32(data)
	if uint64(nameLen) > uint64(len(data)-6) {
		return false, h.reply(opt, repErrInvalid, []byte("bad name length"))
	}
	name := string(data[4 : 4+nameLen])
	rest := data[4+nameLen:]
	nreq := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*nreq {
		return false, h.reply(opt, repErrInvalid, []byte("bad information request count"))
	}
	var wantName, wantDesc bool
	for i := range nreq {
		switch binary.BigEndian.Uint16(rest[2*i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}
	exp, err := h.openExport(opt, name)
	if exp == nil {
		return false, err
	}
	info := &exp.ExportInfo
	var p [14]byte
	binary.BigEndian.PutUint16(p[0:], infoExport)
	binary.BigEndian.PutUint64(p[2:], uint64(exp.Backend.Size()))
	binary.BigEndian.PutUint16(p[10:], h.transmissionFlags(info))
	if err := h.reply(opt, repInfo, p[:12]); err != nil {
		releaseExport(exp)
		return false, err
	}
	if wantName {
		b := binary.BigEndian.AppendUint16(nil, infoName)
		if err := h.reply(opt, repInfo, append(b, info.Name...)); err != nil {
			releaseExport(exp)
			return false, err
		}
	}
	if wantDesc && info.Description != "" {
		b := binary.BigEndian.AppendUint16(nil, infoDescription)
		if err := h.reply(opt, repInfo, append(b, info.Description...)); err != nil {
			releaseExport(exp)
			return false, err
		}
	}
	lo, pref, hi := blockSizes(info)
	binary.BigEndian.PutUint16(p[0:], infoBlockSize)
	binary.BigEndian.PutUint32(p[2:], lo)
	binary.BigEndian.PutUint32(p[6:], pref)
	binary.BigEndian.PutUint32(p[10:], hi)
	if err := h.reply(opt, repInfo, p[:14]); err != nil {
		releaseExport(exp)
		return false, err
	}
	if opt == optInfo {
		// Release before the final reply, so a client that has it
		// knows the export is no longer held.
		releaseExport(exp)
		return false, h.reply(opt, repAck, nil)
	}
	if err := h.reply(opt, repAck, nil); err != nil {
		releaseExport(exp)
		return false, err
	}
	h.enter(name, exp)
	return true, nil
}

// metaContext answers NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT. The only context is base:allocation; a list
// query of "base:" also matches it.
func (h *handshake) metaContext(opt uint32, data []byte) error {
	set := opt == optSetMetaContext
	if set {
		// A SET replaces the selection, even when it fails.
		h.baseAlloc, h.metaExport = false, ""
	}
	if !h.structured {
		return h.reply(opt, repErrInvalid, []byte("structured replies not negotiated"))
	}
	name, queries, ok := parseMetaQuery(data)
	if !ok {
		return h.reply(opt, repErrInvalid, []byte("malformed meta context query"))
	}
	exp, err := h.openExport(opt, name)
	if exp == nil {
		return err
	}
	releaseExport(exp)
	match := len(queries) == 0 && !set
	for _, q := range queries {
		if q == metaBaseAllocation || (!set && q == "base:") {
			match = true
		}
	}
	if match {
		var id uint32
		if set {
			id = metaBaseAllocID
			h.baseAlloc, h.metaExport = true, name
		}
		p := binary.BigEndian.AppendUint32(nil, id)
		if err := h.reply(opt, repMetaContext, append(p, metaBaseAllocation...)); err != nil {
			return err
		}
	}
	return h.reply(opt, repAck, nil)
}

// parseMetaQuery splits meta context option data: export name, then a
// count of queries, each length-prefixed.
func parseMetaQuery(data []byte) (name string, queries []string, ok bool) {
	str := func() (string, bool) {
		if len(data) < 4 {
			return "", false
		}
		n := binary.BigEndian.Uint32(data)
		if uint64(n) > uint64(len(data)-4) {
			return "", false
		}
		s := string(data[4 : 4+n])
		data = data[4+n:]
		return s, true
	}
	if name, ok = str(); !ok || len(data) < 4 {
		return "", nil, false
	}
	count := binary.BigEndian.Uint32(data)
	data = data[4:]
	if uint64(count) > uint64(len(data)/4) {
		return "", nil, false
	}
	for range count {
		q, ok := str()
		if !ok {
			return "", nil, false
		}
		queries = append(queries, q)
	}
	return name, queries, len(data) == 0
}
