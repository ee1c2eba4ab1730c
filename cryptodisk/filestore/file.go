// Package filestore keeps a disk image in a local sparse file.
package filestore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// File is a cryptodisk.Storage over one sparse file. It is safe for
// concurrent use: reads and writes are positional, and Sync coalesces
// concurrent callers into as few fdatasync calls as cover them all.
type File struct {
	f        *os.File
	fd       int
	readOnly bool
	// inMemory: the filesystem keeps the file in memory (tmpfs, ramfs), so
	// no read or write of it waits for a device.
	inMemory bool
	// noWaitReads is cleared when the kernel refuses RWF_NOWAIT on this
	// file, so later reads are declined without asking it again.
	noWaitReads atomic.Bool
	size        atomic.Int64
	m           mapping

	// smu guards the group-commit state below. A Sync call takes a ticket;
	// one caller at a time runs fdatasync on behalf of every ticket issued
	// before it started, so a burst of FUA writes costs one sync, not one each.
	smu       sync.Mutex
	cond      *sync.Cond
	issued    uint64
	completed uint64
	running   bool
	// syncErr is sticky: after a failed fdatasync Linux may have dropped the
	// dirty pages, so no later Sync can honestly promise durability.
	syncErr error
}

// Create makes a new sparse file of size bytes. It fails if path exists.
func Create(path string, size int64) (*File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("filestore: create: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("filestore: create %s: %w", path, err)
	}
	return newFile(f, size, false), nil
}

// Open opens an existing image, read-write unless readOnly.
func Open(path string, readOnly bool) (*File, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("filestore: open: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("filestore: open %s: %w", path, err)
	}
	return newFile(f, st.Size(), readOnly), nil
}

func newFile(f *os.File, size int64, readOnly bool) *File {
	s := &File{f: f, fd: int(f.Fd()), readOnly: readOnly}
	var st unix.Statfs_t
	// A filesystem that cannot say what it is is treated as a device one.
	if unix.Fstatfs(s.fd, &st) == nil {
		s.inMemory = st.Type == unix.TMPFS_MAGIC || st.Type == unix.RAMFS_MAGIC
	}
	s.noWaitReads.Store(!s.inMemory)
	s.size.Store(size)
	s.cond = sync.NewCond(&s.smu)
	return s
}

// Path is the file's name.
func (s *File) Path() string { return s.f.Name() }

// Size is the file size in bytes.
func (s *File) Size() int64 { return s.size.Load() }

// ReadAt fills p from off; holes read as zeros.
func (s *File) ReadAt(_ context.Context, p []byte, off int64) error {
	return s.read(p, off, false)
}

// InMemory reports whether the file lives in memory (tmpfs or ramfs), where
// no read or write waits for a device.
func (s *File) InMemory() bool { return s.inMemory }

// ReadAtNoWait is ReadAt for a caller that must not wait for the device:
// where the bytes are not all in the page cache it fails with an error
// wrapping syscall.EAGAIN, having filled p only in part. In memory it is
// ReadAt; elsewhere it reads with RWF_NOWAIT, and where the kernel does
// not offer that, every call fails with EAGAIN.
func (s *File) ReadAtNoWait(_ context.Context, p []byte, off int64) error {
	if s.inMemory {
		return s.read(p, off, false)
	}
	if !s.noWaitReads.Load() {
		return errWouldWait
	}
	return s.read(p, off, true)
}

// errWouldWait is returned without wrapping, so that a declined read costs
// no allocation.
var errWouldWait = fmt.Errorf("filestore: data not in the page cache: %w", syscall.EAGAIN)

func (s *File) read(p []byte, off int64, noWait bool) error {
	if end := off + int64(len(p)); off < 0 || end > s.size.Load() || end < off {
		return fmt.Errorf("filestore: read [%d,+%d) beyond %d: %w", off, len(p), s.size.Load(), syscall.EINVAL)
	}
	for len(p) > 0 {
		var n int
		var err error
		if noWait {
			n, err = preadNoWait(s.fd, p, off)
			switch err {
			case syscall.EAGAIN:
				return errWouldWait
			case syscall.EOPNOTSUPP:
				s.noWaitReads.Store(false)
				return errWouldWait
			}
		} else {
			n, err = unix.Pread(s.fd, p, off)
		}
		if err != nil {
			if err == syscall.EINTR {
				continue
			}
			return fmt.Errorf("filestore: read at %d: %w", off, err)
		}
		if n == 0 {
			return fmt.Errorf("filestore: read at %d: %w", off, io.ErrUnexpectedEOF)
		}
		if noWait && n < len(p) {
			// RWF_NOWAIT stops short at the first page not cached.
			return errWouldWait
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// WriteAt writes all of p at off. It is durable after Sync.
func (s *File) WriteAt(_ context.Context, p []byte, off int64) error {
	if end := off + int64(len(p)); off < 0 || end > s.size.Load() || end < off {
		return fmt.Errorf("filestore: write [%d,+%d) beyond %d: %w", off, len(p), s.size.Load(), syscall.ENOSPC)
	}
	for len(p) > 0 {
		n, err := unix.Pwrite(s.fd, p, off)
		if err != nil {
			if err == syscall.EINTR {
				continue
			}
			return fmt.Errorf("filestore: write at %d: %w", off, err)
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// Punch deallocates the range. Partial filesystem blocks at its edges are
// zeroed by the kernel, so the whole range reads as zeros afterwards.
func (s *File) Punch(_ context.Context, off, length int64) error {
	if length == 0 {
		return nil
	}
	err := unix.Fallocate(s.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if err == nil {
		return nil
	}
	if !errors.Is(err, syscall.EOPNOTSUPP) {
		return fmt.Errorf("filestore: punch [%d,+%d): %w", off, length, err)
	}
	// A filesystem without hole punching still has to read back zeros.
	return s.writeZeros(off, length)
}

func (s *File) writeZeros(off, length int64) error {
	zero := make([]byte, min(length, 1<<20))
	for length > 0 {
		n := min(length, int64(len(zero)))
		if err := s.WriteAt(context.Background(), zero[:n], off); err != nil {
			return err
		}
		off, length = off+n, length-n
	}
	return nil
}

// Allocated reports data and holes with SEEK_DATA and SEEK_HOLE.
func (s *File) Allocated(_ context.Context, off, length int64, fn func(length int64, allocated bool) bool) error {
	end := min(off+length, s.size.Load())
	for off < end {
		data, err := unix.Seek(s.fd, off, unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, syscall.ENXIO) { // only a hole up to EOF
				fn(end-off, false)
				return nil
			}
			if errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.EOPNOTSUPP) {
				fn(end-off, true)
				return nil
			}
			return fmt.Errorf("filestore: seek data at %d: %w", off, err)
		}
		if data > off {
			if !fn(min(data, end)-off, false) {
				return nil
			}
			off = data
			if off >= end {
				return nil
			}
		}
		hole, err := unix.Seek(s.fd, off, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("filestore: seek hole at %d: %w", off, err)
		}
		if !fn(min(hole, end)-off, true) {
			return nil
		}
		off = hole
	}
	return nil
}

// Sync makes every write and punch that completed before the call durable.
func (s *File) Sync(context.Context) error {
	s.smu.Lock()
	defer s.smu.Unlock()
	s.issued++
	ticket := s.issued
	for s.completed < ticket && s.syncErr == nil {
		if s.running {
			s.cond.Wait()
			continue
		}
		s.running = true
		covers := s.issued
		s.smu.Unlock()
		err := fdatasync(s.fd)
		s.smu.Lock()
		s.running = false
		if err != nil {
			s.syncErr = fmt.Errorf("filestore: fdatasync %s: %w", s.f.Name(), err)
		} else {
			s.completed = covers
		}
		s.cond.Broadcast()
	}
	return s.syncErr
}

// preadNoWait is preadv2(RWF_NOWAIT) of one buffer, with the iovec on the
// stack: x/sys/unix.Preadv2 allocates its iovecs on every call.
func preadNoWait(fd int, p []byte, off int64) (int, error) {
	iov := unix.Iovec{Base: unsafe.SliceData(p)}
	iov.SetLen(len(p))
	n, _, errno := unix.Syscall6(unix.SYS_PREADV2, uintptr(fd), uintptr(unsafe.Pointer(&iov)), 1, uintptr(off), 0, unix.RWF_NOWAIT)
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

func fdatasync(fd int) error {
	for {
		err := unix.Fdatasync(fd)
		if err != syscall.EINTR {
			return err
		}
	}
}

// Grow extends the file; the new range is a hole.
func (s *File) Grow(ctx context.Context, size int64) error {
	if size < s.size.Load() {
		return fmt.Errorf("filestore: shrinking from %d to %d: %w", s.size.Load(), size, syscall.EINVAL)
	}
	if err := s.f.Truncate(size); err != nil {
		return fmt.Errorf("filestore: grow: %w", err)
	}
	// The new size must survive a crash before anyone is told about it.
	if err := s.f.Sync(); err != nil {
		return fmt.Errorf("filestore: grow: %w", err)
	}
	s.m.resize(s.fd, size)
	s.size.Store(size)
	return nil
}

// Close closes the file without syncing.
func (s *File) Close() error {
	if err := s.m.unmap(); err != nil {
		s.f.Close()
		return fmt.Errorf("filestore: close: unmap: %w", err)
	}
	if err := s.f.Close(); err != nil {
		return fmt.Errorf("filestore: close: %w", err)
	}
	return nil
}
