// Package nbd is a Network Block Device server (protocol: doc/proto.md in
// the NetworkBlockDevice/nbd repository). It knows nothing of what it
// serves: a Catalog names the exports and each export is a Backend.
//
// # Protocol
//
// Only fixed newstyle negotiation is offered, with NBD_FLAG_NO_ZEROES.
// Unknown client flags close the connection. Options: EXPORT_NAME, ABORT,
// LIST (name and description of every export), INFO and GO (INFO_EXPORT,
// INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE; block sizes are always
// sent), STRUCTURED_REPLY, and LIST_META_CONTEXT / SET_META_CONTEXT for
// the one context, base:allocation. Any other option gets ERR_UNSUP and
// negotiation continues; an unknown export gets ERR_UNKNOWN, or a closed
// connection after EXPORT_NAME. The whole negotiation, TLS handshake
// included, runs under Options.HandshakeTimeout. Extended headers are not
// supported.
//
// # TLS and access control
//
// NBD_OPT_STARTTLS is offered per Options.TLSMode: TLSOff answers it
// ERR_UNSUP; TLSOn serves plain and TLS clients; TLSRequire answers every
// other option (LIST included) with ERR_TLS_REQD and closes the
// connection on EXPORT_NAME until TLS is up. TLS is Go's crypto/tls, 1.3
// preferred and 1.2 the minimum, configured by Options.TLSConfig (whose
// GetConfigForClient lets certificates be reloaded without dropping
// connections; see nbd/tlsfiles). All option state negotiated before
// STARTTLS (structured replies, metadata contexts) is forgotten after it,
// and a client that sends bytes after STARTTLS before its reply is
// disconnected (no plaintext injection into the TLS session). After a
// soft disconnect (ABORT, DISC) the server sends close_notify.
//
// The Catalog sees who the client is through PeerFromContext: address,
// whether TLS is up and the verified client certificate. It grants or
// hides exports per peer (ErrUnknownExport for a denied export looks
// exactly like a missing one) and can grant read-only access by setting
// ReadOnly on the Export it returns.
//
// # Hostile clients
//
// Options.MaxConns and MaxConnsPerAddr close excess connections as soon
// as they are accepted; IdleTimeout closes connections with nothing in
// flight; until transmission starts a connection holds only small
// buffers (about 11 KiB of heap in all), and option data is read as it
// arrives, never allocated from the announced length. Refusals are
// counted in Stats and reported to Options.OnRefused.
//
// Commands: READ, WRITE, FLUSH, TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO),
// CACHE, BLOCK_STATUS and DISC. FUA is accepted on every command and is
// implemented as the operation followed by Backend.Flush. Every export
// advertises HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_CACHE and
// CAN_MULTI_CONN (Backend.Flush covers writes from every connection);
// writable exports add SEND_TRIM, SEND_WRITE_ZEROES and SEND_FAST_ZERO,
// read-only ones READ_ONLY; SEND_DF is added once structured replies are
// negotiated. With structured replies a READ is answered by one
// OFFSET_DATA chunk (or an error chunk), BLOCK_STATUS by one BLOCK_STATUS
// chunk, and other errors by an ERROR chunk; success for other commands
// is a simple reply.
//
// # Errors
//
// A bad request is answered with an error and the connection carries on:
// EINVAL for an unknown command or flag, a READ or WRITE over MaxPayload,
// or a READ, TRIM, WRITE_ZEROES, CACHE or BLOCK_STATUS past the end;
// ENOSPC for a WRITE past the end; EPERM for WRITE, TRIM or WRITE_ZEROES
// on a read-only export; ESHUTDOWN during Shutdown. A rejected WRITE's
// payload is read and discarded, up to 2*MaxPayload; a larger one closes
// the connection. Backend errors are mapped through one table from the
// wrapped syscall.Errno (EPERM/EROFS, EIO, ENOMEM, EINVAL,
// ENOSPC/EDQUOT/EFBIG, EOVERFLOW, ENOTSUP, ESHUTDOWN; anything else is
// EIO) and the real error is logged at debug level. The connection is
// closed on a bad request magic, EOF inside a request, a socket write
// error, or a panic (recovered and logged with its stack; other
// connections are unaffected).
//
// # Concurrency
//
// Each connection runs one reader goroutine, Options.Workers worker
// goroutines and one writer goroutine. The reader validates a request,
// reads a WRITE payload into a pooled buffer (power-of-two classes from
// 4 KiB to MaxPayload, sync.Pool of *[]byte), and queues it; at most
// Options.MaxInflightRequests requests and Options.MaxInflightBytes
// payload bytes are in flight per connection, and at most
// Options.MaxInflightBytesTotal payload bytes across all connections; the
// reader stops reading while any is full (a connection holding nothing is
// always admitted one request). Workers call the Backend with the
// connection's context, which is cancelled when the connection is closed
// or the server force-closed. A READ's data is complete before its reply
// is queued, so no success header is ever followed by a failure. A WRITE
// payload is never read after Backend.WriteAt has been called, so a
// backend may use it as scratch space. The
// writer sends replies in completion order (not request order) and
// flushes whenever its queue is empty. In steady state the request path
// does not allocate.
//
// Where the export's Backend is a NoWaitBackend and the connection is not
// TLS, the reader first tries a READ or WRITE without FUA through its Try
// method, which completes the request only if nothing would make it wait,
// and then writes the reply itself, sharing the socket's bufio.Writer with
// the writer under a mutex. That saves the two goroutine hand-offs, which
// on a busy machine cost as much as a 4 KiB request's own work, and keeps a
// large payload in one core's cache from the socket through the backend.
// Such requests of one connection are served one after another; the
// workers serve the rest concurrently. The reader flushes its replies before anything that
// may block it: reading a request that is not yet buffered, or waiting
// for a request slot or for payload bytes. A request the backend declines
// goes to the workers as any other. Over TLS the reader gets requests a
// record at a time and would seal many small records; there the workers
// and the writer serve every request.
//
// # Shutdown
//
// Server.Shutdown closes the listeners, closes connections that are still
// negotiating or idle, answers new requests with ESHUTDOWN, waits for
// in-flight requests and closes each connection as it drains; when its
// context ends first it force-closes the rest. Server.Close force-closes
// at once. Serve then returns ErrServerClosed.
package nbd
