package nbd

import "context"

// Backend is the storage behind one export. The server calls it from many
// goroutines at once, so implementations must be safe for concurrent use.
//
// Offsets and lengths are in bytes and have already been checked against
// Size by the server. Errors should wrap a syscall.Errno (EIO, ENOSPC, EPERM,
// EINVAL, ENOTSUP, ESHUTDOWN, ...): the server maps it to the NBD error the
// client sees and carries on with the connection. Any other error becomes EIO.
//
// The context is the request's; it is cancelled when the connection goes away
// or the server is forced to stop. A backend that blocks (for example a
// suspended disk) must give up when it is done.
type Backend interface {
	// ReadAt fills all of p from off, or returns an error. The server never
	// sends a success reply before ReadAt has returned nil.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt writes all of p at off. It need not be durable until Flush.
	// It may use p as scratch space (encrypting in place, say): the caller
	// must not rely on p's contents after the call.
	WriteAt(ctx context.Context, p []byte, off int64) error
	// Flush makes every write that returned before Flush was called durable,
	// whichever connection it came from.
	Flush(ctx context.Context) error
	// Trim tells the backend the range is no longer needed. Afterwards the
	// range may read as anything; for this project's disks it reads as zeros.
	Trim(ctx context.Context, off, length int64) error
	// Zero makes the range read as zeros. With noHole the backend must keep
	// the range allocated. With fast, it must return ENOTSUP unless zeroing is
	// faster than writing zeros, without changing anything.
	Zero(ctx context.Context, off, length int64, noHole, fast bool) error
	// Cache is a hint to prefetch the range. It may do nothing.
	Cache(ctx context.Context, off, length int64) error
	// Extents describes allocation from off onward: fn is called with
	// consecutive runs, the first starting at off, until it returns false or
	// length bytes are covered. hole means unallocated and reading as zeros.
	Extents(ctx context.Context, off, length int64, fn func(length int64, hole bool) bool) error
	// Size is the export's current size in bytes. It may grow while the
	// export is served; connections see the size from their handshake.
	Size() int64
}

// NoWaitBackend is a Backend that can try a READ or WRITE without waiting,
// as preadv2 with RWF_NOWAIT does. The server tries requests this way on
// the connection's reader goroutine and answers them from there, which
// saves handing each to a worker and then to the writer: on a loaded
// machine those two wake-ups cost as much as a 4 KiB request's own work,
// and a 1 MiB payload that stays on one core is cheaper to encrypt and to
// copy. Whatever would have to wait goes to the workers as before.
//
// The Try methods must not block: not for a lock another request may hold,
// nor for a device, nor for a suspended key. A request that gets false is
// then made through ReadAt or WriteAt from a worker.
type NoWaitBackend interface {
	Backend
	// TryReadAt is ReadAt where that can complete without waiting, and
	// false at once where it cannot; p's contents then do not matter.
	TryReadAt(ctx context.Context, p []byte, off int64) (bool, error)
	// TryWriteAt is WriteAt where that can complete without waiting. With
	// false it has written nothing and left p as it was.
	TryWriteAt(ctx context.Context, p []byte, off int64) (bool, error)
}
