package cryptodisk

import "context"

// Storage holds one disk image: the LUKS2 header followed by the encrypted
// data region. Offsets are absolute within the image. Implementations must be
// safe for concurrent use; concurrent writes to overlapping ranges are never
// issued by Disk.
//
// Errors wrap a syscall.Errno where one applies (EIO, ENOSPC, ...), so the
// NBD layer can report the right code.
type Storage interface {
	// ReadAt fills all of p from off. Unallocated ranges read as zeros.
	// Reading past Size is an error.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt writes all of p at off. It is durable only after Sync.
	WriteAt(ctx context.Context, p []byte, off int64) error
	// Punch deallocates the range where the store can; afterwards it reads
	// as zeros either way.
	Punch(ctx context.Context, off, length int64) error
	// Allocated reports allocation from off onward: fn is called with
	// consecutive runs until it returns false or length bytes are covered. A
	// store that cannot tell reports everything allocated.
	Allocated(ctx context.Context, off, length int64, fn func(length int64, allocated bool) bool) error
	// Sync makes every completed WriteAt and Punch durable.
	Sync(ctx context.Context) error
	// Size is the image size in bytes.
	Size() int64
	// Grow extends the image to size bytes; the new range reads as zeros.
	Grow(ctx context.Context, size int64) error
	// Close releases the store. It does not sync.
	Close() error
}

// Lender is a Storage that can lend image bytes it holds in memory, so that
// the cipher reads its input from, or writes its output to, the store's own
// pages and the copy ReadAt or WriteAt would make is saved. Disk uses it
// where the store implements it (filestore.File does, once mapped).
type Lender interface {
	// Lend returns the image bytes [off, off+n) in place, for reading, or
	// with write for writing every byte of them, or nil where the store
	// declines (the caller then uses ReadAt or WriteAt). A non-nil result
	// must be ended with Unlend, before which the caller takes no lock, and
	// holds nothing of it after. Written bytes are durable after Sync. The
	// memory may fault if the image shrinks under it, so Disk accesses it
	// with faults turned into errors.
	Lend(off int64, n int, write bool) []byte
	// Unlend ends a loan: one call for each non-nil Lend.
	Unlend()
}

// NoWaitStorage is a Storage that can serve reads, and where it is held in
// memory writes too, without waiting for a device. Disk uses it for
// TryReadAt and TryWriteAt, which a caller that must not block (the NBD
// server's connection reader) tries before handing a request to a
// goroutine that may wait. filestore.File is one.
type NoWaitStorage interface {
	// ReadAtNoWait is ReadAt, except that where it would have to wait for
	// the device (the bytes are not all in memory) it fails at once with an
	// error wrapping syscall.EAGAIN, leaving p's contents undefined.
	ReadAtNoWait(ctx context.Context, p []byte, off int64) error
	// InMemory reports that the image is held in memory (tmpfs, say), so
	// that neither ReadAt nor WriteAt ever waits for a device.
	InMemory() bool
}

// KeyWrapper wraps a disk's keyslot secret under a key provider's current key.
// aad binds the result to one disk: unwrapping with other aad must fail where
// the provider's algorithm allows it.
type KeyWrapper interface {
	Wrap(ctx context.Context, secret, aad []byte) (kid, alg string, wrapped []byte, err error)
}

// KeyUnwrapper recovers a keyslot secret. kid is the full, versioned key
// identifier stored in the disk's token.
type KeyUnwrapper interface {
	Unwrap(ctx context.Context, kid, alg string, wrapped, aad []byte) ([]byte, error)
}
