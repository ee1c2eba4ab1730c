package blobstore

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
)

var (
	// ErrLeased means another holder has the blob's lease, so Open or Create
	// could not take the disk. The error is a *LeasedError naming the holder.
	ErrLeased = errors.New("blobstore: blob is leased by another holder")
	// ErrLeaseLost means this Store no longer holds the blob's lease: it was
	// broken, or it expired and was taken, or renewal failed for a whole
	// lease period. Writes fail with it (and with syscall.EIO) from then on;
	// reads still work. Nothing this Store writes can land after the loss.
	ErrLeaseLost = errors.New("blobstore: lease lost")
	// ErrReadOnly is returned for writes to a snapshot; it wraps
	// syscall.EROFS.
	ErrReadOnly = fmt.Errorf("blobstore: snapshot is read-only: %w", syscall.EROFS)
)

// LeasedError is returned when a blob's lease is held by someone else. It
// matches ErrLeased with errors.Is.
type LeasedError struct {
	// Name is the blob.
	Name string
	// Holder is what the holder recorded when it took the lease (a daemon
	// ID or host name), or "" if it has not recorded anything yet.
	Holder string
	// State is the lease state Azure reported ("leased", "breaking").
	State string
}

func (e *LeasedError) Error() string {
	holder := e.Holder
	if holder == "" {
		holder = "an unknown holder"
	}
	return fmt.Sprintf("blobstore: %s is leased by %s (lease %s)", e.Name, holder, e.State)
}

// Is makes errors.Is(err, ErrLeased) true.
func (e *LeasedError) Is(target error) bool { return target == ErrLeased }

// leaseCodes are the service errors that mean the lease this Store presented
// is not (or no longer) the blob's active lease.
var leaseCodes = []bloberror.Code{
	bloberror.LeaseIDMismatchWithBlobOperation,
	bloberror.LeaseIDMismatchWithLeaseOperation,
	bloberror.LeaseNotPresentWithBlobOperation,
	bloberror.LeaseNotPresentWithLeaseOperation,
	bloberror.LeaseIsBrokenAndCannotBeRenewed,
	bloberror.LeaseIsBreakingAndCannotBeAcquired,
	bloberror.LeaseIsBreakingAndCannotBeChanged,
	bloberror.LeaseLost,
}

func isLeaseError(err error) bool { return bloberror.HasCode(err, leaseCodes...) }

// ioError classifies a failed service call for the NBD layer: a missing
// blob is ENOENT (which matches fs.ErrNotExist) and anything else EIO, with the service error kept for
// logs. Context errors pass through unchanged.
func ioError(op string, err error) error {
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("blobstore: %s: %w", op, err)
	case bloberror.HasCode(err, bloberror.BlobNotFound, bloberror.ContainerNotFound):
		return fmt.Errorf("blobstore: %s: %w: %w", op, syscall.ENOENT, err)
	}
	return fmt.Errorf("blobstore: %s: %w: %w", op, syscall.EIO, err)
}
