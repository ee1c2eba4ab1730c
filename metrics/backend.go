package metrics

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Backend is the NBD layer's view of a disk, declared here with exactly
// nbd.Backend's method set so that this package need not import nbd: a
// *cryptodisk.Disk is one, and what WrapBackend returns can be put in an
// nbd.Export as it is. See nbd.Backend for the contract.
type Backend interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
	WriteAt(ctx context.Context, p []byte, off int64) error
	Flush(ctx context.Context) error
	Trim(ctx context.Context, off, length int64) error
	Zero(ctx context.Context, off, length int64, noHole, fast bool) error
	Cache(ctx context.Context, off, length int64) error
	Extents(ctx context.Context, off, length int64, fn func(length int64, hole bool) bool) error
	Size() int64
}

// NoWaitBackend is nbd.NoWaitBackend's method set, declared here for the
// same reason as Backend.
type NoWaitBackend interface {
	Backend
	TryReadAt(ctx context.Context, p []byte, off int64) (bool, error)
	TryWriteAt(ctx context.Context, p []byte, off int64) (bool, error)
}

// op indexes the per-operation children of a disk.
type op int

const (
	opRead op = iota
	opWrite
	opFlush
	opTrim
	opZero
	opCache
	opExtents
	numOps
)

// opNames are the op label values, named after the Backend methods.
var opNames = [numOps]string{"read", "write", "flush", "trim", "zero", "cache", "extents"}

// hasBytes says which ops count bytes_total.
var hasBytes = [numOps]bool{opRead: true, opWrite: true, opTrim: true, opZero: true, opCache: true}

// opStats are one op's label children, resolved when the disk is first
// seen so that a request costs a few atomic adds and no map lookups.
type opStats struct {
	ok, failed prometheus.Counter
	bytes      prometheus.Counter // nil for ops without bytes
	duration   prometheus.Observer
}

// diskIO is everything counted per disk. Its fields are set once in
// Metrics.disk and only read afterwards; the counters are atomic.
type diskIO struct {
	ops      [numOps]opStats
	inFlight prometheus.Gauge
	conns    prometheus.Gauge

	// Plain totals for DiskCounters, so `cryptnbd status` need not parse
	// Prometheus output. Successful requests only, like bytes_total.
	readBytes, writeBytes, readOps, writeOps atomic.Uint64
}

// disk returns the children for name, creating them on first use.
func (m *Metrics) disk(name string) *diskIO {
	m.mu.Lock()
	defer m.mu.Unlock()
	if d := m.disks[name]; d != nil {
		return d
	}
	d := &diskIO{
		inFlight: m.inFlight.WithLabelValues(name),
		conns:    m.conns.WithLabelValues(name),
	}
	for o := range numOps {
		s := &d.ops[o]
		s.ok = m.requests.WithLabelValues(name, opNames[o], "ok")
		s.failed = m.requests.WithLabelValues(name, opNames[o], "error")
		s.duration = m.duration.WithLabelValues(name, opNames[o])
		if hasBytes[o] {
			s.bytes = m.bytes.WithLabelValues(name, opNames[o])
		}
	}
	m.disks[name] = d
	return d
}

// WrapBackend returns b with every request counted under disk: requests by
// op and result, bytes, duration and requests in flight. Errors and data
// pass through untouched, so the NBD layer sees b's own errors. Wrapping
// the same disk more than once (say per connection) shares the counters.
// The wrapper allocates nothing per request. Where b is a NoWaitBackend
// so is the wrapper; a Try call is in flight while it runs, and counted
// as a request only if it served it, since one that declined is made again
// through ReadAt or WriteAt.
func (m *Metrics) WrapBackend(disk string, b Backend) Backend {
	w := &backend{next: b, d: m.disk(disk)}
	if nw, ok := b.(NoWaitBackend); ok {
		return &noWaitBackend{backend: w, next: nw}
	}
	return w
}

// ForgetDisk drops every per-disk series of disk, for a deleted disk. A
// wrapper still in use keeps counting into series no longer exported.
func (m *Metrics) ForgetDisk(disk string) {
	m.mu.Lock()
	delete(m.disks, disk)
	m.mu.Unlock()
	l := prometheus.Labels{"disk": disk}
	m.requests.DeletePartialMatch(l)
	m.bytes.DeletePartialMatch(l)
	m.duration.DeletePartialMatch(l)
	m.inFlight.DeletePartialMatch(l)
	m.conns.DeletePartialMatch(l)
	m.state.forget(disk)
}

// ConnOpened counts an NBD connection to disk; pair it with ConnClosed.
func (m *Metrics) ConnOpened(disk string) { m.disk(disk).conns.Inc() }

// ConnClosed counts the end of a connection counted by ConnOpened.
func (m *Metrics) ConnClosed(disk string) { m.disk(disk).conns.Dec() }

// DiskCounters returns disk's cumulative successful read and write bytes
// and requests since the process started (zeros for an unknown disk).
// Sampling it twice gives MiB/s and IOPS.
func (m *Metrics) DiskCounters(disk string) (readBytes, writeBytes, readOps, writeOps uint64) {
	m.mu.Lock()
	d := m.disks[disk]
	m.mu.Unlock()
	if d == nil {
		return 0, 0, 0, 0
	}
	return d.readBytes.Load(), d.writeBytes.Load(), d.readOps.Load(), d.writeOps.Load()
}

// backend counts requests into d and passes them to next. Safe for
// concurrent use if next is.
type backend struct {
	next Backend
	d    *diskIO
}

func (b *backend) begin() time.Time {
	b.d.inFlight.Inc()
	return time.Now()
}

func (b *backend) end(o op, start time.Time, n int64, err error) {
	b.d.inFlight.Dec()
	b.count(o, start, n, err)
}

// count records one finished request of op o: its duration, its result,
// and for successful ones its bytes.
func (b *backend) count(o op, start time.Time, n int64, err error) {
	s := &b.d.ops[o]
	s.duration.Observe(time.Since(start).Seconds())
	if err != nil {
		s.failed.Inc()
		return
	}
	s.ok.Inc()
	if s.bytes != nil && n > 0 {
		s.bytes.Add(float64(n))
	}
	switch o {
	case opRead:
		b.d.readBytes.Add(uint64(n))
		b.d.readOps.Add(1)
	case opWrite:
		b.d.writeBytes.Add(uint64(n))
		b.d.writeOps.Add(1)
	}
}

func (b *backend) ReadAt(ctx context.Context, p []byte, off int64) error {
	start := b.begin()
	err := b.next.ReadAt(ctx, p, off)
	b.end(opRead, start, int64(len(p)), err)
	return err
}

func (b *backend) WriteAt(ctx context.Context, p []byte, off int64) error {
	n := len(p) // WriteAt may scribble on p, but not change its length
	start := b.begin()
	err := b.next.WriteAt(ctx, p, off)
	b.end(opWrite, start, int64(n), err)
	return err
}

// noWaitBackend is backend for a next that can try requests without
// waiting. A Try call that serves a 1 MiB request runs for about half a
// millisecond, so Try calls count in flight like any other; one that
// declined leaves no other trace.
type noWaitBackend struct {
	*backend
	next NoWaitBackend
}

func (b *noWaitBackend) TryReadAt(ctx context.Context, p []byte, off int64) (bool, error) {
	start := b.begin()
	done, err := b.next.TryReadAt(ctx, p, off)
	b.tried(opRead, start, int64(len(p)), done, err)
	return done, err
}

func (b *noWaitBackend) TryWriteAt(ctx context.Context, p []byte, off int64) (bool, error) {
	n := len(p)
	start := b.begin()
	done, err := b.next.TryWriteAt(ctx, p, off)
	b.tried(opWrite, start, int64(n), done, err)
	return done, err
}

// tried ends a Try call begun at start, counting the request if it served.
func (b *noWaitBackend) tried(o op, start time.Time, n int64, done bool, err error) {
	if done {
		b.end(o, start, n, err)
		return
	}
	b.d.inFlight.Dec()
}

func (b *backend) Flush(ctx context.Context) error {
	start := b.begin()
	err := b.next.Flush(ctx)
	b.end(opFlush, start, 0, err)
	return err
}

func (b *backend) Trim(ctx context.Context, off, length int64) error {
	start := b.begin()
	err := b.next.Trim(ctx, off, length)
	b.end(opTrim, start, length, err)
	return err
}

func (b *backend) Zero(ctx context.Context, off, length int64, noHole, fast bool) error {
	start := b.begin()
	err := b.next.Zero(ctx, off, length, noHole, fast)
	b.end(opZero, start, length, err)
	return err
}

func (b *backend) Cache(ctx context.Context, off, length int64) error {
	start := b.begin()
	err := b.next.Cache(ctx, off, length)
	b.end(opCache, start, length, err)
	return err
}

func (b *backend) Extents(ctx context.Context, off, length int64, fn func(length int64, hole bool) bool) error {
	start := b.begin()
	err := b.next.Extents(ctx, off, length, fn)
	b.end(opExtents, start, 0, err)
	return err
}

func (b *backend) Size() int64 { return b.next.Size() }
