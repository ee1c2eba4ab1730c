package luks2_test

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk/luks2"
)

var update = flag.Bool("update", false, "rewrite the seed corpus in testdata/fuzz")

// wrapJSON builds a two-copy LUKS2 metadata image (16 KiB copies, seqid 1)
// around a JSON area, with valid checksums.
func wrapJSON(area []byte) []byte {
	img := make([]byte, 2*mdSize)
	for i, magic := range []string{"LUKS\xba\xbe", "SKUL\xba\xbe"} {
		cp := img[i*mdSize : (i+1)*mdSize]
		copy(cp, magic)
		binary.BigEndian.PutUint16(cp[6:], 2)
		binary.BigEndian.PutUint64(cp[8:], mdSize)
		binary.BigEndian.PutUint64(cp[16:], 1)
		copy(cp[72:], "sha256")
		copy(cp[168:], "3b9a2c1d-0e4f-4a5b-8c6d-7e8f9a0b1c2d")
		binary.BigEndian.PutUint64(cp[256:], uint64(i*mdSize))
		copy(cp[binSize:], area)
		sum := sha256.Sum256(cp)
		copy(cp[csumOff:], sum[:])
	}
	return img
}

// FuzzParseHeader feeds Read either a raw image (raw) or a JSON area
// wrapped in valid binary headers. Read must not panic, must fail only with
// its documented errors, and a header it accepts must survive Write and
// Read unchanged.
func FuzzParseHeader(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte, raw bool) {
		if len(data) > 64<<10 {
			t.Skip("input too large")
		}
		img := data
		if !raw {
			img = wrapJSON(data[:min(len(data), mdSize-binSize)])
		}
		d := &memDisk{b: bytes.Clone(img)}
		h, err := luks2.Read(d)
		if err != nil {
			if h != nil {
				t.Fatalf("Read returned a header and %v", err)
			}
			if !errors.Is(err, luks2.ErrNoHeader) && !errors.Is(err, luks2.ErrCorrupt) && !errors.Is(err, luks2.ErrUnsupported) {
				t.Fatalf("Read error outside the documented ones: %v", err)
			}
			return
		}
		toks := h.Tokens()
		before := fmt.Sprint(h.UUID(), h.Label(), h.SectorSize(), h.DataOffset(), h.Cipher(), h.KeySize())
		if err := h.Write(d, nil); err != nil {
			if errors.Is(err, luks2.ErrNoSpace) {
				return // re-encoding may grow (invalid UTF-8 becomes U+FFFD)
			}
			t.Fatalf("Write: %v", err)
		}
		h2, err := luks2.Read(d)
		if err != nil {
			t.Fatalf("Read after Write: %v", err)
		}
		if after := fmt.Sprint(h2.UUID(), h2.Label(), h2.SectorSize(), h2.DataOffset(), h2.Cipher(), h2.KeySize()); after != before {
			t.Errorf("fields after Write: %s, before: %s", after, before)
		}
		if h2.SeqID() != h.SeqID() {
			t.Errorf("seqid after Write %d, header says %d", h2.SeqID(), h.SeqID())
		}
		toks2 := h2.Tokens()
		if len(toks2) != len(toks) {
			t.Fatalf("%d tokens after Write, %d before", len(toks2), len(toks))
		}
		for id, tok := range toks {
			var a, b bytes.Buffer
			json.Compact(&a, tok)
			json.Compact(&b, toks2[id])
			if !bytes.Equal(a.Bytes(), b.Bytes()) {
				t.Errorf("token %d after Write: %s, before: %s", id, toks2[id], tok)
			}
		}
	})
}

type fuzzSeed struct {
	name string
	data []byte
	raw  bool
	ok   bool // Read accepts it
}

func fuzzSeeds(t *testing.T) []fuzzSeed {
	d := &memDisk{}
	h, err := luks2.Format(d, testKey(), testPass, luks2.FormatOptions{Rand: &countingReader{}, DataOffset: mib})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.SetToken(0, json.RawMessage(testToken)); err != nil {
		t.Fatal(err)
	}
	if err := h.Write(d, nil); err != nil {
		t.Fatal(err)
	}
	ours := jsonText(d.b, 0)

	zr, err := os.Open(filepath.Join("testdata", "cryptsetup-2.6.1-4096.img.gz"))
	if err != nil {
		t.Fatal(err)
	}
	defer zr.Close()
	gz, err := gzip.NewReader(zr)
	if err != nil {
		t.Fatal(err)
	}
	img, err := io.ReadAll(gz)
	if err != nil {
		t.Fatal(err)
	}
	theirs := jsonText(img, 0)

	var m map[string]any
	json.Unmarshal(ours, &m)
	m["config"].(map[string]any)["requirements"] = map[string]any{"mandatory": []any{"online-reencrypt-v2"}}
	withReq, _ := json.Marshal(m)

	return []fuzzSeed{
		{"format", ours, false, true},
		{"cryptsetup", theirs, false, true},
		{"truncated", ours[:len(ours)/2], false, false},
		{"requirements", withReq, false, false},
		{"empty-object", []byte("{}"), false, false},
		{"raw-binary-header", d.b[:512], true, false},
	}
}

// TestFuzzSeeds checks the seed corpus in testdata/fuzz still has the
// expected outcome; with -update it rewrites it.
func TestFuzzSeeds(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzParseHeader")
	for _, s := range fuzzSeeds(t) {
		path := filepath.Join(dir, s.name)
		if *update {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			text := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\nbool(%v)\n", s.data, s.raw)
			if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := os.Stat(path); err != nil {
			t.Errorf("seed %s: %v (run go test -run TestFuzzSeeds -update)", s.name, err)
		}
		img := s.data
		if !s.raw {
			img = wrapJSON(s.data)
		}
		_, err := luks2.Read(&memDisk{b: img})
		if (err == nil) != s.ok {
			t.Errorf("seed %s: Read error %v, want success %v", s.name, err, s.ok)
		}
	}
}
