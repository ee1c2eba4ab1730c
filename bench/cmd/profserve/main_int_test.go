package main

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/filestore"
	"github.com/cryptnbd/cryptnbd/keys"
)

// TestServeAndProfile serves a fresh disk, checks its size with nbdinfo
// and that a SIGUSR1/SIGUSR2 pair leaves a non-empty profile.
func TestServeAndProfile(t *testing.T) {
	nbdinfo, err := exec.LookPath("nbdinfo")
	if err != nil {
		t.Skip("nbdinfo not installed (Debian package libnbd-bin)")
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir := t.TempDir()
	const size = 8 << 20
	p, err := keys.OpenPlatform(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "disks"), 0o700); err != nil {
		t.Fatal(err)
	}
	store, err := filestore.Create(filepath.Join(dir, "disks", "t.luks"), 0)
	if err != nil {
		t.Fatal(err)
	}
	d, err := cryptodisk.Create(ctx, store, p, cryptodisk.CreateOptions{SizeBytes: size, Provider: keys.PlatformName, PBKDFIterations: 1000}, cryptodisk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	p.Close()

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sig := make(chan os.Signal)
	prefix := filepath.Join(dir, "cpu")
	errc := make(chan error, 1)
	go func() { errc <- run(ctx, l, dir, "t", sig, prefix) }()

	sig <- syscall.SIGUSR1
	out, err := exec.CommandContext(ctx, nbdinfo, "--size", "nbd://"+l.Addr().String()+"/t").CombinedOutput()
	if err != nil {
		t.Fatalf("nbdinfo: %v: %s", err, out)
	}
	if got, _ := strconv.Atoi(strings.TrimSpace(string(out))); got != size {
		t.Errorf("export size = %s, want %d", out, size)
	}
	sig <- syscall.SIGUSR2
	sig <- syscall.SIGUSR1 // processed only after the first profile is written
	var st os.FileInfo
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if st, err = os.Stat(prefix + ".1.pprof"); err == nil {
			break
		}
	}
	if err != nil || st.Size() == 0 {
		t.Errorf("profile 1: %v", err)
	}

	cancel()
	if err := <-errc; err != nil {
		t.Errorf("run: %v", err)
	}
	// The profile running at shutdown is written too.
	if _, err := os.Stat(prefix + ".2.pprof"); err != nil {
		t.Errorf("profile 2: %v", err)
	}
}
