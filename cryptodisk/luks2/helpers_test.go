package luks2_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk/luks2"
)

// Binary header facts the tests rely on, from the LUKS2 specification.
const (
	binSize   = 4096
	mdSize    = 16384
	csumOff   = 448
	seqIDOff  = 16
	mib       = 1 << 20
	imageSize = 32 * mib
)

// memDisk is an in-memory device that grows on write. Not safe for
// concurrent use.
type memDisk struct{ b []byte }

func (m *memDisk) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m.b)) {
		return 0, io.EOF
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memDisk) WriteAt(p []byte, off int64) (int, error) {
	if end := off + int64(len(p)); end > int64(len(m.b)) {
		m.b = append(m.b, make([]byte, end-int64(len(m.b)))...)
	}
	return copy(m.b[off:], p), nil
}

func (m *memDisk) clone() *memDisk { return &memDisk{b: bytes.Clone(m.b)} }

var errCrash = errors.New("simulated crash")

// crashWriter writes at most budget more bytes to d, then fails every write:
// the last write is torn.
type crashWriter struct {
	d      *memDisk
	budget int
}

func (c *crashWriter) WriteAt(p []byte, off int64) (int, error) {
	n := min(len(p), c.budget)
	c.budget -= n
	c.d.WriteAt(p[:n], off)
	if n < len(p) {
		return n, errCrash
	}
	return n, nil
}

func testKey() []byte {
	k := make([]byte, 64)
	for i := range k {
		k[i] = byte(0xa0 + i)
	}
	return k
}

var testPass = []byte("correct horse battery staple")

// formatMem formats an in-memory device with the test key and passphrase.
func formatMem(t *testing.T, o luks2.FormatOptions) (*memDisk, *luks2.Header) {
	t.Helper()
	d := &memDisk{}
	h, err := luks2.Format(d, testKey(), testPass, o)
	if err != nil {
		t.Fatalf("Format: %v", err)
	}
	return d, h
}

// needCryptsetup returns the path of cryptsetup or skips the test.
func needCryptsetup(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("cryptsetup")
	if err != nil {
		t.Skip("cryptsetup not found: apt-get install -y cryptsetup-bin")
	}
	return p
}

// cryptsetup runs cryptsetup with args and returns its combined output.
func cryptsetup(t *testing.T, args ...string) (string, error) {
	t.Helper()
	out, err := exec.Command(needCryptsetup(t), args...).CombinedOutput()
	return string(out), err
}

func mustCryptsetup(t *testing.T, args ...string) string {
	t.Helper()
	out, err := cryptsetup(t, args...)
	if err != nil {
		t.Fatalf("cryptsetup %q: %v\n%s", args, err, out)
	}
	return out
}

// sparseFile creates an empty sparse file of imageSize bytes in a temporary
// directory and returns it open for reading and writing.
func sparseFile(t *testing.T) (*os.File, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(imageSize); err != nil {
		t.Fatal(err)
	}
	return f, path
}

func writeFile(t *testing.T, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// dumpVolumeKey has cryptsetup recover the volume key of img.
func dumpVolumeKey(t *testing.T, img string, pass []byte) []byte {
	t.Helper()
	vkFile := filepath.Join(t.TempDir(), "vk")
	mustCryptsetup(t, "luksDump", "--dump-volume-key", "--batch-mode",
		"--key-file", writeFile(t, "pass", pass), "--volume-key-file", vkFile, img)
	vk, err := os.ReadFile(vkFile)
	if err != nil {
		t.Fatal(err)
	}
	return vk
}

// dumpJSON returns cryptsetup's view of img's JSON metadata.
func dumpJSON(t *testing.T, img string) map[string]any {
	t.Helper()
	out := mustCryptsetup(t, "luksDump", "--dump-json-metadata", img)
	var m map[string]any
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("parse --dump-json-metadata: %v\n%s", err, out)
	}
	return m
}

// jsonPath walks m along keys.
func jsonPath(m any, keys ...string) any {
	for _, k := range keys {
		mm, ok := m.(map[string]any)
		if !ok {
			return nil
		}
		m = mm[k]
	}
	return m
}

// jsonText returns the JSON text of the metadata copy at off in img.
func jsonText(img []byte, off int) []byte {
	area := img[off+binSize : off+mdSize]
	if i := bytes.IndexByte(area, 0); i >= 0 {
		area = area[:i]
	}
	return bytes.Clone(area)
}

// setJSON replaces the JSON area of the copy at off with text and fixes the
// checksum, so that only the JSON content is wrong.
func setJSON(img []byte, off int, text []byte) {
	area := img[off+binSize : off+mdSize]
	clear(area)
	copy(area, text)
	fixChecksum(img, off)
}

func fixChecksum(img []byte, off int) {
	cp := img[off : off+mdSize]
	clear(cp[csumOff : csumOff+64])
	sum := sha256.Sum256(cp)
	copy(cp[csumOff:], sum[:])
}

// mutateJSON decodes the primary JSON, applies f, and stores the result in
// both copies with valid checksums.
func mutateJSON(t *testing.T, img []byte, f func(m map[string]any)) {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(jsonText(img, 0), &m); err != nil {
		t.Fatal(err)
	}
	f(m)
	text, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	setJSON(img, 0, text)
	setJSON(img, mdSize, text)
}

func seqID(img []byte, off int) uint64 {
	return binary.BigEndian.Uint64(img[off+seqIDOff:])
}
