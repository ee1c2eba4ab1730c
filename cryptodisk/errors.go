package cryptodisk

import "errors"

var (
	// ErrWrongKey means the unwrapped secret does not belong to this disk:
	// the wrong key version, or a token copied from another disk.
	ErrWrongKey = errors.New("cryptodisk: unwrapped secret does not match this disk")
	// ErrNotCryptnbd means the image is LUKS2 but has no usable cryptnbd token.
	ErrNotCryptnbd = errors.New("cryptodisk: image has no cryptnbd key token")
	// ErrClosed is returned for I/O on a closed disk.
	ErrClosed = errors.New("cryptodisk: disk is closed")
	// ErrSuspended is returned when a request was held for the whole
	// suspend-hold time, or its context ended while the disk was suspended.
	ErrSuspended = errors.New("cryptodisk: disk is suspended")
)
