package nbd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// ErrUnknownExport is wrapped by Catalog.Export when the export does not
// exist. The client then gets NBD_REP_ERR_UNKNOWN (or, after
// NBD_OPT_EXPORT_NAME, a closed connection).
var ErrUnknownExport = errors.New("nbd: unknown export")

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("nbd: server closed")

// Catalog is how the server finds exports. The daemon implements it; the
// server calls it from many connection goroutines at once, so it must be
// safe for concurrent use.
type Catalog interface {
	// Export opens the named export for one connection; name "" is the
	// default export. It returns an error wrapping ErrUnknownExport when
	// the export does not exist. The server calls Release on the result
	// exactly once, when it no longer needs it (at once for NBD_OPT_INFO
	// and metadata queries, at the end of the connection otherwise).
	Export(ctx context.Context, name string) (*Export, error)
	// Exports lists what NBD_OPT_LIST shows.
	Exports(ctx context.Context) ([]ExportInfo, error)
}

// ExportInfo describes an export. Block sizes of 0 select the defaults:
// minimum 1, preferred 4096, maximum MaxPayload.
type ExportInfo struct {
	Name        string
	Description string
	ReadOnly    bool
	// MinBlock, PreferredBlock and MaxBlock are advertised to clients with
	// NBD_INFO_BLOCK_SIZE. The server does not enforce alignment: the
	// Backend must accept any offset and length.
	MinBlock, PreferredBlock, MaxBlock uint32
}

// Export is one export opened for one connection.
type Export struct {
	ExportInfo
	Backend Backend
	// Release, if not nil, is called once when the connection that got
	// the export is done with it, after the last Backend call returned.
	Release func()
}

// Options configure a Server. The zero value gives the defaults.
type Options struct {
	// Logger receives connection events and, at debug level, the real
	// errors behind error replies. Nil discards.
	Logger *slog.Logger
	// HandshakeTimeout bounds the whole option negotiation of a
	// connection. Default 10s.
	HandshakeTimeout time.Duration
	// MaxInflightRequests bounds the requests read but not yet answered on
	// one connection. Default 256.
	MaxInflightRequests int
	// MaxInflightBytes bounds the READ and WRITE payload bytes held by one
	// connection; the reader stops reading requests while it is full. A
	// single request is always admitted when nothing is in flight.
	// Default 256 MiB.
	MaxInflightBytes int64
	// Workers is the number of goroutines per connection calling the
	// Backend. Default 16.
	Workers int
}

func (o Options) withDefaults() Options {
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if o.HandshakeTimeout <= 0 {
		o.HandshakeTimeout = 10 * time.Second
	}
	if o.MaxInflightRequests <= 0 {
		o.MaxInflightRequests = 256
	}
	if o.MaxInflightBytes <= 0 {
		o.MaxInflightBytes = 256 << 20
	}
	if o.Workers <= 0 {
		o.Workers = 16
	}
	return o
}

// Server serves NBD exports from a Catalog. Its methods are safe for
// concurrent use. Each connection runs one reader, Options.Workers workers
// and one writer goroutine; they all exit when the connection ends.
type Server struct {
	cat  Catalog
	opts Options
	log  *slog.Logger

	nextID atomic.Uint64

	// mu guards listeners, conns and shutting; connWG.Add happens under
	// it, so no Add races with the Wait in Shutdown.
	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	shutting  bool
	connWG    sync.WaitGroup
}

// NewServer returns a server for the catalog. It does not listen: call
// Serve.
func NewServer(c Catalog, o Options) *Server {
	o = o.withDefaults()
	return &Server{
		cat:       c,
		opts:      o,
		log:       o.Logger,
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*conn]struct{}),
	}
}

// Serve accepts connections on l until l fails, ctx is done, or the server
// is shut down, and serves each in its own goroutines. It works with TCP
// (TCP_NODELAY is set) and Unix listeners, and closes l when it returns.
// After Shutdown or Close it returns ErrServerClosed; when ctx is done it
// returns ctx.Err() and the connections it accepted are closed. Temporary
// accept errors are retried with a backoff of up to one second.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	s.mu.Lock()
	if s.shutting {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()

	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			if s.isShutting() {
				return ErrServerClosed
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("nbd: accept: %w", err)
			}
			if backoff == 0 {
				backoff = 5 * time.Millisecond
			} else {
				backoff = min(2*backoff, time.Second)
			}
			s.log.Warn("nbd: accept failed, retrying", "err", err, "backoff", backoff)
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
			}
			continue
		}
		backoff = 0
		if tc, ok := nc.(*net.TCPConn); ok {
			tc.SetNoDelay(true)
		}
		c := s.newConn(ctx, nc)
		if !s.trackConn(c) {
			nc.Close()
			return ErrServerClosed
		}
		go c.serve()
	}
}

func (s *Server) isShutting() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.shutting
}

func (s *Server) trackConn(c *conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.shutting {
		return false
	}
	s.conns[c] = struct{}{}
	s.connWG.Add(1)
	return true
}

func (s *Server) untrackConn(c *conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.connWG.Done()
}

// beginShutdown stops accepting and tells every connection to drain.
func (s *Server) beginShutdown() {
	s.mu.Lock()
	s.shutting = true
	for l := range s.listeners {
		l.Close()
	}
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.beginShutdown()
	}
}

// Shutdown closes the listeners, closes connections still in the
// handshake or idle, answers requests that arrive from now on with
// ESHUTDOWN, and waits for the requests already in flight to be answered,
// closing each connection once it has none. If ctx is done first, it
// force-closes the remaining connections and returns ctx.Err().
func (s *Server) Shutdown(ctx context.Context) error {
	s.beginShutdown()
	done := make(chan struct{})
	go func() {
		s.connWG.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.closeConns()
		return ctx.Err()
	}
}

// Close closes the listeners and all connections at once; in-flight
// requests have their context cancelled and get no reply. It does not wait
// for the connection goroutines.
func (s *Server) Close() error {
	s.beginShutdown()
	s.closeConns()
	return nil
}

func (s *Server) closeConns() {
	s.mu.Lock()
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.hardClose()
	}
}
