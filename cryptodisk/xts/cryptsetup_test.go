package xts_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"github.com/cryptnbd/cryptnbd/cryptodisk/cryptodisktest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk/xts"
)

// TestCryptsetupReencrypt decrypts a LUKS2 image that cryptsetup itself
// encrypted (aes-xts-plain64, 4096-byte sectors): sector s of the data
// segment must decrypt, with tweak s*8 (the IV counts 512-byte units), to
// the plaintext written before encryption.
func TestCryptsetupReencrypt(t *testing.T) {
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		t.Skip("cryptsetup not installed (Debian package cryptsetup-bin)")
	}
	dir := t.TempDir()
	img, keyFile, vkFile := filepath.Join(dir, "img"), filepath.Join(dir, "key"), filepath.Join(dir, "vk")
	if err := os.WriteFile(keyFile, []byte("cryptnbd xts test passphrase"), 0o600); err != nil {
		t.Fatal(err)
	}
	const sector = 4096
	var data []byte
	for s := range (48 << 20) / sector {
		p := bytes.Repeat([]byte{'.'}, sector)
		copy(p, fmt.Sprintf("sector %08d ", s))
		data = append(data, p...)
	}
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) []byte {
		t.Helper()
		out, err := exec.Command("cryptsetup", args...).CombinedOutput()
		if err != nil {
			t.Fatalf("cryptsetup %v: %v\n%s", args, err, out)
		}
		return out
	}
	run("reencrypt", "--encrypt", "--type", "luks2", "--sector-size", "4096", "--reduce-device-size", "32M",
		"--force-offline-reencrypt", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
		"--key-file", keyFile, "--batch-mode", img)
	run("luksDump", "--dump-volume-key", "--batch-mode", "--key-file", keyFile, "--volume-key-file", vkFile, img)
	var meta struct {
		Segments map[string]struct {
			Offset     string `json:"offset"`
			Encryption string `json:"encryption"`
			SectorSize int    `json:"sector_size"`
			IVTweak    string `json:"iv_tweak"`
		} `json:"segments"`
	}
	if err := json.Unmarshal(run("luksDump", "--dump-json-metadata", img), &meta); err != nil {
		t.Fatalf("luksDump JSON: %v", err)
	}
	seg := meta.Segments["0"]
	if seg.Encryption != "aes-xts-plain64" || seg.SectorSize != sector || seg.IVTweak != "0" {
		t.Fatalf("unexpected segment %+v", seg)
	}
	off, err := strconv.Atoi(seg.Offset)
	if err != nil {
		t.Fatalf("segment offset %q: %v", seg.Offset, err)
	}
	vk, err := os.ReadFile(vkFile)
	if err != nil {
		t.Fatal(err)
	}
	enc, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	// 256 sectors (1 MiB) keep the generic path quick under -race.
	const sectors = 256
	ct := enc[off : off+sectors*sector]
	want := data[:sectors*sector]
	for _, name := range xts.Impls() {
		c, err := xts.NewImpl(vk, name)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		got := make([]byte, len(ct))
		c.DecryptSectors(got, ct, sector, 0, 8)
		if !bytes.Equal(got, want) {
			i := cryptodisktest.FirstDiff(got, want)
			t.Errorf("%s: sector %d decrypts to %q..., want %q...", name, i/sector, got[i/sector*sector:][:16], want[i/sector*sector:][:16])
		}
		// And encrypting the plaintext reproduces cryptsetup's ciphertext.
		c.EncryptSectors(got, want, sector, 0, 8)
		if !bytes.Equal(got, ct) {
			t.Errorf("%s: encryption differs from cryptsetup at sector %d", name, cryptodisktest.FirstDiff(got, ct)/sector)
		}
	}
}
