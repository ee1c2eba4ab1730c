package cryptodisktest

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TmpfsDir is a fresh directory on tmpfs, removed when tb ends. /dev/shm is
// one on every Linux system the tests run on. If it is not, what the
// caller wants to see happen there (a file lending its pages for writing)
// cannot, so that fails the test rather than skipping it.
func TmpfsDir(tb testing.TB) string {
	tb.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs("/dev/shm", &st); err != nil || st.Type != unix.TMPFS_MAGIC {
		tb.Fatalf("/dev/shm is not a tmpfs (statfs: %v, type %#x)", err, st.Type)
	}
	dir, err := os.MkdirTemp("/dev/shm", "cryptnbd-test-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}
