package main_test

// Acceptance tests of --store azblob against Azurite, the Azure Storage
// emulator, which deploy/azurite/run.sh installs (pinned, with npm, into
// the ignored .cache/azurite) and starts. One Azurite serves the package;
// each test uses its own container.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/lease"

	"github.com/cryptnbd/cryptnbd/cryptodisk/blobstore"
	"github.com/cryptnbd/cryptnbd/cryptodisk/blobstore/azuritetest"
)

// azurite is the package's emulator, started by the first test needing it
// and stopped from TestMain.
var azurite azuritetest.Shared

var azContainers atomic.Int64

// azStore starts Azurite if needed and returns a fresh container's name,
// its client and the daemon flags and environment that put disks there.
func azStore(t *testing.T, lease string) (string, *container.Client, []string, []string) {
	t.Helper()
	connStr := azurite.ConnString(t)
	sc, err := blobstore.NewServiceClientFromConnectionString(connStr)
	if err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("cryptnbd-%d-%03d", os.Getpid(), azContainers.Add(1))
	flags := []string{"--store", "azblob", "--azblob-container", name}
	if lease != "" {
		flags = append(flags, "--lease-duration", lease)
	}
	env := []string{"CRYPTNBD_AZBLOB_CONNECTION_STRING=" + connStr}
	return name, sc.NewContainerClient(name), flags, env
}

// azDaemon starts a daemon on the container with a demo disk.
func azDaemon(t *testing.T, flags, env []string, demo, size string, extra ...string) *testDaemon {
	t.Helper()
	return startDaemon(t, daemonOpts{Demo: demo, DemoSize: size, Extra: append(append([]string{}, flags...), extra...), Env: env})
}

// samePlatformKey makes a data directory share from's platform key, as
// daemons serving each other's platform-key disks must.
func samePlatformKey(t *testing.T, from *testDaemon) func(string) {
	key := readFile(t, filepath.Join(from.DataDir, "platform-key.json"))
	return func(dataDir string) {
		if err := os.WriteFile(filepath.Join(dataDir, "platform-key.json"), key, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// download reads a whole blob with the SDK.
func download(t *testing.T, c *container.Client, name string) []byte {
	t.Helper()
	resp, err := c.NewBlobClient(name).DownloadStream(context.Background(), nil)
	if err != nil {
		t.Fatalf("download %s: %v", name, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("download %s: %v", name, err)
	}
	return b
}

// azShow runs `disk show -o json` against a daemon.
func azShow(t *testing.T, d *testDaemon, name string) map[string]any {
	t.Helper()
	r := d.CLI("disk", "show", name, "-o", "json")
	if r.Code != 0 {
		t.Fatalf("disk show %s: %v", name, r)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(r.Stdout), &m); err != nil {
		t.Fatalf("disk show %s: %v\n%s", name, err, r.Stdout)
	}
	return m
}

func daemonIDOf(t *testing.T, d *testDaemon) string {
	t.Helper()
	return strings.TrimSpace(string(readFile(t, filepath.Join(d.DataDir, "daemon-id"))))
}

// TestAzblobInterop runs the foundation's client checks on a disk in a
// page blob: qemu-io patterns, an nbdcopy round trip over four
// connections, fio verification over four connections, and then checks
// the blob itself holds no plaintext.
func TestAzblobInterop(t *testing.T) {
	t.Parallel()
	need(t, "qemu-utils", "qemu-io")
	need(t, "libnbd-bin", "nbdcopy")
	need(t, "fio", "fio")
	_, c, flags, env := azStore(t, "")
	d := azDaemon(t, flags, env, "demo", "48M")
	u := d.URI("demo")

	t.Run("qemu-io", func(t *testing.T) {
		qemuIOOK(t, u,
			"write -P 0xab 0 1M", "flush", "read -P 0xab 0 1M",
			"write -P 0x11 1536 512", "write -P 0x22 3000 1000", "write -P 0x33 4095 2",
			"read -P 0xab 0 1536", "read -P 0x11 1536 512", "read -P 0x22 3000 1000", "read -P 0x33 4095 2",
			"write -z 64k 128k", "read -P 0 64k 128k", "discard 512k 256k", "read -P 0 512k 256k",
			"read -P 0xab 768k 256k", "flush")
		qemuIOOK(t, u, "read -P 0x11 1536 512", "read -P 0 512k 256k", "read -P 0xab 768k 256k")
	})
	t.Run("nbdcopy", func(t *testing.T) {
		dir := t.TempDir()
		src, want := randomFile(t, dir, 16<<20, 41)
		mustRun(t, "nbdcopy", "--flush", "--connections=4", "--requests=16", src, u)
		out := filepath.Join(dir, "out.raw")
		mustRun(t, "nbdcopy", u, out)
		// The disk is larger than the file; compare the copied part.
		if got := readFile(t, out)[:len(want)]; sha256.Sum256(got) != sha256.Sum256(want) {
			t.Errorf("nbdcopy round trip: %s", firstDiff(got, want))
		}
	})
	t.Run("fio", func(t *testing.T) {
		const region = 2 << 20
		jobs := runFio(t, u, "--rw=randwrite", "--bs=4k", "--iodepth=16", "--numjobs=4",
			fmt.Sprintf("--offset=%d", 24<<20), fmt.Sprintf("--size=%d", region), fmt.Sprintf("--offset_increment=%d", region))
		checkFio(t, jobs, 4, region, region)
	})
	t.Run("no-plaintext", func(t *testing.T) {
		marker := []byte("CRYPTNBD-PLAINTEXT-MARKER-0123456789/")
		plain := bytes.Repeat(marker, (1<<20)/len(marker)+1)[:1<<20]
		p := filepath.Join(t.TempDir(), "marker.raw")
		if err := os.WriteFile(p, plain, 0o600); err != nil {
			t.Fatal(err)
		}
		mustRun(t, "nbdcopy", "--flush", p, u)
		// The pattern reads back through NBD ...
		back := filepath.Join(t.TempDir(), "back.raw")
		mustRun(t, "nbdcopy", u, back)
		if !bytes.Equal(readFile(t, back)[:len(plain)], plain) {
			t.Fatal("the marker did not read back through NBD")
		}
		// ... but the blob holds only the LUKS2 header and ciphertext.
		blob := download(t, c, "demo")
		if !bytes.HasPrefix(blob, []byte("LUKS\xba\xbe")) {
			t.Fatalf("blob does not start with a LUKS2 header: % x", blob[:8])
		}
		if i := bytes.Index(blob, marker[:16]); i >= 0 {
			t.Errorf("plaintext found in the blob at byte %d", i)
		}
		if bytes.Contains(blob, bytes.Repeat([]byte{0xab}, 64)) {
			t.Errorf("the qemu-io pattern 0xab is in the blob in plaintext")
		}
	})
}

// TestAzblobTwoDaemons: two daemons on one container each serve their own
// disk and list both; the second refuses the first's disk, naming it; after
// the first is killed -9, the second takes the disk over once the lease
// expires, and every write flushed before the kill is there.
func TestAzblobTwoDaemons(t *testing.T) {
	t.Parallel()
	need(t, "qemu-utils", "qemu-io")
	_, _, flags, env := azStore(t, "15s")
	a := azDaemon(t, flags, env, "alpha", "16M")
	b := startDaemon(t, daemonOpts{Demo: "beta", DemoSize: "16M", Extra: flags, Env: env, Prepare: samePlatformKey(t, a)})
	idA, idB := daemonIDOf(t, a), daemonIDOf(t, b)
	if idA == idB {
		t.Fatalf("both daemons have ID %q", idA)
	}

	for _, d := range []*testDaemon{a, b} {
		r := d.CLI("disk", "list", "-o", "json")
		var disks []struct {
			Name, State, ServedBy, LeaseState string
		}
		if err := json.Unmarshal([]byte(r.Stdout), &disks); err != nil || r.Code != 0 {
			t.Fatalf("disk list: %v %v", err, r)
		}
		got := map[string]string{}
		for _, x := range disks {
			got[x.Name] = x.ServedBy + "/" + x.LeaseState
		}
		want := map[string]string{"alpha": idA + "/leased", "beta": idB + "/leased"}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("disk list on %s: got %v, want %v", daemonIDOf(t, d), got, want)
		}
	}
	if s := azShow(t, b, "alpha"); s["state"] != "Detached" {
		t.Errorf("alpha on the second daemon: state %v, want Detached", s["state"])
	}

	// Data the first daemon acknowledged and flushed.
	qemuIOOK(t, a.URI("alpha"), "write -P 0x5c 0 2M", "write -P 0x6d 5M 3000", "flush")

	r := b.CLI("disk", "attach", "alpha", "--no-wait")
	if r.Code == 0 || !strings.Contains(r.Stderr, idA) {
		t.Errorf("attach of a served disk: want a refusal naming %s, got %v", idA, r)
	}
	if r := qemuIO(t, b.URI("alpha"), "read 0 4k"); r.Code == 0 {
		t.Errorf("the second daemon served alpha while the first held it: %v", r)
	}

	a.Kill()
	start := time.Now()
	r = b.CLI("disk", "attach", "alpha", "-o", "json")
	if r.Code != 0 {
		t.Fatalf("attach after the holder died: %v", r)
	}
	t.Logf("took over alpha %v after the kill", time.Since(start).Round(time.Millisecond))
	qemuIOOK(t, b.URI("alpha"), "read -P 0x5c 0 2M", "read -P 0x6d 5M 3000", "read -P 0 2M 3M")
	if s := azShow(t, b, "alpha"); s["servedBy"] != idB || s["state"] != "Active" {
		t.Errorf("after takeover: servedBy %v state %v, want %s Active", s["servedBy"], s["state"], idB)
	}
	// The takeover is kept over a restart of the second daemon.
	b.Restart()
	qemuIOOK(t, b.URI("alpha"), "read -P 0x5c 0 4k")
}

// TestAzblobLeaseBroken: a daemon whose lease is broken from outside stops
// writing at once (nothing it writes after the break reaches the blob) and
// shows the disk suspended with reason LeaseLost.
func TestAzblobLeaseBroken(t *testing.T) {
	t.Parallel()
	need(t, "qemu-utils", "qemu-io")
	_, c, flags, env := azStore(t, "15s")
	d := azDaemon(t, flags, env, "demo", "8M", "--suspend-hold", "1s", "--metrics-listen", "127.0.0.1:0")
	qemuIOOK(t, d.URI("demo"), "write -P 0x42 0 1M", "flush")

	zero := int32(0)
	lc, err := lease.NewBlobClient(c.NewPageBlobClient("demo"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lc.BreakLease(context.Background(), &lease.BlobBreakOptions{BreakPeriod: &zero}); err != nil {
		t.Fatalf("break lease: %v", err)
	}
	before := download(t, c, "demo")

	r := qemuIO(t, d.URI("demo"), "write -P 0x43 0 1M", "flush", "write -P 0x44 2M 64k", "flush")
	if r.Code == 0 && !strings.Contains(r.Stdout+r.Stderr, "failed") {
		t.Errorf("writes after the lease was broken succeeded: %v", r)
	}
	if after := download(t, c, "demo"); !bytes.Equal(after, before) {
		t.Errorf("the blob changed after its lease was broken: %s", firstDiff(after, before))
	}
	s := azShow(t, d, "demo")
	if s["state"] != "Suspended" || s["stateReason"] != "LeaseLost" {
		t.Errorf("after the break: state %v (%v), want Suspended (LeaseLost)", s["state"], s["stateReason"])
	}
	_, scrape := httpGet(t, "http://"+d.metricsAddr(t)+"/metrics")
	if v := sample(scrape, `cryptnbd_disk_suspended{disk="demo",reason="LeaseLost"}`); v != 1 {
		t.Errorf(`cryptnbd_disk_suspended{disk="demo",reason="LeaseLost"} = %v, want 1`, v)
	}

	// A daemon with --takeover picks the orphaned disk up on its own, with
	// the data written before the break.
	b := startDaemon(t, daemonOpts{Extra: append(append([]string{}, flags...), "--takeover"), Env: env, Prepare: samePlatformKey(t, d)})
	idB := daemonIDOf(t, b)
	deadline := time.Now().Add(20 * time.Second)
	for {
		s := azShow(t, b, "demo")
		if s["state"] == "Active" && s["servedBy"] == idB {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("--takeover did not pick up the broken disk: %v", s)
		}
		time.Sleep(500 * time.Millisecond)
	}
	qemuIOOK(t, b.URI("demo"), "read -P 0x42 0 1M")
}

// TestAzblobSnapshot: a snapshot of a disk in a page blob is a blob
// snapshot, served read-only as DISK@SNAP with the data of its moment, and
// a disk made from it (same volume key) has that data too.
func TestAzblobSnapshot(t *testing.T) {
	t.Parallel()
	need(t, "qemu-utils", "qemu-io")
	_, c, flags, env := azStore(t, "")
	d := azDaemon(t, flags, env, "demo", "8M")
	qemuIOOK(t, d.URI("demo"), "write -P 0x21 0 1M", "flush")
	if r := d.CLI("snapshot", "create", "s1", "--source", "demo"); r.Code != 0 {
		t.Fatalf("snapshot create: %v", r)
	}
	qemuIOOK(t, d.URI("demo"), "write -P 0x22 0 1M", "flush")

	if r := runCmd(t, "qemu-io", "-r", "-f", "raw", d.URI("demo@s1"), "-c", "read -P 0x21 0 1M"); r.Code != 0 || strings.Contains(r.Stdout, "failed") {
		t.Errorf("read of the snapshot: %v", r)
	}
	writeRefusedByServer(t, d.URI("demo@s1"))
	if r := d.CLI("disk", "create", "copy", "--source", "demo@s1"); r.Code != 0 {
		t.Fatalf("disk create --source: %v", r)
	}
	qemuIOOK(t, d.URI("copy"), "read -P 0x21 0 1M", "write -P 0x24 0 4k", "flush", "read -P 0x24 0 4k")
	qemuIOOK(t, d.URI("demo"), "read -P 0x22 0 1M")

	if r := d.CLI("snapshot", "delete", "demo@s1"); r.Code != 0 {
		t.Fatalf("snapshot delete: %v", r)
	}
	if r := runCmd(t, "qemu-io", "-r", "-f", "raw", d.URI("demo@s1"), "-c", "read 0 4k"); r.Code == 0 {
		t.Errorf("the deleted snapshot is still served: %v", r)
	}
	// The disk, and its catalog entry, go with delete.
	if r := d.CLI("disk", "delete", "copy"); r.Code != 0 {
		t.Fatalf("disk delete: %v", r)
	}
	if _, err := c.NewBlobClient("copy").GetProperties(context.Background(), nil); err == nil {
		t.Errorf("the deleted disk's blob still exists")
	}
}

// TestAzblobNbdfuseExt4: a kernel ext4 on a disk in a page blob, through
// nbdfuse and a loop mount; after a daemon restart e2fsck finds it clean
// and the files read back.
func TestAzblobNbdfuseExt4(t *testing.T) {
	t.Parallel()
	need(t, "nbdfuse", "nbdfuse")
	need(t, "fuse3", "fusermount3")
	need(t, "e2fsprogs", "mkfs.ext4", "e2fsck")
	need(t, "mount", "mount", "umount")
	if ok, why := canLoopMount(t); !ok {
		t.Skipf("cannot loop-mount here (%s); this test needs root, /dev/fuse and loop devices", why)
	}
	const size = 64 << 20
	_, _, flags, env := azStore(t, "")
	d := azDaemon(t, flags, env, "demo", "64M")
	dir := shortTempDir(t)
	fuseDir, mnt := filepath.Join(dir, "fuse"), filepath.Join(dir, "mnt")

	disk, unfuse := nbdfuseMount(t, fuseDir, d.URI("demo"), size)
	mustRun(t, "mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", disk)
	umount := loopMount(t, disk, mnt)
	want := make([]byte, 3<<20+77)
	fillRandom(want, 7)
	if err := os.WriteFile(filepath.Join(mnt, "data.bin"), want, 0o600); err != nil {
		t.Fatal(err)
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
	if got := readFile(t, filepath.Join(mnt, "data.bin")); !bytes.Equal(got, want) {
		t.Errorf("after restart: %s", firstDiff(got, want))
	}
	umount()
	unfuse()
}
