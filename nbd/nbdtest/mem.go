// Package nbdtest provides test doubles for the nbd package: an in-memory
// Backend with sparse allocation and failure injection, no-op Backends
// for benchmarks, and a map-backed Catalog.
package nbdtest

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
)

// ChunkBytes is the allocation unit of Mem: extents are reported in whole
// chunks, and a chunk is allocated on its first write.
const ChunkBytes = 4096

// Op selects operations for failure injection. Ops combine with |.
type Op uint8

// Operations of nbd.Backend.
const (
	OpRead Op = 1 << iota
	OpWrite
	OpFlush
	OpTrim
	OpZero
	OpCache
	OpExtents
	OpAll Op = 1<<iota - 1
)

type fault struct {
	ops         Op
	off, length int64
	err         error
}

// Mem is an in-memory nbd.Backend. Storage is sparse: unwritten chunks
// are holes that read as zeros, Trim and Zero without noHole free whole
// chunks, and Extents reports holes per chunk. Mem is safe for concurrent
// use; a RWMutex serialises writes against reads.
//
// Mem is an nbd.NoWaitBackend too: its Try methods serve a request unless
// the mutex is held against it or SetNoWait turned them off.
type Mem struct {
	size int64

	mu     sync.RWMutex
	chunks map[int64][]byte // chunk index → ChunkBytes of data
	faults []fault

	flushes atomic.Int64
	writes  atomic.Int64

	noWaitOff atomic.Bool
	tried     atomic.Int64 // Try calls that completed the request
}

// NewMem returns an empty (all-hole) disk of size bytes.
func NewMem(size int64) *Mem {
	return &Mem{size: size, chunks: make(map[int64][]byte)}
}

// Fail makes the operations in ops fail with err when they touch
// [off, off+length). Flush has no range and fails whenever OpFlush is
// set. err should wrap a syscall.Errno, for example syscall.EIO.
func (m *Mem) Fail(ops Op, off, length int64, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.faults = append(m.faults, fault{ops, off, length, err})
}

// ClearFaults removes all injected failures.
func (m *Mem) ClearFaults() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.faults = nil
}

// Flushes reports how many Flush calls succeeded.
func (m *Mem) Flushes() int64 { return m.flushes.Load() }

// Writes reports how many times WriteAt was called, failed calls
// included, so that a test can tell that a request never reached it.
func (m *Mem) Writes() int64 { return m.writes.Load() }

// SetNoWait turns the Try methods on (the default) or off; off, they
// decline every request, as a backend that always has to wait would.
func (m *Mem) SetNoWait(on bool) { m.noWaitOff.Store(!on) }

// ServedNoWait reports how many requests the Try methods completed.
func (m *Mem) ServedNoWait() int64 { return m.tried.Load() }

// Allocated reports whether the chunk holding off is allocated.
func (m *Mem) Allocated(off int64) bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	_, ok := m.chunks[off/ChunkBytes]
	return ok
}

// faultLocked returns the injected error for op on the range, if any.
// Callers hold mu.
func (m *Mem) faultLocked(op Op, off, length int64) error {
	for _, f := range m.faults {
		if f.ops&op == 0 {
			continue
		}
		if op == OpFlush || (off < f.off+f.length && f.off < off+length) {
			return f.err
		}
	}
	return nil
}

func (m *Mem) check(off, length int64) error {
	if off < 0 || length < 0 || off > m.size || length > m.size-off {
		return fmt.Errorf("nbdtest: range %d+%d outside %d bytes: %w", off, length, m.size, syscall.EINVAL)
	}
	return nil
}

// Size implements nbd.Backend.
func (m *Mem) Size() int64 { return m.size }

// ReadAt implements nbd.Backend.
func (m *Mem) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := m.check(off, int64(len(p))); err != nil {
		return err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.readLocked(p, off)
}

// TryReadAt implements nbd.NoWaitBackend.
func (m *Mem) TryReadAt(ctx context.Context, p []byte, off int64) (bool, error) {
	if m.noWaitOff.Load() {
		return false, nil
	}
	if err := m.check(off, int64(len(p))); err != nil {
		return true, err
	}
	if !m.mu.TryRLock() {
		return false, nil
	}
	defer m.mu.RUnlock()
	m.tried.Add(1)
	return true, m.readLocked(p, off)
}

func (m *Mem) readLocked(p []byte, off int64) error {
	if err := m.faultLocked(OpRead, off, int64(len(p))); err != nil {
		return err
	}
	for len(p) > 0 {
		idx, in := off/ChunkBytes, off%ChunkBytes
		n := min(int64(len(p)), ChunkBytes-in)
		if c, ok := m.chunks[idx]; ok {
			copy(p[:n], c[in:])
		} else {
			clear(p[:n])
		}
		p, off = p[n:], off+n
	}
	return nil
}

// WriteAt implements nbd.Backend.
func (m *Mem) WriteAt(ctx context.Context, p []byte, off int64) error {
	m.writes.Add(1)
	if err := m.check(off, int64(len(p))); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.writeLocked(p, off)
}

// TryWriteAt implements nbd.NoWaitBackend.
func (m *Mem) TryWriteAt(ctx context.Context, p []byte, off int64) (bool, error) {
	if m.noWaitOff.Load() || !m.mu.TryLock() {
		return false, nil
	}
	defer m.mu.Unlock()
	m.writes.Add(1)
	m.tried.Add(1)
	if err := m.check(off, int64(len(p))); err != nil {
		return true, err
	}
	return true, m.writeLocked(p, off)
}

func (m *Mem) writeLocked(p []byte, off int64) error {
	if err := m.faultLocked(OpWrite, off, int64(len(p))); err != nil {
		return err
	}
	for len(p) > 0 {
		idx, in := off/ChunkBytes, off%ChunkBytes
		n := min(int64(len(p)), ChunkBytes-in)
		c, ok := m.chunks[idx]
		if !ok {
			c = make([]byte, ChunkBytes)
			m.chunks[idx] = c
		}
		copy(c[in:], p[:n])
		p, off = p[n:], off+n
	}
	return nil
}

// Flush implements nbd.Backend; memory is always durable.
func (m *Mem) Flush(ctx context.Context) error {
	m.mu.RLock()
	err := m.faultLocked(OpFlush, 0, 0)
	m.mu.RUnlock()
	if err != nil {
		return err
	}
	m.flushes.Add(1)
	return nil
}

// zeroLocked zeroes a range, freeing whole chunks unless keep is set.
func (m *Mem) zeroLocked(off, length int64, keep bool) {
	for length > 0 {
		idx, in := off/ChunkBytes, off%ChunkBytes
		n := min(length, ChunkBytes-in)
		if c, ok := m.chunks[idx]; ok {
			if n == ChunkBytes && !keep {
				delete(m.chunks, idx)
			} else {
				clear(c[in : in+n])
			}
		} else if keep {
			m.chunks[idx] = make([]byte, ChunkBytes)
		}
		off, length = off+n, length-n
	}
}

// Trim implements nbd.Backend: the range reads as zeros afterwards.
func (m *Mem) Trim(ctx context.Context, off, length int64) error {
	if err := m.check(off, length); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.faultLocked(OpTrim, off, length); err != nil {
		return err
	}
	m.zeroLocked(off, length, false)
	return nil
}

// Zero implements nbd.Backend. Zeroing memory is always fast.
func (m *Mem) Zero(ctx context.Context, off, length int64, noHole, fast bool) error {
	if err := m.check(off, length); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.faultLocked(OpZero, off, length); err != nil {
		return err
	}
	m.zeroLocked(off, length, noHole)
	return nil
}

// Cache implements nbd.Backend and does nothing but check the range.
func (m *Mem) Cache(ctx context.Context, off, length int64) error {
	if err := m.check(off, length); err != nil {
		return err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.faultLocked(OpCache, off, length)
}

// Extents implements nbd.Backend, reporting allocation per chunk. The lock
// is not held while fn runs.
func (m *Mem) Extents(ctx context.Context, off, length int64, fn func(length int64, hole bool) bool) error {
	if err := m.check(off, length); err != nil {
		return err
	}
	end := off + length
	for off < end {
		m.mu.RLock()
		if err := m.faultLocked(OpExtents, off, end-off); err != nil {
			m.mu.RUnlock()
			return err
		}
		// Gather one run of equal allocation.
		_, hole := m.chunks[off/ChunkBytes]
		hole = !hole
		runEnd := min((off/ChunkBytes+1)*ChunkBytes, end)
		for runEnd < end {
			_, alloc := m.chunks[runEnd/ChunkBytes]
			if alloc == hole {
				break
			}
			runEnd = min(runEnd+ChunkBytes, end)
		}
		m.mu.RUnlock()
		if !fn(runEnd-off, hole) {
			return nil
		}
		off = runEnd
	}
	return nil
}

// Null is an nbd.Backend that stores nothing: reads return zeros (the
// buffer is left untouched), everything else succeeds. It is for
// benchmarks of the protocol path.
type Null struct{ SizeBytes int64 }

// Size implements nbd.Backend.
func (n Null) Size() int64 { return n.SizeBytes }

// ReadAt implements nbd.Backend without touching p.
func (Null) ReadAt(context.Context, []byte, int64) error { return nil }

// WriteAt implements nbd.Backend.
func (Null) WriteAt(context.Context, []byte, int64) error { return nil }

// Flush implements nbd.Backend.
func (Null) Flush(context.Context) error { return nil }

// Trim implements nbd.Backend.
func (Null) Trim(context.Context, int64, int64) error { return nil }

// Zero implements nbd.Backend.
func (Null) Zero(context.Context, int64, int64, bool, bool) error { return nil }

// Cache implements nbd.Backend.
func (Null) Cache(context.Context, int64, int64) error { return nil }

// Extents implements nbd.Backend, reporting the range as one hole.
func (Null) Extents(_ context.Context, _, length int64, fn func(int64, bool) bool) error {
	fn(length, true)
	return nil
}

// NoWaitNull is Null as an nbd.NoWaitBackend whose Try methods serve every
// request, for benchmarks of the path where the reader serves them.
type NoWaitNull struct{ Null }

// TryReadAt implements nbd.NoWaitBackend without touching p.
func (NoWaitNull) TryReadAt(context.Context, []byte, int64) (bool, error) { return true, nil }

// TryWriteAt implements nbd.NoWaitBackend.
func (NoWaitNull) TryWriteAt(context.Context, []byte, int64) (bool, error) { return true, nil }
