package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// Clone methods, as cloneFile reports them.
const (
	cloneReflink = "reflink"
	cloneSparse  = "sparse-copy"
)

// cloneFile makes dst (which must not exist) a copy of src: a reflink where
// the filesystem shares extents (btrfs, XFS, bcachefs), otherwise a copy of
// the data extents only, found with SEEK_DATA/SEEK_HOLE and moved with
// copy_file_range, so holes stay holes. dst is not synced. On error dst is
// removed. It reports which method was used.
func cloneFile(ctx context.Context, src, dst string) (string, error) {
	in, err := os.Open(src)
	if err != nil {
		return "", err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return "", err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", err
	}
	method, err := cloneFD(ctx, int(out.Fd()), int(in.Fd()), st.Size())
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dst)
		return "", fmt.Errorf("clone %s: %w", src, err)
	}
	return method, nil
}

func cloneFD(ctx context.Context, dst, src int, size int64) (string, error) {
	if err := unix.IoctlFileClone(dst, src); err == nil {
		return cloneReflink, nil
	}
	// EOPNOTSUPP, EXDEV, EINVAL, ENOTTY: no sharing here; copy instead.
	if err := unix.Ftruncate(dst, size); err != nil {
		return "", err
	}
	var off int64
	for off < size {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		data, err := unix.Seek(src, off, unix.SEEK_DATA)
		if errors.Is(err, syscall.ENXIO) {
			break // only a hole up to EOF
		}
		if err != nil {
			return "", fmt.Errorf("seek data at %d: %w", off, err)
		}
		hole, err := unix.Seek(src, data, unix.SEEK_HOLE)
		if err != nil {
			return "", fmt.Errorf("seek hole at %d: %w", data, err)
		}
		hole = min(hole, size)
		if err := copyRange(ctx, dst, src, data, hole-data); err != nil {
			return "", err
		}
		off = hole
	}
	return cloneSparse, nil
}

// copyRange copies n bytes at off from src to the same offset in dst with
// copy_file_range, falling back to pread/pwrite where the kernel refuses.
func copyRange(ctx context.Context, dst, src int, off, n int64) error {
	roff, woff := off, off
	for n > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		c, err := unix.CopyFileRange(src, &roff, dst, &woff, int(min(n, 64<<20)), 0)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if errors.Is(err, syscall.ENOSYS) || errors.Is(err, syscall.EXDEV) || errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.EOPNOTSUPP) {
			return copySlow(ctx, dst, src, roff, n)
		}
		if err != nil {
			return fmt.Errorf("copy_file_range at %d: %w", roff, err)
		}
		if c == 0 {
			return fmt.Errorf("copy_file_range at %d: %w", roff, io.ErrUnexpectedEOF)
		}
		n -= int64(c)
	}
	return nil
}

func copySlow(ctx context.Context, dst, src int, off, n int64) error {
	buf := make([]byte, 1<<20)
	for n > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		b := buf[:min(n, int64(len(buf)))]
		r, err := unix.Pread(src, b, off)
		if err != nil {
			return fmt.Errorf("read at %d: %w", off, err)
		}
		if r == 0 {
			return fmt.Errorf("read at %d: %w", off, io.ErrUnexpectedEOF)
		}
		if _, err := unix.Pwrite(dst, b[:r], off); err != nil {
			return fmt.Errorf("write at %d: %w", off, err)
		}
		off, n = off+int64(r), n-int64(r)
	}
	return nil
}

// syncFile fsyncs the file at path.
func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}
