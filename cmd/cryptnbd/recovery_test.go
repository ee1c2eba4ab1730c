package main_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestRecoverySecretCryptsetup: every image is LUKS2 as cryptsetup reads
// it, and the exported recovery secret opens its keyslot.
func TestRecoverySecretCryptsetup(t *testing.T) {
	t.Parallel()
	need(t, "cryptsetup-bin", "cryptsetup")
	d := startDaemon(t, daemonOpts{Demo: "demo", Disks: []diskSpec{
		{Name: "four-k", Size: "64M", SectorSize: 4096},
		{Name: "small-sectors", Size: "32M", SectorSize: 512},
	}})
	dir := t.TempDir()
	for _, tc := range []struct {
		name   string
		sector int
	}{{"demo", 4096}, {"four-k", 4096}, {"small-sectors", 512}} {
		t.Run(tc.name, func(t *testing.T) {
			img := d.Image(tc.name)
			r := mustRun(t, "cryptsetup", "luksDump", img)
			for _, want := range []string{"Version:       \t2", "aes-xts-plain64", fmt.Sprintf("sector: %d [bytes]", tc.sector), "Keyslots:"} {
				if !strings.Contains(r.Stdout, want) {
					t.Errorf("luksDump lacks %q:\n%s", want, r.Stdout)
				}
			}

			secret := filepath.Join(dir, tc.name+".key")
			if r := d.CLI("disk", "recovery-secret", tc.name, "--out", secret); r.Code != 0 {
				t.Fatalf("disk recovery-secret: %v", r)
			}
			fi, err := os.Stat(secret)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("secret file mode %v, want 0600", fi.Mode().Perm())
			}
			key := readFile(t, secret)
			if len(key) < 16 {
				t.Fatalf("secret is %d bytes", len(key))
			}
			if r := runCmd(t, "cryptsetup", "open", "--test-passphrase", "--key-file", secret, img); r.Code != 0 {
				t.Errorf("cryptsetup open --test-passphrase with the recovery secret: %v", r)
			}

			wrong := filepath.Join(dir, tc.name+".wrong")
			bad := bytes.Clone(key)
			bad[0] ^= 1
			if err := os.WriteFile(wrong, bad, 0o600); err != nil {
				t.Fatal(err)
			}
			if r := runCmd(t, "cryptsetup", "open", "--test-passphrase", "--key-file", wrong, img); r.Code == 0 {
				t.Errorf("cryptsetup accepted a wrong key file: %v", r)
			}

			// --out never overwrites: the file is created exclusively.
			if r := d.CLI("disk", "recovery-secret", tc.name, "--out", wrong); r.Code == 0 {
				t.Errorf("recovery-secret overwrote an existing file: %v", r)
			}
			if got := readFile(t, wrong); !bytes.Equal(got, bad) {
				t.Errorf("recovery-secret changed an existing file")
			}
		})
	}

	// Each export of a secret is in the audit log.
	events := map[string]int{}
	for _, line := range strings.Split(string(readFile(t, filepath.Join(d.DataDir, "audit.log"))), "\n") {
		if line == "" {
			continue
		}
		var e struct {
			Event, Disk, Result string
		}
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Errorf("audit.log line %q: %v", line, err)
			continue
		}
		if e.Event == "recovery-secret" && e.Result == "success" {
			events[e.Disk]++
		}
	}
	for _, name := range []string{"demo", "four-k", "small-sectors"} {
		if events[name] != 1 {
			t.Errorf("audit.log has %d successful recovery-secret events for %s, want 1", events[name], name)
		}
	}
}

// xtsDecryptPy decrypts sectors of a LUKS2 data segment with python3's
// cryptography package, independently of cryptnbd's own XTS code. The
// tweak is the sector number in 512-byte units, as dm-crypt counts it
// for LUKS2 (iv_large_sectors off).
const xtsDecryptPy = `import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
image, vkfile, offset, ss, first, count, out = sys.argv[1:]
offset, ss, first, count = int(offset), int(ss), int(first), int(count)
vk = open(vkfile, "rb").read()
assert len(vk) == 64, len(vk)
with open(image, "rb") as f, open(out, "wb") as o:
    for s in range(first, first + count):
        f.seek(offset + s * ss)
        ct = f.read(ss)
        assert len(ct) == ss
        d = Cipher(algorithms.AES(vk), modes.XTS((s * (ss // 512)).to_bytes(16, "little"))).decryptor()
        o.write(d.update(ct) + d.finalize())
`

// TestIndependentDecryption writes through NBD, then decrypts the image
// with cryptsetup's volume key and python's AES-XTS, for both sector sizes.
func TestIndependentDecryption(t *testing.T) {
	t.Parallel()
	need(t, "cryptsetup-bin", "cryptsetup")
	need(t, "libnbd-bin", "nbdcopy")
	need(t, "qemu-utils", "qemu-io")
	needPythonCryptography(t)
	d := startDaemon(t, daemonOpts{Disks: []diskSpec{
		{Name: "s4096", Size: "32M", SectorSize: 4096},
		{Name: "s512", Size: "32M", SectorSize: 512},
	}})
	dir := t.TempDir()
	script := filepath.Join(dir, "xts.py")
	if err := os.WriteFile(script, []byte(xtsDecryptPy), 0o600); err != nil {
		t.Fatal(err)
	}

	// Known data: 1 MiB of random bytes at 0 (nbdcopy), an unaligned
	// pattern inside it and a pattern 20 MiB in (qemu-io), then flush.
	want := map[string][]byte{}
	const far = 20 << 20
	// No zero runs here: nbdcopy would send those as zero requests, which
	// cryptnbd stores as holes (all-zero ciphertext that it reads as zeros
	// but dm-crypt would decrypt to noise).
	for i, name := range []string{"s4096", "s512"} {
		data := make([]byte, 1<<20)
		fillRandom(data, uint64(50+i))
		src := filepath.Join(dir, name+".src")
		if err := os.WriteFile(src, data, 0o600); err != nil {
			t.Fatal(err)
		}
		mustRun(t, "nbdcopy", "--flush", src, d.URI(name))
		// qemu's write -z (without -u) sets NO_HOLE: those zeros must be
		// encrypted zeros in the image, so that dm-crypt reads zeros too.
		qemuIOOK(t, d.URI(name), "write -P 0x5a 5000 3000", "write -P 0xa7 20M 64k",
			"write -P 0x99 24M 64k", "write -z 24M 64k", "flush")
		for j := 5000; j < 8000; j++ {
			data[j] = 0x5a
		}
		want[name] = data
	}
	d.Stop() // and flush

	for _, name := range []string{"s4096", "s512"} {
		t.Run(name, func(t *testing.T) {
			img := d.Image(name)
			secret := filepath.Join(dir, name+".key")
			if r := d.CLI("disk", "recovery-secret", name, "--out", secret); r.Code != 0 {
				t.Fatalf("disk recovery-secret (daemon stopped): %v", r)
			}
			r := mustRun(t, "cryptsetup", "luksDump", "--dump-json-metadata", img)
			var meta struct {
				Segments map[string]struct {
					Offset     string `json:"offset"`
					Encryption string `json:"encryption"`
					SectorSize int    `json:"sector_size"`
					IVTweak    string `json:"iv_tweak"`
				} `json:"segments"`
			}
			if err := json.Unmarshal([]byte(r.Stdout), &meta); err != nil {
				t.Fatalf("luksDump JSON: %v\n%s", err, r.Stdout)
			}
			seg, ok := meta.Segments["0"]
			if !ok || len(meta.Segments) != 1 {
				t.Fatalf("segments %+v, want exactly segment 0", meta.Segments)
			}
			wantSS := map[string]int{"s4096": 4096, "s512": 512}[name]
			if seg.Encryption != "aes-xts-plain64" || seg.SectorSize != wantSS || seg.IVTweak != "0" {
				t.Fatalf("segment 0 is %+v, want aes-xts-plain64, sector_size %d, iv_tweak 0", seg, wantSS)
			}
			off, err := strconv.ParseInt(seg.Offset, 10, 64)
			if err != nil {
				t.Fatalf("segment offset %q: %v", seg.Offset, err)
			}

			vk := filepath.Join(dir, name+".vk")
			mustRun(t, "cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode",
				"--key-file", secret, "--volume-key-file", vk, img)
			key := readFile(t, vk)
			if len(key) != 64 {
				t.Fatalf("volume key is %d bytes, want 64", len(key))
			}

			decrypt := func(startByte, n int) []byte {
				t.Helper()
				out := filepath.Join(dir, fmt.Sprintf("%s-%d.plain", name, startByte))
				mustRun(t, "python3", script, img, vk, strconv.FormatInt(off, 10), strconv.Itoa(wantSS),
					strconv.Itoa(startByte/wantSS), strconv.Itoa(n/wantSS), out)
				return readFile(t, out)
			}
			if got := decrypt(0, 1<<20); !bytes.Equal(got, want[name]) {
				t.Errorf("python AES-XTS of the first MiB: %s", firstDiff(got, want[name]))
			}
			if got, w := decrypt(far, 64<<10), bytes.Repeat([]byte{0xa7}, 64<<10); !bytes.Equal(got, w) {
				t.Errorf("python AES-XTS at 20 MiB: %s", firstDiff(got, w))
			}

			if got, w := decrypt(24<<20, 64<<10), make([]byte, 64<<10); !bytes.Equal(got, w) {
				t.Errorf("python AES-XTS of a WRITE_ZEROES with NO_HOLE at 24 MiB: %s", firstDiff(got, w))
			}

			image := readFile(t, img)
			if bytes.Contains(image, key) {
				t.Errorf("the volume key appears in the clear in the image")
			}
		})
	}
}

// TestNoPlaintextInImage: a recognisable pattern written through NBD
// appears nowhere in the image file.
func TestNoPlaintextInImage(t *testing.T) {
	t.Parallel()
	need(t, "libnbd-bin", "nbdcopy")
	d := startDaemon(t, daemonOpts{Demo: "demo", Disks: []diskSpec{{Name: "small", Size: "16M", SectorSize: 512}}})
	dir := t.TempDir()
	pattern := []byte("cryptnbd-PLAIN16")
	data := bytes.Repeat(pattern, (1<<20)/len(pattern))
	src := filepath.Join(dir, "pattern.bin")
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"demo", "small"} {
		t.Run(name, func(t *testing.T) {
			mustRun(t, "nbdcopy", "--flush", src, d.URI(name))
			// It really is on the disk...
			out := filepath.Join(dir, name+".out")
			mustRun(t, "nbdcopy", d.URI(name), out)
			if got := readFile(t, out)[:len(data)]; !bytes.Equal(got, data) {
				t.Fatalf("read back: %s", firstDiff(got, data))
			}
			// ...and not in the image, which is the image: it starts with the
			// LUKS2 magic.
			image := readFile(t, d.Image(name))
			if !bytes.HasPrefix(image, []byte("LUKS\xba\xbe\x00\x02")) {
				t.Fatalf("%s does not start with a LUKS2 header", d.Image(name))
			}
			if i := bytes.Index(image, pattern); i >= 0 {
				t.Errorf("plaintext pattern found in the image at byte %d", i)
			}
		})
	}
}
