package main_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestNbdinfoCapabilities checks what libnbd sees: every capability the
// server claims, block sizes, and NBD_OPT_LIST with descriptions.
func TestNbdinfoCapabilities(t *testing.T) {
	t.Parallel()
	need(t, "libnbd-bin", "nbdinfo")
	d := startDaemon(t, daemonOpts{Demo: "demo", Disks: []diskSpec{
		{Name: "alpha", Size: "64M"},
		{Name: "beta-512", Size: "32M", SectorSize: 512},
	}})

	r := mustRun(t, "nbdinfo", "--json", d.URI("demo"))
	var info struct {
		Protocol   string `json:"protocol"`
		Structured bool   `json:"structured"`
		Exports    []map[string]any
	}
	if err := json.Unmarshal([]byte(r.Stdout), &info); err != nil {
		t.Fatalf("nbdinfo --json: %v\n%s", err, r.Stdout)
	}
	if info.Protocol != "newstyle-fixed" {
		t.Errorf("protocol %q, want newstyle-fixed", info.Protocol)
	}
	if !info.Structured {
		t.Errorf("structured replies not negotiated")
	}
	if len(info.Exports) != 1 {
		t.Fatalf("nbdinfo on one export listed %d exports", len(info.Exports))
	}
	e := info.Exports[0]
	for _, k := range []string{"can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_multi_conn"} {
		if got, ok := e[k].(bool); !ok || !got {
			t.Errorf("%s = %v, want true", k, e[k])
		}
	}
	if got, ok := e["is_read_only"].(bool); !ok || got {
		t.Errorf("is_read_only = %v, want false", e["is_read_only"])
	}
	if got, _ := e["export-size"].(float64); got != 64<<20 {
		t.Errorf("export-size %v, want %d", e["export-size"], 64<<20)
	}
	var sizes [3]float64
	for i, k := range []string{"block_size_minimum", "block_size_preferred", "block_size_maximum"} {
		v, ok := e[k].(float64)
		if !ok || v <= 0 {
			t.Errorf("%s = %v, want a positive number", k, e[k])
		}
		sizes[i] = v
	}
	if !(sizes[0] <= sizes[1] && sizes[1] <= sizes[2]) {
		t.Errorf("block sizes min %v, preferred %v, max %v are not ordered", sizes[0], sizes[1], sizes[2])
	}
	if sizes[2] < 32<<20 {
		t.Errorf("maximum block size %v, want at least 32 MiB", sizes[2])
	}

	// Each capability alone, the way scripts check it (exit 0 = yes).
	for _, c := range []string{"flush", "fua", "trim", "zero", "fast-zero", "cache", "multi-conn", "structured-reply"} {
		if r := runCmd(t, "nbdinfo", "--can", c, d.URI("demo")); r.Code != 0 {
			t.Errorf("nbdinfo --can %s: %v", c, r)
		}
	}
	if r := runCmd(t, "nbdinfo", "--is", "read-only", d.URI("demo")); r.Code != 2 {
		t.Errorf("nbdinfo --is read-only: exit %d, want 2 (no)", r.Code)
	}

	r = mustRun(t, "nbdinfo", "--list", "--json", fmt.Sprintf("nbd+unix:///?socket=%s", d.Sock))
	var list struct {
		Exports []struct {
			Name        string  `json:"export-name"`
			Description string  `json:"description"`
			Size        float64 `json:"export-size"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(r.Stdout), &list); err != nil {
		t.Fatalf("nbdinfo --list --json: %v\n%s", err, r.Stdout)
	}
	want := map[string]struct {
		size int64
		desc []string
	}{
		"alpha":    {64 << 20, []string{"64 MiB", "4096-byte sectors"}},
		"beta-512": {32 << 20, []string{"32 MiB", "512-byte sectors"}},
		"demo":     {64 << 20, []string{"64 MiB", "4096-byte sectors"}},
	}
	got := map[string]bool{}
	for _, x := range list.Exports {
		got[x.Name] = true
		w, ok := want[x.Name]
		if !ok {
			t.Errorf("unexpected export %q listed", x.Name)
			continue
		}
		if int64(x.Size) != w.size {
			t.Errorf("export %s: size %v, want %d", x.Name, x.Size, w.size)
		}
		for _, s := range w.desc {
			if !strings.Contains(x.Description, s) {
				t.Errorf("export %s: description %q lacks %q", x.Name, x.Description, s)
			}
		}
	}
	for name := range want {
		if !got[name] {
			t.Errorf("export %s missing from nbdinfo --list", name)
		}
	}
}

// qemuIO runs qemu-io on an export with the given commands.
func qemuIO(t *testing.T, uri string, cmds ...string) result {
	t.Helper()
	args := []string{"-f", "raw", uri}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	return runCmd(t, "qemu-io", args...)
}

// qemuIOOK runs qemu-io and fails the test unless every command succeeded:
// qemu-io exits 1 when a command fails, and prints "Pattern verification
// failed" when read -P finds other data.
func qemuIOOK(t *testing.T, uri string, cmds ...string) {
	t.Helper()
	r := qemuIO(t, uri, cmds...)
	if r.Code != 0 || strings.Contains(r.Stdout+r.Stderr, "failed") {
		t.Fatalf("qemu-io %q: %v", cmds, r)
	}
}

// TestQemuIO writes and reads patterns with qemu (its own NBD client),
// aligned and unaligned, with discard and write-zeroes, across a reconnect.
func TestQemuIO(t *testing.T) {
	t.Parallel()
	need(t, "qemu-utils", "qemu-io")
	d := startDaemon(t, daemonOpts{Demo: "demo"})
	u := d.URI("demo")

	qemuIOOK(t, u,
		"write -P 0xab 0 1M", "flush", "read -P 0xab 0 1M",
		// Unaligned small writes inside the 4096-byte sectors just written.
		"write -P 0x11 1536 512", "write -P 0x22 3000 1000", "write -P 0x33 4095 2",
		"read -P 0xab 0 1536", "read -P 0x11 1536 512", "read -P 0xab 2048 952",
		"read -P 0x22 3000 1000", "read -P 0xab 4000 95", "read -P 0x33 4095 2",
		"read -P 0xab 4097 8191",
		// Write-zeroes and discard; a discarded range reads as zeros (cryptodisk's contract).
		"write -z 64k 128k", "read -P 0 64k 128k", "read -P 0xab 192k 64k",
		"discard 512k 256k", "read -P 0 512k 256k", "read -P 0xab 768k 256k",
		// Unaligned write-zeroes needs read-modify-write at both ends.
		"write -z 1000 100", "read -P 0x22 3000 1000",
		"write -P 0x44 10M 3M", "flush",
	)
	// A fresh connection sees the same data.
	qemuIOOK(t, u,
		"read -P 0xab 0 1000", "read -P 0 1000 100", "read -P 0xab 1100 436",
		"read -P 0x11 1536 512", "read -P 0x22 3000 1000", "read -P 0x33 4095 2",
		"read -P 0 64k 128k", "read -P 0 512k 256k", "read -P 0x44 10M 3M",
		"read -P 0 13M 1M",
	)

	// The checks above can fail: a wrong pattern is reported, exit 1.
	r := qemuIO(t, u, "read -P 0xac 0 4k")
	if r.Code != 1 || !strings.Contains(r.Stdout+r.Stderr, "Pattern verification failed") {
		t.Errorf("read -P with a wrong pattern: want exit 1 and \"Pattern verification failed\", got %v", r)
	}
}

// TestQemuImgConvertRoundTrip copies a file onto the disk with qemu-img and
// back out, bytes equal.
func TestQemuImgConvertRoundTrip(t *testing.T) {
	t.Parallel()
	need(t, "qemu-utils", "qemu-img")
	d := startDaemon(t, daemonOpts{Demo: "demo", DemoSize: "32M"})
	dir := t.TempDir()
	src, want := randomFile(t, dir, 32<<20, 3)
	// Leave the last 4 MiB zero so that qemu-img's zero detection (which
	// sends WRITE_ZEROES) and data must both land right.
	clear(want[28<<20:])
	if err := os.WriteFile(src, want, 0o600); err != nil {
		t.Fatal(err)
	}
	// Dirty the disk first, so that zero runs read back as zeros only if
	// they were really written.
	mustRun(t, "qemu-io", "-f", "raw", d.URI("demo"), "-c", "write -P 0x5a 0 32M")

	mustRun(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, d.URI("demo"))
	out := filepath.Join(dir, "out.raw")
	mustRun(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", d.URI("demo"), out)
	if got := readFile(t, out); !bytes.Equal(got, want) {
		t.Errorf("qemu-img round trip: %s", firstDiff(got, want))
	}
	r := mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, d.URI("demo"))
	if !strings.Contains(r.Stdout, "identical") {
		t.Errorf("qemu-img compare: %v", r)
	}
}

// TestNbdcopyRoundTrip copies a file onto the disk with nbdcopy (several
// connections, --flush) and back, checked by SHA-256.
func TestNbdcopyRoundTrip(t *testing.T) {
	t.Parallel()
	need(t, "libnbd-bin", "nbdcopy")
	d := startDaemon(t, daemonOpts{Demo: "demo", DemoSize: "32M"})
	dir := t.TempDir()
	src, want := randomFile(t, dir, 32<<20, 4)
	mustRun(t, "nbdcopy", "--flush", "--connections=4", "--requests=16", src, d.URI("demo"))
	out := filepath.Join(dir, "out.raw")
	mustRun(t, "nbdcopy", d.URI("demo"), out)
	if got, w := sha256.Sum256(readFile(t, out)), sha256.Sum256(want); got != w {
		t.Errorf("nbdcopy round trip: sha256 %x, want %x", got, w)
	}

	// Again over a restarted daemon: what --flush made stable is still there.
	d.Restart()
	out2 := filepath.Join(dir, "out2.raw")
	mustRun(t, "nbdcopy", "--synchronous", d.URI("demo"), out2)
	if got := readFile(t, out2); !bytes.Equal(got, want) {
		t.Errorf("after restart: %s", firstDiff(got, want))
	}
}
