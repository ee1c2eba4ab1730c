package luks2_test

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk/luks2"
)

const testToken = `{"type":"cryptnbd-keywrap","keyslots":["0"],"kid":"https://v.vault.azure.net/keys/k/1","wrapped":"AAEC","properties":{"name":"disk<1>&"}}`

// TestFormatCryptsetup formats with this package and checks the result with
// cryptsetup: luksDump, the JSON metadata, the passphrase and the volume key.
func TestFormatCryptsetup(t *testing.T) {
	needCryptsetup(t)
	for _, ss := range []int{4096, 512} {
		t.Run(fmt.Sprint(ss), func(t *testing.T) {
			f, path := sparseFile(t)
			const uuid = "0c3e1f4a-5b6c-4d7e-8f90-a1b2c3d4e5f6"
			h, err := luks2.Format(f, testKey(), testPass, luks2.FormatOptions{
				UUID: uuid, Label: "cryptnbd-test", SectorSize: ss,
			})
			if err != nil {
				t.Fatalf("Format: %v", err)
			}
			if err := h.SetToken(0, json.RawMessage(testToken)); err != nil {
				t.Fatalf("SetToken: %v", err)
			}
			if err := h.Write(f, f.Sync); err != nil {
				t.Fatalf("Write: %v", err)
			}

			dump := mustCryptsetup(t, "luksDump", path)
			for _, want := range []string{
				"cipher: aes-xts-plain64",
				fmt.Sprintf("sector: %d [bytes]", ss),
				"offset: 16777216 [bytes]",
				"UUID:          \t" + uuid,
				"Label:         \tcryptnbd-test",
				"0: cryptnbd-keywrap",
				"Area length:258048 [bytes]",
				"Epoch:         \t2",
			} {
				if !strings.Contains(dump, want) {
					t.Errorf("luksDump lacks %q:\n%s", want, dump)
				}
			}

			m := dumpJSON(t, path)
			for _, c := range []struct {
				path []string
				want any
			}{
				{[]string{"segments", "0", "encryption"}, "aes-xts-plain64"},
				{[]string{"segments", "0", "sector_size"}, float64(ss)},
				{[]string{"segments", "0", "offset"}, "16777216"},
				{[]string{"segments", "0", "size"}, "dynamic"},
				{[]string{"segments", "0", "iv_tweak"}, "0"},
				{[]string{"keyslots", "0", "key_size"}, float64(64)},
				{[]string{"keyslots", "0", "area", "offset"}, "32768"},
				{[]string{"keyslots", "0", "area", "size"}, "258048"},
				{[]string{"keyslots", "0", "kdf", "iterations"}, float64(1000)},
				{[]string{"keyslots", "0", "af", "stripes"}, float64(4000)},
				{[]string{"config", "json_size"}, "12288"},
				{[]string{"config", "keyslots_size"}, "16744448"},
				{[]string{"tokens", "0", "type"}, "cryptnbd-keywrap"},
				{[]string{"tokens", "0", "wrapped"}, "AAEC"},
				{[]string{"tokens", "0", "properties", "name"}, "disk<1>&"},
			} {
				if got := jsonPath(m, c.path...); got != c.want {
					t.Errorf("JSON %s = %v, want %v", strings.Join(c.path, "."), got, c.want)
				}
			}

			if out, err := cryptsetup(t, "open", "--test-passphrase", "--key-file",
				writeFile(t, "pass", testPass), path); err != nil {
				t.Errorf("open --test-passphrase: %v\n%s", err, out)
			}
			if out, err := cryptsetup(t, "open", "--test-passphrase", "--key-file",
				writeFile(t, "bad", []byte("wrong")), path); err == nil {
				t.Errorf("open --test-passphrase with a wrong passphrase succeeded\n%s", out)
			}
			if got := dumpVolumeKey(t, path, testPass); !bytes.Equal(got, testKey()) {
				t.Errorf("cryptsetup volume key = %x, want %x", got, testKey())
			}

			// Our own reader agrees.
			h2, err := luks2.Read(f)
			if err != nil {
				t.Fatalf("Read: %v", err)
			}
			if h2.SectorSize() != ss || h2.UUID() != uuid || h2.SeqID() != 2 {
				t.Errorf("Read: sector %d uuid %s seqid %d", h2.SectorSize(), h2.UUID(), h2.SeqID())
			}
		})
	}
}

// TestReadCryptsetupFormatted reads headers made by cryptsetup luksFormat
// and unlocks the volume key cryptsetup reports.
func TestReadCryptsetupFormatted(t *testing.T) {
	needCryptsetup(t)
	for _, c := range []struct {
		name string
		args []string
		ss   int
	}{
		{"pbkdf2-4096", []string{"--sector-size", "4096", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"}, 4096},
		{"pbkdf2-512", []string{"--sector-size", "512", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"}, 512},
		{"argon2id", []string{"--sector-size", "4096", "--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32", "--pbkdf-parallel", "1"}, 4096},
		{"argon2i-256bit", []string{"--sector-size", "4096", "--key-size", "256", "--pbkdf", "argon2i", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "64", "--pbkdf-parallel", "2"}, 4096},
	} {
		t.Run(c.name, func(t *testing.T) {
			f, path := sparseFile(t)
			args := append([]string{"luksFormat", "--type", "luks2", "--batch-mode",
				"--key-file", writeFile(t, "pass", testPass)}, c.args...)
			mustCryptsetup(t, append(args, path)...)
			want := dumpVolumeKey(t, path, testPass)
			m := dumpJSON(t, path)

			h, err := luks2.Read(f)
			if err != nil {
				t.Fatalf("Read: %v", err)
			}
			if got, want := h.UUID(), jsonUUID(t, path); got != want {
				t.Errorf("UUID = %q, want %q", got, want)
			}
			if got := h.SectorSize(); got != c.ss {
				t.Errorf("SectorSize = %d, want %d", got, c.ss)
			}
			if got := h.Cipher(); got != jsonPath(m, "segments", "0", "encryption") {
				t.Errorf("Cipher = %q", got)
			}
			if got := fmt.Sprint(h.DataOffset()); got != jsonPath(m, "segments", "0", "offset") {
				t.Errorf("DataOffset = %s", got)
			}
			if got := h.KeySize(); got != len(want) {
				t.Errorf("KeySize = %d, want %d", got, len(want))
			}
			vk, err := h.Unlock(f, testPass)
			if err != nil {
				t.Fatalf("Unlock: %v", err)
			}
			if !bytes.Equal(vk, want) {
				t.Errorf("Unlock = %x, want %x", vk, want)
			}
			if _, err := h.Unlock(f, []byte("wrong")); !errors.Is(err, luks2.ErrWrongPassphrase) {
				t.Errorf("Unlock(wrong) error = %v, want ErrWrongPassphrase", err)
			}
		})
	}
}

func jsonUUID(t *testing.T, path string) string {
	t.Helper()
	out := mustCryptsetup(t, "luksUUID", path)
	return strings.TrimSpace(out)
}

// TestCryptsetupTestdata checks a stored cryptsetup-made header, without
// needing cryptsetup.
func TestCryptsetupTestdata(t *testing.T) {
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
	d := &memDisk{b: img}
	h, err := luks2.Read(d)
	if err != nil {
		t.Fatalf("Read: %v", err)
	}
	for _, c := range []struct {
		name      string
		got, want any
	}{
		{"UUID", h.UUID(), "6f1d3c2a-9b4e-4c1d-8e2f-0a1b2c3d4e5f"},
		{"Label", h.Label(), "cryptnbd-testdata"},
		{"SeqID", h.SeqID(), uint64(4)},
		{"SectorSize", h.SectorSize(), 4096},
		{"DataOffset", h.DataOffset(), int64(16 << 20)},
		{"Cipher", h.Cipher(), "aes-xts-plain64"},
		{"KeySize", h.KeySize(), 64},
	} {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
	toks := h.Tokens()
	var tok struct {
		Type     string   `json:"type"`
		Keyslots []string `json:"keyslots"`
		KID      string   `json:"kid"`
	}
	if err := json.Unmarshal(toks[0], &tok); err != nil || len(toks) != 1 {
		t.Fatalf("Tokens = %v (%v)", toks, err)
	}
	if tok.Type != "cryptnbd-keywrap" || len(tok.Keyslots) != 1 || tok.Keyslots[0] != "0" ||
		tok.KID != "https://example.vault.azure.net/keys/k/1" {
		t.Errorf("token 0 = %+v", tok)
	}

	vk, err := h.Unlock(d, []byte("cryptnbd testdata passphrase"))
	if err != nil {
		t.Fatalf("Unlock: %v", err)
	}
	want := make([]byte, 64)
	for i := range want {
		want[i] = byte(i)
	}
	if !bytes.Equal(vk, want) {
		t.Errorf("Unlock = %x, want %x", vk, want)
	}
	if _, err := h.Unlock(d, []byte("cryptnbd testdata passphrasf")); !errors.Is(err, luks2.ErrWrongPassphrase) {
		t.Errorf("Unlock(wrong) error = %v, want ErrWrongPassphrase", err)
	}

	// A header read from cryptsetup and written back keeps what it had.
	if err := h.Write(d, nil); err != nil {
		t.Fatalf("Write: %v", err)
	}
	h2, err := luks2.Read(d)
	if err != nil {
		t.Fatalf("Read after Write: %v", err)
	}
	if h2.SeqID() != 5 || h2.UUID() != h.UUID() || !bytes.Equal(h2.Tokens()[0], toks[0]) {
		t.Errorf("after Write: seqid %d uuid %s tokens %v", h2.SeqID(), h2.UUID(), h2.Tokens())
	}
	if vk2, err := h2.Unlock(d, []byte("cryptnbd testdata passphrase")); err != nil || !bytes.Equal(vk2, want) {
		t.Errorf("Unlock after Write = %x, %v", vk2, err)
	}
}

// TestTokens sets, lists and removes tokens with this package and with
// cryptsetup on the same image.
func TestTokens(t *testing.T) {
	needCryptsetup(t)
	f, path := sparseFile(t)
	h, err := luks2.Format(f, testKey(), testPass, luks2.FormatOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.SetToken(3, json.RawMessage(testToken)); err != nil {
		t.Fatal(err)
	}
	if err := h.Write(f, f.Sync); err != nil {
		t.Fatal(err)
	}
	dump := mustCryptsetup(t, "luksDump", path)
	if !strings.Contains(dump, "3: cryptnbd-keywrap\n\tKeyslot:    0") {
		t.Errorf("luksDump does not list token 3 with keyslot 0:\n%s", dump)
	}
	exported := mustCryptsetup(t, "token", "export", "--token-id", "3", path)
	var got, want map[string]any
	json.Unmarshal([]byte(exported), &got)
	json.Unmarshal([]byte(testToken), &want)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("cryptsetup token export = %v, want %v", got, want)
	}

	// cryptsetup adds one; we see both.
	imported := `{"type":"other-type","keyslots":[],"x":[1,2,{"y":null}]}`
	mustCryptsetup(t, "token", "import", "--token-id", "7", "--json-file",
		writeFile(t, "tok.json", []byte(imported)), path)
	h, err = luks2.Read(f)
	if err != nil {
		t.Fatal(err)
	}
	toks := h.Tokens()
	if len(toks) != 2 || string(toks[7]) != imported {
		t.Errorf("Tokens after cryptsetup import = %v", toks)
	}
	var tok3 map[string]any
	json.Unmarshal(toks[3], &tok3)
	if fmt.Sprint(tok3) != fmt.Sprint(want) {
		t.Errorf("token 3 = %s", toks[3])
	}

	// We remove ours; cryptsetup sees only its own.
	h.RemoveToken(3)
	if err := h.Write(f, f.Sync); err != nil {
		t.Fatal(err)
	}
	dump = mustCryptsetup(t, "luksDump", path)
	if strings.Contains(dump, "cryptnbd-keywrap") || !strings.Contains(dump, "7: other-type") {
		t.Errorf("luksDump after RemoveToken(3):\n%s", dump)
	}
	if out, err := cryptsetup(t, "open", "--test-passphrase", "--key-file", writeFile(t, "p", testPass), path); err != nil {
		t.Errorf("open --test-passphrase after token edits: %v\n%s", err, out)
	}
}

func TestSetTokenErrors(t *testing.T) {
	_, h := formatMem(t, luks2.FormatOptions{})
	for _, c := range []struct {
		name string
		id   int
		tok  string
	}{
		{"negative ID", -1, `{"type":"t","keyslots":[]}`},
		{"ID too large", 32, `{"type":"t","keyslots":[]}`},
		{"not JSON", 0, `{"type":`},
		{"array", 0, `[1]`},
		{"null", 0, `null`},
		{"no type", 0, `{"keyslots":[]}`},
		{"empty type", 0, `{"type":"","keyslots":[]}`},
		{"type not a string", 0, `{"type":1,"keyslots":[]}`},
		{"no keyslots", 0, `{"type":"t"}`},
		{"keyslots not an array", 0, `{"type":"t","keyslots":"0"}`},
		{"keyslot not a string", 0, `{"type":"t","keyslots":[0]}`},
		{"missing keyslot", 0, `{"type":"t","keyslots":["1"]}`},
		{"too large", 0, `{"type":"t","keyslots":[],"pad":"` + strings.Repeat("x", 13000) + `"}`},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := h.SetToken(c.id, json.RawMessage(c.tok)); err == nil {
				t.Errorf("SetToken(%d, %s) succeeded", c.id, c.tok)
			}
			if n := len(h.Tokens()); n != 0 {
				t.Errorf("%d tokens after a failed SetToken", n)
			}
		})
	}
	if err := h.SetToken(31, json.RawMessage(`{"type":"t","keyslots":["0"]}`)); err != nil {
		t.Errorf("SetToken(31): %v", err)
	}
}

// TestWriteCrash cuts Write short at many points, twice in a row, and
// checks that Read always returns the last committed header or the one
// being written.
func TestWriteCrash(t *testing.T) {
	// A 1 MiB data offset keeps the image, cloned for every cut, small.
	base, h0 := formatMem(t, luks2.FormatOptions{DataOffset: mib})
	seq0 := h0.SeqID()
	cuts := []int{0, 1, 100, 511, 512, 4095, 4096, 8000, 16383, 16384, 16385, 20480, 32767, 32768}

	// state identifies a header by seqid and token 0's "n".
	state := func(t *testing.T, d *memDisk) (*luks2.Header, string) {
		t.Helper()
		h, err := luks2.Read(d)
		if err != nil {
			t.Fatalf("Read after crash: %v", err)
		}
		var tok struct{ N string }
		json.Unmarshal(h.Tokens()[0], &tok)
		return h, fmt.Sprintf("%d/%s", h.SeqID(), tok.N)
	}
	setN := func(t *testing.T, h *luks2.Header, n string) {
		t.Helper()
		if err := h.SetToken(0, json.RawMessage(`{"type":"t","keyslots":["0"],"n":"`+n+`"}`)); err != nil {
			t.Fatal(err)
		}
	}

	for _, c1 := range cuts {
		d1 := base.clone()
		h1, _ := state(t, d1)
		setN(t, h1, "a")
		err := h1.Write(&crashWriter{d: d1, budget: c1}, nil)
		if c1 < 2*mdSize && err == nil {
			t.Fatalf("cut %d: Write succeeded", c1)
		}
		_, s1 := state(t, d1)
		old, next := fmt.Sprintf("%d/", seq0), fmt.Sprintf("%d/a", seq0+1)
		if s1 != old && s1 != next {
			t.Fatalf("cut %d: Read gives %s, want %s or %s", c1, s1, old, next)
		}
		// Crash again, from the state the first crash left.
		for _, c2 := range cuts {
			d2 := d1.clone()
			h2, committed := state(t, d2)
			setN(t, h2, "b")
			h2.Write(&crashWriter{d: d2, budget: c2}, nil)
			_, s2 := state(t, d2)
			next := fmt.Sprintf("%d/b", h2.SeqID())
			if s2 != committed && s2 != next {
				t.Errorf("cuts %d then %d: Read gives %s, want %s or %s", c1, c2, s2, committed, next)
			}
		}
	}

	// A failing sync after the first copy: Write reports it, and the copy
	// already written wins.
	d := base.clone()
	h, _ := state(t, d)
	setN(t, h, "c")
	syncErr := errors.New("sync failed")
	if err := h.Write(d, func() error { return syncErr }); !errors.Is(err, syncErr) {
		t.Errorf("Write with failing sync: %v", err)
	}
	if _, s := state(t, d); s != fmt.Sprintf("%d/c", seq0+1) {
		t.Errorf("after failed sync Read gives %s", s)
	}
	// The same Header can be written again, and fixes both copies.
	if err := h.Write(d, nil); err != nil {
		t.Fatal(err)
	}
	if seqID(d.b, 0) != seq0+2 || seqID(d.b, mdSize) != seq0+2 {
		t.Errorf("seqids after rewrite: %d, %d", seqID(d.b, 0), seqID(d.b, mdSize))
	}
}

// TestReadDamaged damages one copy and checks Read uses the other.
func TestReadDamaged(t *testing.T) {
	base, h0 := formatMem(t, luks2.FormatOptions{Label: "damaged", DataOffset: mib})
	for _, c := range []struct {
		name    string
		damage  func(b []byte)
		wantErr error
	}{
		{"primary JSON byte", func(b []byte) { b[binSize+10] ^= 1 }, nil},
		{"primary checksum", func(b []byte) { b[csumOff] ^= 1 }, nil},
		{"primary seqid", func(b []byte) { b[seqIDOff+7]++ }, nil},
		{"primary magic", func(b []byte) { clear(b[:6]) }, nil},
		{"primary zeroed", func(b []byte) { clear(b[:mdSize]) }, nil},
		{"secondary JSON byte", func(b []byte) { b[mdSize+binSize+10] ^= 1 }, nil},
		{"secondary zeroed", func(b []byte) { clear(b[mdSize : 2*mdSize]) }, nil},
		{"both JSON", func(b []byte) { b[binSize+10] ^= 1; b[mdSize+binSize+10] ^= 1 }, luks2.ErrCorrupt},
		{"primary bad, secondary gone", func(b []byte) { b[binSize+10] ^= 1; clear(b[mdSize : 2*mdSize]) }, luks2.ErrCorrupt},
		{"both zeroed", func(b []byte) { clear(b[:2*mdSize]) }, luks2.ErrNoHeader},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := base.clone()
			c.damage(d.b)
			h, err := luks2.Read(d)
			if c.wantErr != nil {
				if !errors.Is(err, c.wantErr) {
					t.Errorf("Read error = %v, want %v", err, c.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Read: %v", err)
			}
			if h.SeqID() != h0.SeqID() || h.Label() != "damaged" || h.UUID() != h0.UUID() {
				t.Errorf("Read = seqid %d label %q", h.SeqID(), h.Label())
			}
			if vk, err := h.Unlock(d, testPass); err != nil || !bytes.Equal(vk, testKey()) {
				t.Errorf("Unlock = %x, %v", vk, err)
			}
			// Writing repairs the damaged copy.
			if err := h.Write(d, nil); err != nil {
				t.Fatal(err)
			}
			want := h0.SeqID() + 1
			if seqID(d.b, 0) != want || seqID(d.b, mdSize) != want {
				t.Errorf("seqids after Write: %d, %d, want %d", seqID(d.b, 0), seqID(d.b, mdSize), want)
			}
			if _, err := luks2.Read(&memDisk{b: append(bytes.Clone(d.b[:mdSize]), make([]byte, mdSize)...)}); err != nil {
				t.Errorf("primary alone after repair: %v", err)
			}
		})
	}
}

// TestReadMalformed feeds headers with well-formed checksums but bad
// content to Read.
func TestReadMalformed(t *testing.T) {
	base, _ := formatMem(t, luks2.FormatOptions{DataOffset: mib})
	del := func(path ...string) func(m map[string]any) {
		return func(m map[string]any) {
			obj := jsonPath(m, path[:len(path)-1]...).(map[string]any)
			delete(obj, path[len(path)-1])
		}
	}
	set := func(v any, path ...string) func(m map[string]any) {
		return func(m map[string]any) {
			obj := jsonPath(m, path[:len(path)-1]...).(map[string]any)
			obj[path[len(path)-1]] = v
		}
	}
	for _, c := range []struct {
		name    string
		mutate  func(m map[string]any)
		text    string // used instead of mutate when set
		binary  func(b []byte)
		wantErr error
	}{
		{name: "JSON syntax", text: `{"keyslots":`, wantErr: luks2.ErrCorrupt},
		{name: "JSON array", text: `[1,2]`, wantErr: luks2.ErrCorrupt},
		{name: "empty JSON", text: ``, wantErr: luks2.ErrCorrupt},
		{name: "JSON object then garbage", text: `{} x`, wantErr: luks2.ErrCorrupt},
		{name: "empty object", text: `{}`, wantErr: luks2.ErrCorrupt},
		{name: "no segments", mutate: del("segments"), wantErr: luks2.ErrCorrupt},
		{name: "no config", mutate: del("config"), wantErr: luks2.ErrCorrupt},
		{name: "tokens null", mutate: set(nil, "tokens"), wantErr: luks2.ErrCorrupt},
		{name: "json_size wrong", mutate: set("4096", "config", "json_size"), wantErr: luks2.ErrCorrupt},
		{name: "json_size number", mutate: set(12288, "config", "json_size"), wantErr: luks2.ErrCorrupt},
		{name: "keyslots_size unaligned", mutate: set("1000", "config", "keyslots_size"), wantErr: luks2.ErrCorrupt},
		{name: "keyslots_size past data", mutate: set("33554432", "config", "keyslots_size"), wantErr: luks2.ErrCorrupt},
		{name: "segment offset not numbered", mutate: set("-1", "segments", "0", "offset"), wantErr: luks2.ErrCorrupt},
		{name: "segment offset unaligned", mutate: set("16777217", "segments", "0", "offset"), wantErr: luks2.ErrCorrupt},
		{name: "sector size 0", mutate: set(0, "segments", "0", "sector_size"), wantErr: luks2.ErrCorrupt},
		{name: "sector size string", mutate: set("4096", "segments", "0", "sector_size"), wantErr: luks2.ErrCorrupt},
		{name: "segment key not numbered", mutate: func(m map[string]any) {
			s := m["segments"].(map[string]any)
			s["x"] = s["0"]
			delete(s, "0")
		}, wantErr: luks2.ErrCorrupt},
		{name: "keyslot area in metadata", mutate: set("16384", "keyslots", "0", "area", "offset"), wantErr: luks2.ErrCorrupt},
		{name: "keyslot area past keyslots", mutate: set("16777216", "keyslots", "0", "area", "offset"), wantErr: luks2.ErrCorrupt},
		{name: "keyslot without kdf", mutate: del("keyslots", "0", "kdf"), wantErr: luks2.ErrCorrupt},
		{name: "pbkdf2 extra field", mutate: set(1, "keyslots", "0", "kdf", "time"), wantErr: luks2.ErrCorrupt},
		{name: "key name case", mutate: func(m map[string]any) {
			ks := jsonPath(m, "keyslots", "0").(map[string]any)
			ks["Key_Size"] = ks["key_size"]
			delete(ks, "key_size")
		}, wantErr: luks2.ErrCorrupt},
		{name: "nested key name case", mutate: func(m map[string]any) {
			a := jsonPath(m, "keyslots", "0", "area").(map[string]any)
			a["Offset"] = a["offset"]
			delete(a, "offset")
		}, wantErr: luks2.ErrCorrupt},
		{name: "key_size negative", mutate: set(-1, "keyslots", "0", "key_size"), wantErr: luks2.ErrCorrupt},
		{name: "digest to missing keyslot", mutate: set([]any{"5"}, "digests", "0", "keyslots"), wantErr: luks2.ErrCorrupt},
		{name: "digest to missing segment", mutate: set([]any{"1"}, "digests", "0", "segments"), wantErr: luks2.ErrCorrupt},
		{name: "segment without digest", mutate: set([]any{}, "digests", "0", "segments"), wantErr: luks2.ErrCorrupt},
		{name: "token to missing keyslot", mutate: set(map[string]any{"type": "t", "keyslots": []any{"4"}}, "tokens", "0"), wantErr: luks2.ErrCorrupt},
		{name: "token without type", mutate: set(map[string]any{"keyslots": []any{}}, "tokens", "0"), wantErr: luks2.ErrCorrupt},
		{name: "requirements", mutate: set(map[string]any{"mandatory": []any{"online-reencrypt-v2"}}, "config", "requirements"), wantErr: luks2.ErrUnsupported},
		{name: "fixed size segment", mutate: set("1048576", "segments", "0", "size"), wantErr: luks2.ErrUnsupported},
		{name: "iv_tweak", mutate: set("8", "segments", "0", "iv_tweak"), wantErr: luks2.ErrUnsupported},
		{name: "linear segment", mutate: set("linear", "segments", "0", "type"), wantErr: luks2.ErrUnsupported},
		{name: "bad magic", binary: func(b []byte) { b[0], b[mdSize] = 'X', 'X' }, wantErr: luks2.ErrNoHeader},
		{name: "version 1", binary: func(b []byte) { b[7], b[mdSize+7] = 1, 1; fixChecksum(b, 0); fixChecksum(b, mdSize) }, wantErr: luks2.ErrCorrupt},
		{name: "bad metadata size", binary: func(b []byte) { b[13], b[mdSize+13] = 0x50, 0x50; fixChecksum(b, 0); fixChecksum(b, mdSize) }, wantErr: luks2.ErrCorrupt},
		{name: "bad checksum alg", binary: func(b []byte) {
			copy(b[72:], "md5\x00\x00\x00")
			copy(b[mdSize+72:], "md5\x00\x00\x00")
			fixChecksum(b, 0)
			fixChecksum(b, mdSize)
		}, wantErr: luks2.ErrCorrupt},
		{name: "garbage after NUL", binary: func(b []byte) { b[mdSize-1], b[2*mdSize-1] = 1, 1; fixChecksum(b, 0); fixChecksum(b, mdSize) }, wantErr: luks2.ErrCorrupt},
		{name: "no NUL", binary: func(b []byte) {
			for _, off := range []int{0, mdSize} {
				for i := off + binSize; i < off+mdSize; i++ {
					b[i] = ' '
				}
				b[off+binSize] = '{'
				b[off+mdSize-1] = '}'
				fixChecksum(b, off)
			}
		}, wantErr: luks2.ErrCorrupt},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := base.clone()
			switch {
			case c.binary != nil:
				c.binary(d.b)
			case c.mutate != nil:
				mutateJSON(t, d.b, c.mutate)
			default:
				setJSON(d.b, 0, []byte(c.text))
				setJSON(d.b, mdSize, []byte(c.text))
			}
			h, err := luks2.Read(d)
			if !errors.Is(err, c.wantErr) {
				t.Errorf("Read error = %v, want %v", err, c.wantErr)
			}
			if h != nil {
				t.Errorf("Read returned a header with error %v", err)
			}
			if err != nil && !strings.HasPrefix(err.Error(), "luks2: ") {
				t.Errorf("error %q lacks the luks2: prefix", err)
			}
		})
	}
}

// TestWipe checks that a wiped image has no header for us or cryptsetup,
// and that the data region is untouched.
func TestWipe(t *testing.T) {
	needCryptsetup(t)
	f, path := sparseFile(t)
	h, err := luks2.Format(f, testKey(), testPass, luks2.FormatOptions{})
	if err != nil {
		t.Fatal(err)
	}
	marker := []byte("data region must survive")
	if _, err := f.WriteAt(marker, h.DataOffset()); err != nil {
		t.Fatal(err)
	}
	before := make([]byte, h.DataOffset())
	if _, err := f.ReadAt(before, 0); err != nil {
		t.Fatal(err)
	}
	syncs := 0
	if err := luks2.Wipe(f, h, func() error { syncs++; return f.Sync() }); err != nil {
		t.Fatalf("Wipe: %v", err)
	}
	if syncs < 1 {
		t.Errorf("Wipe called sync %d times", syncs)
	}
	if _, err := luks2.Read(f); !errors.Is(err, luks2.ErrNoHeader) {
		t.Errorf("Read after Wipe: %v, want ErrNoHeader", err)
	}
	if out, err := cryptsetup(t, "open", "--test-passphrase", "--key-file", writeFile(t, "p", testPass), path); err == nil {
		t.Errorf("cryptsetup open --test-passphrase succeeded after Wipe\n%s", out)
	}
	after := make([]byte, h.DataOffset()+int64(len(marker)))
	if _, err := f.ReadAt(after, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(after[h.DataOffset():], marker) {
		t.Errorf("data region changed: %q", after[h.DataOffset():])
	}
	// Every 4 KiB block before the data changed (the keyslot area included).
	for off := 0; off < len(before); off += 4096 {
		if bytes.Equal(before[off:off+4096], after[off:off+4096]) {
			t.Fatalf("block at %d unchanged by Wipe", off)
		}
	}
}

func TestUnlockWrongPassphrase(t *testing.T) {
	d, h := formatMem(t, luks2.FormatOptions{SectorSize: 512, PBKDFIterations: 2000})
	for _, pass := range [][]byte{nil, []byte("correct horse battery stapl"), []byte("correct horse battery staple ")} {
		if vk, err := h.Unlock(d, pass); !errors.Is(err, luks2.ErrWrongPassphrase) || vk != nil {
			t.Errorf("Unlock(%q) = %x, %v, want ErrWrongPassphrase", pass, vk, err)
		}
	}
	vk, err := h.Unlock(d, testPass)
	if err != nil || !bytes.Equal(vk, testKey()) {
		t.Errorf("Unlock = %x, %v", vk, err)
	}
	// A damaged keyslot area gives a wrong key, caught by the digest.
	d.b[32768+1000] ^= 1
	if _, err := h.Unlock(d, testPass); !errors.Is(err, luks2.ErrWrongPassphrase) {
		t.Errorf("Unlock with damaged area: %v, want ErrWrongPassphrase", err)
	}
	// A truncated device is an I/O error, not a wrong passphrase.
	short := &memDisk{b: d.b[:40000]}
	if _, err := h.Unlock(short, testPass); err == nil || errors.Is(err, luks2.ErrWrongPassphrase) {
		t.Errorf("Unlock on a truncated device: %v", err)
	}
}

func TestFormatOptions(t *testing.T) {
	for _, c := range []struct {
		name string
		o    luks2.FormatOptions
		key  int
		ok   bool
	}{
		{"defaults", luks2.FormatOptions{}, 64, true},
		{"1 MiB offset", luks2.FormatOptions{DataOffset: 1 << 20, SectorSize: 2048}, 64, true},
		{"upper-case UUID", luks2.FormatOptions{UUID: "0C3E1F4A-5B6C-4D7E-8F90-A1B2C3D4E5F6"}, 64, true},
		{"47-byte label", luks2.FormatOptions{Label: strings.Repeat("l", 47)}, 64, true},
		{"short key", luks2.FormatOptions{}, 32, false},
		{"sector 8192", luks2.FormatOptions{SectorSize: 8192}, 64, false},
		{"sector 1000", luks2.FormatOptions{SectorSize: 1000}, 64, false},
		{"unaligned offset", luks2.FormatOptions{DataOffset: 16<<20 + 4096}, 64, false},
		{"negative offset", luks2.FormatOptions{DataOffset: -1 << 20}, 64, false},
		{"few iterations", luks2.FormatOptions{PBKDFIterations: 999}, 64, false},
		{"48-byte label", luks2.FormatOptions{Label: strings.Repeat("l", 48)}, 64, false},
		{"bad UUID", luks2.FormatOptions{UUID: "not-a-uuid"}, 64, false},
		{"short rand", luks2.FormatOptions{Rand: bytes.NewReader(make([]byte, 100))}, 64, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := &memDisk{}
			key := testKey()[:c.key]
			h, err := luks2.Format(d, key, testPass, c.o)
			if !c.ok {
				if err == nil {
					t.Errorf("Format succeeded")
				}
				return
			}
			if err != nil {
				t.Fatalf("Format: %v", err)
			}
			r, err := luks2.Read(d)
			if err != nil {
				t.Fatalf("Read: %v", err)
			}
			wantSS, wantOff := c.o.SectorSize, c.o.DataOffset
			if wantSS == 0 {
				wantSS = 4096
			}
			if wantOff == 0 {
				wantOff = luks2.DefaultDataOffset
			}
			if r.SectorSize() != wantSS || r.DataOffset() != wantOff || r.Label() != c.o.Label ||
				r.UUID() != h.UUID() || r.SeqID() != 1 || r.KeySize() != 64 || r.Cipher() != "aes-xts-plain64" {
				t.Errorf("Read = sector %d offset %d label %q uuid %q seqid %d",
					r.SectorSize(), r.DataOffset(), r.Label(), r.UUID(), r.SeqID())
			}
			if c.o.UUID != "" && r.UUID() != strings.ToLower(c.o.UUID) {
				t.Errorf("UUID = %q", r.UUID())
			}
			if int64(len(d.b)) > wantOff {
				t.Errorf("Format wrote up to %d, past the data offset %d", len(d.b), wantOff)
			}
			if vk, err := r.Unlock(d, testPass); err != nil || !bytes.Equal(vk, key) {
				t.Errorf("Unlock = %x, %v", vk, err)
			}
		})
	}
}

// TestFormatDeterministic checks that Rand drives all randomness: the same
// seed gives the same image.
func TestFormatDeterministic(t *testing.T) {
	img := func() []byte {
		d := &memDisk{}
		rnd := &countingReader{}
		if _, err := luks2.Format(d, testKey(), testPass, luks2.FormatOptions{Rand: rnd, DataOffset: 1 << 20}); err != nil {
			t.Fatal(err)
		}
		return d.b
	}
	a, b := img(), img()
	if !bytes.Equal(a, b) {
		t.Errorf("two Formats with the same Rand differ")
	}
}

type countingReader struct{ n byte }

func (c *countingReader) Read(p []byte) (int, error) {
	for i := range p {
		c.n = c.n*31 + 7
		p[i] = c.n
	}
	return len(p), nil
}
