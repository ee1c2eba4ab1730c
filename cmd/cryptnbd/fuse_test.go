package main_test

import (
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// nbdfuseMount exposes an export as the file dir/disk with nbdfuse, and
// returns that path and a function that unmounts it and waits for nbdfuse
// to exit (also registered as cleanup, where it is harmless if already run).
func nbdfuseMount(t *testing.T, dir, uri string, size int64) (string, func()) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	cmd := exec.Command("nbdfuse", filepath.Join(dir, "disk"), uri)
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("nbdfuse: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	stopped := false
	var exitErr error
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		exec.Command("fusermount3", "-u", dir).Run()
		select {
		case exitErr = <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			exec.Command("fusermount3", "-uz", dir).Run()
			exitErr = <-done
			t.Errorf("nbdfuse did not exit after fusermount3 -u; killed. Output:\n%s", logs.String())
		}
		if exitErr != nil {
			t.Errorf("nbdfuse exited with %v:\n%s", exitErr, logs.String())
		}
	}
	t.Cleanup(stop)
	p := filepath.Join(dir, "disk")
	deadline := time.Now().Add(20 * time.Second)
	for {
		var st syscall.Statfs_t
		fi, err := os.Stat(p)
		// FUSE_SUPER_MAGIC: the file is served by nbdfuse, not a leftover.
		if err == nil && syscall.Statfs(dir, &st) == nil && st.Type == 0x65735546 {
			if fi.Size() != size {
				t.Fatalf("nbdfuse file is %d bytes, want %d", fi.Size(), size)
			}
			return p, stop
		}
		select {
		case err := <-done:
			t.Fatalf("nbdfuse exited early: %v\n%s", err, logs.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("nbdfuse file %s did not appear:\n%s", p, logs.String())
		}
	}
}

// loopMount mounts an ext4 image file with mount -o loop and registers a
// lazy unmount as cleanup. It returns the unmount function.
func loopMount(t *testing.T, image, dir string) func() {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	r := runCmd(t, "mount", "-o", "loop", image, dir)
	if r.Code != 0 {
		t.Fatalf("mount -o loop %s: %v", image, r)
	}
	mounted := true
	umount := func() {
		if mounted {
			mounted = false
			if r := runCmd(t, "umount", dir); r.Code != 0 {
				t.Errorf("umount: %v", r)
				exec.Command("umount", "-l", dir).Run()
			}
		}
	}
	t.Cleanup(umount)
	return umount
}

// canLoopMount reports whether this machine can loop-mount an ext4 file at
// all (it needs root and loop devices), by trying with a plain file.
func canLoopMount(t *testing.T) (bool, string) {
	t.Helper()
	if os.Geteuid() != 0 {
		return false, "needs root"
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return false, "no /dev/fuse"
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "probe.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 8<<20); err != nil {
		t.Fatal(err)
	}
	if r := runCmd(t, "mkfs.ext4", "-q", "-F", img); r.Code != 0 {
		t.Fatalf("mkfs.ext4 on a plain file: %v", r)
	}
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o700)
	if r := runCmd(t, "mount", "-o", "loop", img, mnt); r.Code != 0 {
		return false, "mount -o loop of a plain file fails here: " + strings.TrimSpace(r.Stderr)
	}
	runCmd(t, "umount", mnt)
	return true, ""
}

// TestNbdfuseExt4 puts a kernel filesystem on the disk: nbdfuse exposes
// the export as a file, mkfs.ext4 formats it, a loop mount writes files
// with fsync. After unmounting and restarting the daemon, e2fsck finds the
// filesystem clean and the files read back identical.
func TestNbdfuseExt4(t *testing.T) {
	t.Parallel()
	need(t, "nbdfuse", "nbdfuse")
	need(t, "fuse3", "fusermount3")
	need(t, "e2fsprogs", "mkfs.ext4", "e2fsck")
	need(t, "mount", "mount", "umount")
	if ok, why := canLoopMount(t); !ok {
		t.Skipf("cannot loop-mount here (%s); this test needs root, /dev/fuse and loop devices", why)
	}
	const size = 128 << 20
	d := startDaemon(t, daemonOpts{Demo: "demo", DemoSize: "128M"})
	dir := shortTempDir(t)
	fuseDir, mnt := filepath.Join(dir, "fuse"), filepath.Join(dir, "mnt")

	disk, unfuse := nbdfuseMount(t, fuseDir, d.URI("demo"), size)
	mustRun(t, "mkfs.ext4", "-q", "-F", "-L", "cryptnbd", disk)
	umount := loopMount(t, disk, mnt)
	files := map[string][]byte{}
	for i, n := range []int{5, 100 << 10, 3 << 20, 8<<20 + 123} {
		b := make([]byte, n)
		fillRandom(b, uint64(100+i))
		name := fmt.Sprintf("sub/file-%d", i)
		if i == 0 {
			name = "hello.txt"
			b = []byte("hi!\n\x00")
		}
		files[name] = b
		p := filepath.Join(mnt, name)
		os.MkdirAll(filepath.Dir(p), 0o700)
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.Write(b); err != nil {
			t.Fatal(err)
		}
		if err := f.Sync(); err != nil { // fsync, like dd conv=fsync
			t.Fatalf("fsync %s: %v", name, err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
	}
	mustRun(t, "sync", "-f", mnt)
	umount()
	unfuse()

	d.Restart()

	disk, unfuse = nbdfuseMount(t, fuseDir, d.URI("demo"), size)
	if r := runCmd(t, "e2fsck", "-f", "-n", disk); r.Code != 0 {
		t.Errorf("e2fsck -f -n after restart: %v", r)
	}
	umount = loopMount(t, disk, mnt)
	for name, want := range files {
		got, err := os.ReadFile(filepath.Join(mnt, name))
		if err != nil {
			t.Errorf("after restart: %v", err)
			continue
		}
		if sha256.Sum256(got) != sha256.Sum256(want) {
			t.Errorf("after restart, %s: %s", name, firstDiff(got, want))
		}
	}
	umount()
	unfuse()
}
