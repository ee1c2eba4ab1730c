package main_test

// Acceptance tests of the disk lifecycle: snapshots under load, disks made
// from snapshots, import and export, an interrupted import, online resize
// and crypto-shredding delete. Each drives the real binary and checks with
// independent tools (nbdcopy, nbdinfo, qemu-img, cryptsetup).

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cryptnbd/cryptnbd/cmd/cryptnbd/internal/nbdclient"
)

// diskJSON is the part of `disk show -o json` these tests read.
type diskJSON struct {
	Name                string            `json:"name"`
	SizeBytes           int64             `json:"sizeBytes"`
	Path                string            `json:"path"`
	SharesVolumeKeyWith []string          `json:"sharesVolumeKeyWith"`
	Properties          map[string]string `json:"properties"`
}

// cliJSON runs the CLI with -o json and decodes its output into v.
func (d *testDaemon) cliJSON(v any, args ...string) {
	d.t.Helper()
	r := d.CLI(append(args, "-o", "json")...)
	if r.Code != 0 {
		d.t.Fatalf("cryptnbd %s: %v", strings.Join(args, " "), r)
	}
	if err := json.Unmarshal([]byte(r.Stdout), v); err != nil {
		d.t.Fatalf("cryptnbd %s: output is not JSON: %v\n%s", strings.Join(args, " "), err, r.Stdout)
	}
}

// diskNames lists the disks `disk list` shows.
func (d *testDaemon) diskNames() []string {
	d.t.Helper()
	var disks []diskJSON
	d.cliJSON(&disks, "disk", "list")
	var out []string
	for _, x := range disks {
		out = append(out, x.Name)
	}
	return out
}

// cliCmd is an unstarted CLI command with --data-dir appended.
func (d *testDaemon) cliCmd(ctx context.Context, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, cryptnbdBin, append(args, "--data-dir", d.DataDir)...)
}

func sha256File(t *testing.T, p string) [32]byte {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	var s [32]byte
	copy(s[:], h.Sum(nil))
	return s
}

// allocated is a file's allocated size (st_blocks) and apparent size.
func allocated(t *testing.T, p string) (alloc, apparent int64) {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512, st.Size
}

// volumeKey is the LUKS2 volume key of image as cryptsetup dumps it with
// the keyslot secret in keyFile.
func volumeKey(t *testing.T, image, keyFile string) string {
	t.Helper()
	r := mustRun(t, "cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", keyFile, image)
	_, after, ok := strings.Cut(r.Stdout, "MK dump:")
	if !ok {
		t.Fatalf("no MK dump in cryptsetup's output:\n%s", r.Stdout)
	}
	return strings.Join(strings.Fields(after), "")
}

// patternBlock is what the snapshot test's writers put in a block: the
// block number and a generation, repeated.
const patternBlock = 4096

func fillPattern(b []byte, block uint32, gen uint64) {
	for i := 0; i+12 <= len(b); i += 12 {
		binary.LittleEndian.PutUint32(b[i:], block)
		binary.LittleEndian.PutUint64(b[i+4:], gen)
	}
}

// readPattern returns the generation a block holds (0 for a never-written,
// all-zero block) or an error if the block is not one whole generation.
func readPattern(b []byte, block uint32) (uint64, error) {
	if bytes.Equal(b, make([]byte, len(b))) {
		return 0, nil
	}
	gen := binary.LittleEndian.Uint64(b[4:])
	want := make([]byte, len(b))
	fillPattern(want, block, gen)
	if !bytes.Equal(b, want) {
		return 0, fmt.Errorf("block %d is torn or foreign (%s)", block, firstDiff(b, want))
	}
	return gen, nil
}

// TestSnapshotUnderWriteLoad: while fio writes and verifies one half of a
// disk and two writers put generation-numbered blocks in the other, a
// snapshot is taken, served read-only as DISK@SNAP and copied out with
// nbdcopy. Every block of the copy holds a generation at least as new as
// the last one acknowledged before the snapshot command started, and no
// newer than the last one issued before it returned.
func TestSnapshotUnderWriteLoad(t *testing.T) {
	t.Parallel()
	need(t, "fio", "fio")
	need(t, "libnbd-bin", "nbdcopy", "nbdinfo")
	d := startDaemon(t, daemonOpts{Disks: []diskSpec{{Name: "live", Size: "64M"}}})

	// fio on [32 MiB, 64 MiB), in the background.
	fioOut := filepath.Join(t.TempDir(), "fio.json")
	fio := exec.Command("fio", "--name=load", "--ioengine=nbd", "--uri="+d.URI("live"),
		"--rw=randwrite", "--bs=4k", "--iodepth=16", "--offset=32M", "--size=16M", "--loops=3",
		"--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0", "--output-format=json", "--output="+fioOut)
	var fioErr bytes.Buffer
	fio.Stderr = &fioErr
	if err := fio.Start(); err != nil {
		t.Fatal(err)
	}
	fioDone := make(chan error, 1)
	go func() { fioDone <- fio.Wait() }()

	// Pattern writers on the first 8 MiB: writer w owns blocks b with b%2 == w.
	const blocks = (8 << 20) / patternBlock
	var issued, acked [blocks]atomic.Uint64
	var writes atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	werrs := make(chan error, 2)
	for w := range 2 {
		c, err := nbdclient.Dial(context.Background(), d.URI("live"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		wg.Go(func() {
			buf := make([]byte, patternBlock)
			for gen := uint64(1); ; gen++ {
				for b := w; b < blocks; b += 2 {
					select {
					case <-stop:
						return
					default:
					}
					issued[b].Store(gen)
					fillPattern(buf, uint32(b), gen)
					if _, err := c.WriteAt(buf, int64(b)*patternBlock); err != nil {
						werrs <- err
						return
					}
					acked[b].Store(gen)
					writes.Add(1)
				}
			}
		})
	}
	// Let the writers get going: some writes acknowledged before the
	// snapshot, whatever the machine's speed.
	for deadline := time.Now().Add(30 * time.Second); writes.Load() < 50; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			close(stop)
			wg.Wait()
			t.Fatalf("pattern writers did only %d writes in 30s", writes.Load())
		}
	}
	var ackedBefore [blocks]uint64
	for i := range acked {
		ackedBefore[i] = acked[i].Load()
	}
	writesBefore := writes.Load()
	r := d.CLI("snapshot", "create", "snap", "--source", "live", "-o", "json")
	var issuedAfter [blocks]uint64
	for i := range issued {
		issuedAfter[i] = issued[i].Load()
	}
	if r.Code != 0 {
		close(stop)
		wg.Wait()
		t.Fatalf("snapshot create: %v", r)
	}
	// And some after it, so the load ran across the snapshot.
	for deadline, after := time.Now().Add(30*time.Second), writes.Load(); writes.Load() < after+50 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	close(werrs)
	for err := range werrs {
		t.Errorf("pattern writer: %v", err)
	}
	if writesBefore < 50 || writes.Load() <= writesBefore {
		t.Errorf("pattern writers did %d writes before the snapshot and %d in all: the load was not running across it", writesBefore, writes.Load())
	}

	var info struct {
		Name, State string
		ReadOnly    bool
	}
	d.cliJSON(&info, "snapshot", "show", "live@snap")
	if info.Name != "live@snap" || !info.ReadOnly || info.State != "Active" {
		t.Errorf("snapshot show: %+v, want live@snap, read-only, Active", info)
	}
	ni := mustRun(t, "nbdinfo", "--json", d.URI("live@snap"))
	var nj struct {
		Exports []struct {
			ReadOnly bool  `json:"is_read_only"`
			Size     int64 `json:"export-size"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(ni.Stdout), &nj); err != nil || len(nj.Exports) != 1 {
		t.Fatalf("nbdinfo --json: %v\n%s", err, ni.Stdout)
	}
	if !nj.Exports[0].ReadOnly || nj.Exports[0].Size != 64<<20 {
		t.Errorf("snapshot export: read-only %t, size %d; want true, %d", nj.Exports[0].ReadOnly, nj.Exports[0].Size, 64<<20)
	}

	out := filepath.Join(t.TempDir(), "snap.raw")
	mustRun(t, "nbdcopy", d.URI("live@snap"), out)
	img := readFile(t, out)
	inFlight := 0
	var gens [blocks]uint64
	for b := 0; b < blocks; b++ {
		gen, err := readPattern(img[b*patternBlock:(b+1)*patternBlock], uint32(b))
		if err != nil {
			t.Errorf("snapshot: %v", err)
			continue
		}
		gens[b] = gen
		if gen < ackedBefore[b] || gen > issuedAfter[b] {
			t.Errorf("snapshot block %d holds generation %d; acknowledged before the snapshot: %d, issued by its end: %d", b, gen, ackedBefore[b], issuedAfter[b])
		}
		if issuedAfter[b] > ackedBefore[b] {
			inFlight++
		}
	}
	t.Logf("%d pattern writes before the snapshot, %d blocks written around it", writesBefore, inFlight)
	// One instant: each writer goes through its blocks in order, pass after
	// pass, so the image at any instant has, in that order, blocks of some
	// generation g+1 followed by blocks of generation g. A copy made while
	// the writer moves on would show an older block after a newer one out of
	// that shape.
	for w := range 2 {
		first, prev := gens[w], gens[w]
		for b := w; b < blocks; b += 2 {
			if gens[b] > prev || first-gens[b] > 1 {
				t.Errorf("writer %d: block %d has generation %d after %d (first block %d): not one instant", w, b, gens[b], prev, first)
				break
			}
			prev = gens[b]
		}
	}

	if err := <-fioDone; err != nil {
		t.Fatalf("fio: %v\n%s\n%s", err, fioErr.String(), clip(string(readFile(t, fioOut))))
	}
	raw := readFile(t, fioOut)
	var rep struct {
		Jobs []fioJob `json:"jobs"`
	}
	if i := bytes.IndexByte(raw, '{'); i < 0 || json.Unmarshal(raw[i:], &rep) != nil || len(rep.Jobs) != 1 {
		t.Fatalf("fio report:\n%s", clip(string(raw)))
	}
	if rep.Jobs[0].Error != 0 || rep.Jobs[0].Write.IOBytes != 3*(16<<20) {
		t.Errorf("fio: error %d, wrote %d bytes; want 0 and %d", rep.Jobs[0].Error, rep.Jobs[0].Write.IOBytes, 3*(16<<20))
	}
}

// TestDiskFromSnapshot: a disk made from a snapshot reads as the snapshot
// does; by default it shares the volume key (and says so), with
// --reencrypt it has its own. A different key protector is refused.
func TestDiskFromSnapshot(t *testing.T) {
	t.Parallel()
	need(t, "libnbd-bin", "nbdcopy")
	need(t, "cryptsetup-bin", "cryptsetup")
	d := startDaemon(t, daemonOpts{Disks: []diskSpec{{Name: "src", Size: "32M"}}})
	dir := t.TempDir()
	data, _ := randomFile(t, dir, 32<<20, 7)
	mustRun(t, "nbdcopy", data, d.URI("src"))
	if r := d.CLI("snapshot", "create", "s", "--source", "src"); r.Code != 0 {
		t.Fatalf("snapshot create: %v", r)
	}
	// Writes to the disk after the snapshot must not reach the clones.
	other, _ := randomFile(t, dir, 32<<20, 8)
	mustRun(t, "nbdcopy", other, d.URI("src"))

	var clone, fresh diskJSON
	d.cliJSON(&clone, "disk", "create", "clone", "--source", "src@s")
	d.cliJSON(&fresh, "disk", "create", "fresh", "--source", "src@s", "--reencrypt")
	if got := strings.Join(clone.SharesVolumeKeyWith, ","); got != "src,src@s" {
		t.Errorf("clone sharesVolumeKeyWith = %q, want src,src@s", got)
	}
	if len(fresh.SharesVolumeKeyWith) != 0 {
		t.Errorf("re-encrypted disk sharesVolumeKeyWith = %q, want none", fresh.SharesVolumeKeyWith)
	}
	if show := d.CLI("disk", "show", "clone"); !strings.Contains(show.Stdout, "sharesVolumeKeyWith:") {
		t.Errorf("disk show clone does not say it shares its volume key:\n%s", show.Stdout)
	}
	want := sha256File(t, data)
	for _, name := range []string{"clone", "fresh"} {
		out := filepath.Join(dir, name+".raw")
		mustRun(t, "nbdcopy", d.URI(name), out)
		if got := sha256File(t, out); got != want {
			t.Errorf("%s does not read as the snapshot: %s", name, firstDiff(readFile(t, out), readFile(t, data)))
		}
	}

	keys := map[string]string{}
	for _, name := range []string{"src", "clone", "fresh"} {
		kf := filepath.Join(dir, name+".key")
		if r := d.CLI("disk", "recovery-secret", name, "--out", kf); r.Code != 0 {
			t.Fatalf("recovery-secret %s: %v", name, r)
		}
		keys[name] = volumeKey(t, d.Image(name), kf)
	}
	if keys["clone"] != keys["src"] {
		t.Error("the clone's volume key differs from its source's, though it is reported as shared")
	}
	if keys["fresh"] == keys["src"] {
		t.Error("--reencrypt kept the source's volume key")
	}

	r := d.CLI("disk", "create", "other", "--source", "src@s", "--des", "somedes")
	if r.Code == 0 || !strings.Contains(r.Stderr, "platform key") {
		t.Errorf("disk from a platform-key snapshot with --des: want a refusal naming the platform key, got %v", r)
	}
	if r := d.CLI("disk", "create", "other", "--source", "src@nope"); r.Code == 0 {
		t.Errorf("disk from a missing snapshot: want an error, got %v", r)
	}
}

// TestImportExportHoles: a raw image qemu-img made with data at a few
// offsets is imported and exported back; the bytes are the same and the
// holes stay holes in the disk and in the exported file. The same disk is
// then imported again through NBD (the daemon's own export) and exported
// to stdout, with -o json progress lines.
func TestImportExportHoles(t *testing.T) {
	t.Parallel()
	need(t, "qemu-utils", "qemu-img", "qemu-io")
	d := startDaemon(t, daemonOpts{})
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	mustRun(t, "qemu-img", "create", "-f", "raw", src, "64M")
	mustRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 256k", "-c", "write -P 0x5c 40M 1M",
		"-c", "write -P 0x01 65532k 4k", src)
	srcAlloc, _ := allocated(t, src)

	if r := d.CLI("disk", "import", "imp", "--from", src); r.Code != 0 {
		t.Fatalf("import: %v", r)
	}
	out := filepath.Join(dir, "out.img")
	if r := d.CLI("disk", "export", "imp", "--to", out); r.Code != 0 {
		t.Fatalf("export: %v", r)
	}
	if sha256File(t, out) != sha256File(t, src) {
		t.Fatalf("exported image differs: %s", firstDiff(readFile(t, out), readFile(t, src)))
	}
	diskAlloc, diskSize := allocated(t, d.Image("imp"))
	outAlloc, outSize := allocated(t, out)
	t.Logf("allocated: source %d, disk %d of %d (with the 16 MiB header area), export %d of %d", srcAlloc, diskAlloc, diskSize, outAlloc, outSize)
	// The 16 MiB header area is allocated (the keyslot area is filled with
	// random bytes); the data region holds what the source holds, in 4 KiB
	// pieces.
	if diskAlloc > (16<<20)+srcAlloc+(1<<20) {
		t.Errorf("the imported disk allocates %d bytes for %d of data: holes were filled", diskAlloc, srcAlloc)
	}
	if outAlloc > srcAlloc+(1<<20) || outSize != 64<<20 {
		t.Errorf("the exported file allocates %d of %d bytes for %d of data: it is not sparse", outAlloc, outSize, srcAlloc)
	}

	// Through NBD and stdout, with machine-readable progress.
	r := d.CLI("disk", "import", "imp2", "--from", d.URI("imp"), "-o", "json")
	if r.Code != 0 {
		t.Fatalf("import from nbd: %v", r)
	}
	lines := strings.Split(strings.TrimSpace(r.Stdout), "\n")
	var last struct {
		Event      string
		DoneBytes  int64
		TotalBytes int64
		Result     diskJSON
	}
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &last); err != nil {
		t.Fatalf("last progress line: %v\n%s", err, r.Stdout)
	}
	if len(lines) < 2 || last.Event != "done" || last.DoneBytes != 64<<20 || last.TotalBytes != 64<<20 || last.Result.Name != "imp2" {
		t.Errorf("-o json progress: want progress lines then a done line for imp2 at 64 MiB, got:\n%s", r.Stdout)
	}
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	cmd := d.cliCmd(ctx, "disk", "export", "imp2", "--to", "-")
	h := sha256.New()
	cmd.Stdout = h
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("export to stdout: %v\n%s", err, stderr.String())
	}
	if got, want := fmt.Sprintf("%x", h.Sum(nil)), fmt.Sprintf("%x", sha256File(t, src)); got != want {
		t.Errorf("export of the NBD-imported disk to stdout: sha256 %s, want %s", got, want)
	}
	var ev []struct{ Event, Detail string }
	d.cliJSON(&ev, "audit", "--disk", "imp")
	exported := false
	for _, e := range ev {
		exported = exported || e.Event == "export"
	}
	if !exported {
		t.Errorf("no export event in the audit log of imp: %+v", ev)
	}
}

// TestImportInterrupted: an import whose input ends early, or whose CLI is
// killed halfway, leaves no disk and no file; running it again works.
func TestImportInterrupted(t *testing.T) {
	t.Parallel()
	d := startDaemon(t, daemonOpts{})
	dir := t.TempDir()
	src, _ := randomFile(t, dir, 32<<20, 11)
	noTrace := func(when string) {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for {
			names := d.diskNames()
			files, _ := filepath.Glob(filepath.Join(d.DataDir, "disks", "half*"))
			if len(names) == 0 && len(files) == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: disks %q and files %q remain", when, names, files)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}

	t.Run("short-input", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
		defer cancel()
		cmd := d.cliCmd(ctx, "disk", "import", "half", "--from", "-", "--size", "32M")
		cmd.Stdin = io.LimitReader(bytes.NewReader(readFile(t, src)), 8<<20)
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), "ended after") {
			t.Errorf("import of 8 of 32 MiB: want an error saying the image ended early, got %v\n%s", err, out)
		}
		noTrace("after a short input")
	})
	t.Run("killed", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
		defer cancel()
		cmd := d.cliCmd(ctx, "disk", "import", "half", "--from", "-", "--size", "32M")
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// 16 MiB through a pipe: by the time the writes return, the CLI has
		// read most of it and the daemon is building the disk.
		if _, err := stdin.Write(readFile(t, src)[:16<<20]); err != nil {
			t.Fatal(err)
		}
		cmd.Process.Kill()
		cmd.Wait()
		noTrace("after kill -9 of the CLI")
	})
	t.Run("rerun", func(t *testing.T) {
		if r := d.CLI("disk", "import", "half", "--from", src); r.Code != 0 {
			t.Fatalf("import: %v", r)
		}
		out := filepath.Join(dir, "half.raw")
		if r := d.CLI("disk", "export", "half", "--to", out); r.Code != 0 {
			t.Fatalf("export: %v", r)
		}
		if sha256File(t, out) != sha256File(t, src) {
			t.Errorf("rerun import: %s", firstDiff(readFile(t, out), readFile(t, src)))
		}
	})
}

// TestResizeUnderLoad: fio keeps writing and verifying while the disk
// grows; a new connection sees the new size, and the LUKS2 token records it.
func TestResizeUnderLoad(t *testing.T) {
	t.Parallel()
	need(t, "fio", "fio")
	need(t, "libnbd-bin", "nbdinfo")
	need(t, "cryptsetup-bin", "cryptsetup")
	d := startDaemon(t, daemonOpts{Disks: []diskSpec{{Name: "grow", Size: "64M"}}})
	type fioRes struct {
		jobs []fioJob
		err  error
	}
	fioOut := filepath.Join(t.TempDir(), "fio.json")
	fio := exec.Command("fio", "--name=load", "--ioengine=nbd", "--uri="+d.URI("grow"),
		"--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=32M", "--loops=3",
		"--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0", "--output-format=json", "--output="+fioOut)
	if err := fio.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- fio.Wait() }()
	time.Sleep(500 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("fio finished before the resize (%v): make it run longer", err)
	default:
	}
	if r := d.CLI("disk", "resize", "grow", "--size", "128M"); r.Code != 0 {
		t.Fatalf("resize: %v", r)
	}
	if r := mustRun(t, "nbdinfo", "--size", d.URI("grow")); strings.TrimSpace(r.Stdout) != "134217728" {
		t.Errorf("nbdinfo --size after the resize: %q, want 134217728", r.Stdout)
	}
	if err := <-done; err != nil {
		t.Fatalf("fio failed across the resize: %v\n%s", err, clip(string(readFile(t, fioOut))))
	}
	raw := readFile(t, fioOut)
	var rep struct {
		Jobs []fioJob `json:"jobs"`
	}
	if i := bytes.IndexByte(raw, '{'); i < 0 || json.Unmarshal(raw[i:], &rep) != nil {
		t.Fatalf("fio report:\n%s", clip(string(raw)))
	}
	checkFio(t, rep.Jobs, 1, 3*(32<<20), 32<<20)
	meta := mustRun(t, "cryptsetup", "luksDump", "--dump-json-metadata", d.Image("grow"))
	var md struct {
		Tokens map[string]struct {
			Properties map[string]string `json:"properties"`
		} `json:"tokens"`
	}
	if err := json.Unmarshal([]byte(meta.Stdout), &md); err != nil {
		t.Fatalf("luksDump --dump-json-metadata: %v", err)
	}
	if got := md.Tokens["0"].Properties["sizeBytes"]; got != "134217728" {
		t.Errorf("token property sizeBytes = %q, want 134217728", got)
	}
}

// TestDeleteShreds: delete is refused while a client is connected and
// while the disk has snapshots; once done, a hard link kept to the image
// shows that its header is no LUKS2 header any more and that the recovery
// secret opens nothing.
func TestDeleteShreds(t *testing.T) {
	t.Parallel()
	need(t, "cryptsetup-bin", "cryptsetup")
	d := startDaemon(t, daemonOpts{Disks: []diskSpec{{Name: "gone", Size: "32M"}}})
	dir := t.TempDir()
	key := filepath.Join(dir, "key")
	if r := d.CLI("disk", "recovery-secret", "gone", "--out", key); r.Code != 0 {
		t.Fatalf("recovery-secret: %v", r)
	}
	keep := filepath.Join(d.DataDir, "keep.luks") // same filesystem, for the hard link
	if err := os.Link(d.Image("gone"), keep); err != nil {
		t.Fatal(err)
	}
	mustRun(t, "cryptsetup", "open", "--test-passphrase", "--key-file", key, keep)

	c, err := nbdclient.Dial(context.Background(), d.URI("gone"))
	if err != nil {
		t.Fatal(err)
	}
	if r := d.CLI("disk", "delete", "gone"); r.Code == 0 || !strings.Contains(r.Stderr, "live connections") {
		t.Errorf("delete with a client connected: want a refusal, got %v", r)
	}
	c.Close()
	if r := d.CLI("snapshot", "create", "s", "--source", "gone"); r.Code != 0 {
		t.Fatalf("snapshot: %v", r)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		r := d.CLI("disk", "delete", "gone")
		if r.Code == 0 {
			t.Fatalf("delete of a disk with a snapshot succeeded without --force")
		}
		if strings.Contains(r.Stderr, "snapshots") {
			break
		}
		if time.Now().After(deadline) { // the connection is released asynchronously
			t.Fatalf("delete with a snapshot: want a refusal naming it, got %v", r)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if r := d.CLI("snapshot", "delete", "gone@s"); r.Code != 0 {
		t.Fatalf("snapshot delete: %v", r)
	}
	if r := d.CLI("disk", "delete", "gone"); r.Code != 0 {
		t.Fatalf("delete: %v", r)
	}
	if _, err := os.Stat(d.Image("gone")); !os.IsNotExist(err) {
		t.Errorf("image still there after delete: %v", err)
	}
	if names := d.diskNames(); len(names) != 0 {
		t.Errorf("disk list after delete: %q", names)
	}
	if r := runCmd(t, "cryptsetup", "luksDump", keep); r.Code == 0 {
		t.Errorf("luksDump of the deleted image still finds a LUKS2 header:\n%s", r.Stdout)
	}
	if r := runCmd(t, "cryptsetup", "open", "--test-passphrase", "--key-file", key, keep); r.Code == 0 {
		t.Error("the recovery secret still opens the deleted image")
	}
}

// TestCustomerKeyLifecycle: a snapshot of a customer-key disk follows the
// key's revocation like the disk; a disk made from it stays under the same
// disk encryption set and another one is refused; an export goes through
// the key, so revoking it blocks the export.
func TestCustomerKeyLifecycle(t *testing.T) {
	t.Parallel()
	c := setupCMK(t, "1h")
	d := c.d
	mustCLI(t, d, "snapshot", "create", "s", "--source", "cmk")
	if r := d.CLI("disk", "create", "x", "--source", "cmk@s", "--des", "des2"); r.Code == 0 || !strings.Contains(r.Stderr, "des1") {
		t.Errorf("disk from a des1 snapshot with --des des2: want a refusal naming des1, got %v", r)
	}
	var x diskJSON
	d.cliJSON(&x, "disk", "create", "x", "--source", "cmk@s")
	if x.Properties["des"] != "des1" || x.Properties["encryptionType"] != "EncryptionAtRestWithCustomerKey" {
		t.Errorf("disk from the snapshot has properties %v, want des1 and a customer key", x.Properties)
	}
	if r := d.CLI("des", "delete", "des1"); r.Code == 0 {
		t.Error("des delete succeeded while disks and a snapshot use it")
	}

	c.v.mustCLI("keyvault", "set-policy", "--object-id", c.principal, "--key-permissions", "get", "wrapKey")
	waitState(t, d, "cmk", "Suspended", 15*time.Second)
	deadline := time.Now().Add(15 * time.Second)
	for {
		var si struct{ State string }
		d.cliJSON(&si, "snapshot", "show", "cmk@s")
		if si.State == "Suspended" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("snapshot state %q after the revocation, want Suspended", si.State)
		}
		time.Sleep(200 * time.Millisecond)
	}
	out := filepath.Join(t.TempDir(), "cmk.raw")
	for _, name := range []string{"cmk", "cmk@s"} {
		if r := d.CLI("disk", "export", name, "--to", out); r.Code == 0 {
			t.Errorf("export of %s with the key revoked succeeded", name)
		}
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("a refused export left %s behind: %v", out, err)
	}

	c.v.mustCLI("keyvault", "set-policy", "--object-id", c.principal, "--key-permissions", "get", "wrapKey", "unwrapKey")
	waitState(t, d, "cmk", "Active", 20*time.Second)
	if r := d.CLI("disk", "export", "cmk", "--to", out); r.Code != 0 {
		t.Fatalf("export after the key came back: %v", r)
	}
	found := false
	for _, e := range auditEvents(t, d, "--disk", "cmk") {
		found = found || (e.Event == "export" && e.Principal == c.principal)
	}
	if !found {
		t.Error("no export event by the set's identity in the audit log")
	}
}
