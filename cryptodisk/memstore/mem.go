// Package memstore keeps a disk image in memory, sparsely: only pages that
// were written take memory, and Punch gives whole pages back. It is the
// Storage for tests and benchmarks of cryptodisk.
package memstore

import (
	"context"
	"fmt"
	"io/fs"
	"sync"
	"sync/atomic"
	"syscall"
)

// PageSize is the allocation unit: Allocated reports runs of whole pages,
// and Punch frees the pages it covers entirely (partly covered ones are
// zeroed in place).
const PageSize = 4096

type page = [PageSize]byte

// image is the data shared by every handle Reopen makes.
type image struct {
	// mu guards pages and size. Each ReadAt, WriteAt and Punch holds it for
	// the whole call, so a call is atomic with respect to every other.
	mu    sync.RWMutex
	pages map[int64]*page // by page index
	size  int64
}

// Store is a cryptodisk.Storage in memory. It is safe for concurrent use.
// Buffers passed in are copied; Store keeps none of them. After Close every
// method fails with an error wrapping fs.ErrClosed, but the data survives
// for Reopen.
type Store struct {
	img    *image
	closed atomic.Bool
}

// New returns an empty store of size bytes, all of them reading as zeros.
func New(size int64) *Store {
	if size < 0 {
		panic("memstore: negative size")
	}
	return &Store{img: &image{pages: map[int64]*page{}, size: size}}
}

// Reopen returns a new open handle on the same data, as opening a file
// again would. s itself may be closed.
func (s *Store) Reopen() *Store { return &Store{img: s.img} }

func (s *Store) check(op string) error {
	if s.closed.Load() {
		return fmt.Errorf("memstore: %s: %w", op, fs.ErrClosed)
	}
	return nil
}

// Size is the image size in bytes.
func (s *Store) Size() int64 {
	s.img.mu.RLock()
	defer s.img.mu.RUnlock()
	return s.img.size
}

// AllocatedBytes is the memory held by data pages, for tests that check that
// Punch frees them.
func (s *Store) AllocatedBytes() int64 {
	s.img.mu.RLock()
	defer s.img.mu.RUnlock()
	return int64(len(s.img.pages)) * PageSize
}

// InMemory is true: no read or write waits for a device.
func (s *Store) InMemory() bool { return true }

// ReadAtNoWait is ReadAt: memory never makes a read wait for a device.
func (s *Store) ReadAtNoWait(ctx context.Context, p []byte, off int64) error {
	return s.ReadAt(ctx, p, off)
}

// ReadAt fills p from off; unwritten ranges read as zeros. A range beyond
// Size fails with an error wrapping syscall.EINVAL.
func (s *Store) ReadAt(_ context.Context, p []byte, off int64) error {
	if err := s.check("read"); err != nil {
		return err
	}
	m := s.img
	m.mu.RLock()
	defer m.mu.RUnlock()
	if off < 0 || off+int64(len(p)) > m.size || off+int64(len(p)) < off {
		return fmt.Errorf("memstore: read [%d,+%d) beyond %d: %w", off, len(p), m.size, syscall.EINVAL)
	}
	for len(p) > 0 {
		idx, inner := off/PageSize, off%PageSize
		n := min(int64(len(p)), PageSize-inner)
		if pg := m.pages[idx]; pg != nil {
			copy(p[:n], pg[inner:])
		} else {
			clear(p[:n])
		}
		p, off = p[n:], off+n
	}
	return nil
}

// WriteAt copies p to off, allocating pages as needed. A range beyond Size
// fails with an error wrapping syscall.ENOSPC.
func (s *Store) WriteAt(_ context.Context, p []byte, off int64) error {
	if err := s.check("write"); err != nil {
		return err
	}
	m := s.img
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || off+int64(len(p)) > m.size || off+int64(len(p)) < off {
		return fmt.Errorf("memstore: write [%d,+%d) beyond %d: %w", off, len(p), m.size, syscall.ENOSPC)
	}
	for len(p) > 0 {
		idx, inner := off/PageSize, off%PageSize
		n := min(int64(len(p)), PageSize-inner)
		pg := m.pages[idx]
		if pg == nil {
			pg = new(page)
			m.pages[idx] = pg
		}
		copy(pg[inner:], p[:n])
		p, off = p[n:], off+n
	}
	return nil
}

// Punch frees the pages wholly inside the range and zeroes the parts of
// the others it covers. A range beyond Size fails with an error wrapping
// syscall.EINVAL.
func (s *Store) Punch(_ context.Context, off, length int64) error {
	if err := s.check("punch"); err != nil {
		return err
	}
	m := s.img
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || length < 0 || off+length > m.size || off+length < off {
		return fmt.Errorf("memstore: punch [%d,+%d) beyond %d: %w", off, length, m.size, syscall.EINVAL)
	}
	end := off + length
	for off < end {
		idx, inner := off/PageSize, off%PageSize
		n := min(end-off, PageSize-inner)
		if n == PageSize {
			delete(m.pages, idx)
		} else if pg := m.pages[idx]; pg != nil {
			clear(pg[inner : inner+n])
		}
		off += n
	}
	return nil
}

// Allocated reports runs of allocated pages and holes from off, clipped to
// Size. A negative off fails with an error wrapping syscall.EINVAL.
func (s *Store) Allocated(_ context.Context, off, length int64, fn func(length int64, allocated bool) bool) error {
	if err := s.check("allocated"); err != nil {
		return err
	}
	if off < 0 || length < 0 {
		return fmt.Errorf("memstore: allocated [%d,+%d): %w", off, length, syscall.EINVAL)
	}
	// Collect the runs under the lock, call fn outside it, so fn may use
	// the store.
	type run struct {
		n     int64
		alloc bool
	}
	var runs []run
	m := s.img
	m.mu.RLock()
	end := min(off+length, m.size)
	for off < end {
		n := min(end-off, PageSize-off%PageSize)
		alloc := m.pages[off/PageSize] != nil
		if k := len(runs); k > 0 && runs[k-1].alloc == alloc {
			runs[k-1].n += n
		} else {
			runs = append(runs, run{n, alloc})
		}
		off += n
	}
	m.mu.RUnlock()
	for _, r := range runs {
		if !fn(r.n, r.alloc) {
			break
		}
	}
	return nil
}

// Sync does nothing: memory is as durable as this store gets.
func (s *Store) Sync(context.Context) error { return s.check("sync") }

// Grow extends the image to size bytes; shrinking fails with an error
// wrapping syscall.EINVAL.
func (s *Store) Grow(_ context.Context, size int64) error {
	if err := s.check("grow"); err != nil {
		return err
	}
	m := s.img
	m.mu.Lock()
	defer m.mu.Unlock()
	if size < m.size {
		return fmt.Errorf("memstore: shrinking from %d to %d: %w", m.size, size, syscall.EINVAL)
	}
	m.size = size
	return nil
}

// Close makes this handle unusable. The data stays for Reopen.
func (s *Store) Close() error {
	if s.closed.Swap(true) {
		return fmt.Errorf("memstore: close: %w", fs.ErrClosed)
	}
	return nil
}
