package filestore

import (
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The mapping lets the cipher read its input from, and on tmpfs write its
// output to, the page cache itself. A pread or pwrite copies every byte
// once more between the page cache and a buffer: at 1 MiB requests on
// tmpfs that copy was 0.14 s of server CPU per GiB read and 0.23 per GiB
// written, about a fifth and a third of the whole server (docs/performance.md).
//
// Pages are lent only where mincore says the page cache holds every one of
// them. That keeps three costs away from the mapping:
//   - a read fault on a tmpfs hole allocates a page, so reading through the
//     mapping would fill a sparse image; pread reads holes as zeros for free;
//   - a page that is not cached would be read from disk inside a page fault,
//     one page at a time, instead of by pread with readahead;
//   - on tmpfs a write fault into a hole allocates, and a full tmpfs then
//     answers with SIGBUS instead of ENOSPC.
//
// The mapping lives as long as the file: populating its page tables is the
// expensive part (madvise(MADV_POPULATE_READ) per request, or dropping and
// refaulting them to bound RSS, each cost more than the copy they replace),
// so pages once touched stay mapped and count in the process's RSS. They are
// the page cache of the image, which exists whether mapped or not.

// minLend is the smallest range lent. Below it the mincore call costs as
// much as the copy it saves: at 4 KiB the two paths measured the same.
const minLend = 64 << 10

// mincoreChunk bounds the residency vector kept on the stack.
const mincoreChunk = 1024

// AddressBudget bounds the address space that the files sharing it map.
// Images are sparse and may be far larger than memory; mapped whole, a few
// of them could take the address space the Go heap needs to grow, and the
// runtime dies when it cannot reserve more. A file whose mapping does not
// fit in the budget is served through pread and pwrite instead.
type AddressBudget struct {
	limit int64
	used  atomic.Int64
}

// DefaultAddressBudget is a quarter of the 128 TiB a process has on amd64
// and arm64 with 4-level page tables.
const DefaultAddressBudget = 32 << 40

// NewAddressBudget returns a budget of limit bytes.
func NewAddressBudget(limit int64) *AddressBudget { return &AddressBudget{limit: limit} }

// take and give accept a nil budget, which sets no bound.
func (b *AddressBudget) take(n int64) bool {
	if b == nil {
		return true
	}
	for {
		used := b.used.Load()
		if used+n > b.limit || used+n < used {
			return false
		}
		if b.used.CompareAndSwap(used, used+n) {
			return true
		}
	}
}

func (b *AddressBudget) give(n int64) {
	if b != nil {
		b.used.Add(-n)
	}
}

type mapping struct {
	// mu's read side is held from Lend to Unlend; Grow and Close take the
	// write side to move or remove the mapping under no borrower.
	mu     sync.RWMutex
	b      []byte
	budget *AddressBudget
	// writable is set on filesystems that never write pages back (tmpfs,
	// ramfs). Elsewhere writeback write-protects each cleaned page, so
	// every later store through the mapping would fault once per page,
	// which costs more than the pwrite copy.
	writable bool
	on       bool
}

// Map makes the file lend cached pages (see Lend), taking the mapping's
// size from budget (nil: no bound). Mapping is only a way to save a copy, so where it
// cannot be had (a filesystem without mmap, an exhausted budget or address
// space) the file stays unmapped, Lend declines, and every byte goes
// through pread and pwrite; Mapped tells.
func (s *File) Map(budget *AddressBudget) {
	s.m.mu.Lock()
	defer s.m.mu.Unlock()
	if s.m.on {
		return
	}
	s.m.writable = !s.readOnly && s.inMemory
	s.m.budget = budget
	s.m.on = s.m.mapLocked(s.fd, s.size.Load())
}

// Mapped reports whether the file lends pages for reading, and for writing.
func (s *File) Mapped() (read, write bool) {
	s.m.mu.RLock()
	defer s.m.mu.RUnlock()
	return s.m.on, s.m.on && s.m.writable
}

// mapLocked maps size bytes and reports whether the file is mapped (an
// empty file is, with nothing to map yet).
func (m *mapping) mapLocked(fd int, size int64) bool {
	if size == 0 {
		return true
	}
	if int64(int(size)) != size || !m.budget.take(size) {
		return false
	}
	prot := unix.PROT_READ
	if m.writable {
		prot |= unix.PROT_WRITE
	}
	b, err := unix.Mmap(fd, 0, int(size), prot, unix.MAP_SHARED)
	if err != nil {
		m.budget.give(size)
		return false
	}
	m.b = b
	return true
}

// resize follows the file to size. mremap moves the page tables along, so
// what was mapped stays mapped. If the mapping cannot follow, it is dropped
// and the file serves through pread and pwrite from then on: the grow
// itself has already happened and must not be undone for a cache.
func (m *mapping) resize(fd int, size int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.on {
		return
	}
	if m.b == nil {
		m.on = m.mapLocked(fd, size)
		return
	}
	old := int64(len(m.b))
	if int64(int(size)) == size && m.budget.take(size-old) {
		if b, err := unix.Mremap(m.b, int(size), unix.MREMAP_MAYMOVE); err == nil {
			m.b = b
			return
		}
		m.budget.give(size - old)
	}
	m.unmapLocked()
}

func (m *mapping) unmap() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.unmapLocked()
}

func (m *mapping) unmapLocked() error {
	m.on = false
	if m.b == nil {
		return nil
	}
	err := unix.Munmap(m.b)
	m.budget.give(int64(len(m.b)))
	m.b = nil
	return err
}

// Lend returns the image bytes [off, off+n) in the page cache itself, or
// nil if they are not all cached, the range is small, the file is not
// mapped, or (with write) the filesystem writes pages back. A nil result
// needs no Unlend; the caller uses ReadAt or WriteAt instead.
//
// Until Unlend the slice stays mapped; the caller must not keep it beyond
// that, nor take a lock that a borrower elsewhere could be waiting for
// while it holds it. It is shared memory: bytes written are the file's at
// once (durable, as with WriteAt, after Sync). If the file shrinks under
// the mapping, or a concurrent Punch leaves a tmpfs page that cannot be
// allocated again, access faults; read it with debug.SetPanicOnFault.
func (s *File) Lend(off int64, n int, write bool) []byte {
	if n < minLend {
		return nil
	}
	s.m.mu.RLock()
	b := s.m.b
	if b == nil || (write && !s.m.writable) || off < 0 || off+int64(n) > int64(len(b)) || off+int64(n) < off {
		s.m.mu.RUnlock()
		return nil
	}
	if !resident(b, off, n) {
		s.m.mu.RUnlock()
		return nil
	}
	return b[off : off+int64(n) : off+int64(n)]
}

// Unlend ends the loan of a non-nil Lend.
func (s *File) Unlend() { s.m.mu.RUnlock() }

// resident reports whether every page of b[off:off+n] is in the page cache.
func resident(b []byte, off int64, n int) bool {
	page := int64(unix.Getpagesize())
	start := off / page * page
	end := off + int64(n)
	var vec [mincoreChunk]byte
	for start < end {
		pages := min((end-start+page-1)/page, mincoreChunk)
		length := pages * page
		if start+length > int64(len(b)) {
			length = int64(len(b)) - start // the last page may be partial
		}
		_, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&b[start])), uintptr(length), uintptr(unsafe.Pointer(&vec[0])))
		if errno != 0 {
			return false
		}
		for _, v := range vec[:pages] {
			if v&1 == 0 {
				return false
			}
		}
		start += length
	}
	return true
}
