package luks2

import (
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"strconv"
	"strings"
)

const (
	// DefaultDataOffset is where Format puts the data segment unless told
	// otherwise: 16 MiB, as cryptsetup does.
	DefaultDataOffset = 16 << 20
	// DefaultSectorSize is the data segment's default encryption sector size.
	DefaultSectorSize = 4096
	// MinPBKDFIterations is cryptsetup's minimum PBKDF2 iteration count, and
	// Format's default.
	MinPBKDFIterations = 1000
	// VolumeKeySize is the volume key size Format accepts: 64 bytes, for
	// aes-xts-plain64 with AES-256.
	VolumeKeySize = 64

	formatCipher = "aes-xts-plain64"
	dataAlign    = 1 << 20
	chunkSize    = 1 << 20
)

// FormatOptions are the parameters of Format. The zero value selects the
// defaults.
type FormatOptions struct {
	// UUID is the header UUID in the 8-4-4-4-12 hex form; a random
	// (version 4) UUID is generated if empty.
	UUID string
	// Label is the header label, at most 47 bytes.
	Label string
	// SectorSize is the data encryption sector size: 512, 1024, 2048 or
	// 4096 (the default).
	SectorSize int
	// DataOffset is the data segment's offset in bytes, a multiple of 1 MiB
	// (default 16 MiB). The keyslots area fills the space between the two
	// metadata copies and the data, up to 128 MiB.
	DataOffset int64
	// PBKDFIterations is the PBKDF2-SHA256 iteration count of keyslot 0 and
	// of the volume key digest; at least 1000, which is the default.
	PBKDFIterations int
	// Rand supplies salts, AF stripes, the UUID and the keyslots area fill;
	// crypto/rand by default.
	Rand io.Reader
}

// Format writes a new LUKS2 header to w: both metadata copies (seqid 1) and
// the whole keyslots area, which it fills with random bytes except for
// keyslot 0, holding volumeKey (64 bytes) under passphrase with PBKDF2-SHA256
// and the LUKS1 AF splitter (4000 stripes, SHA-256), encrypted with
// aes-xts-plain64. The data segment is aes-xts-plain64 with a 512-bit key,
// iv_tweak 0 and dynamic size. Format does not touch the data region and
// does not sync; it does not retain volumeKey or passphrase.
func Format(w io.WriterAt, volumeKey, passphrase []byte, o FormatOptions) (*Header, error) {
	if len(volumeKey) != VolumeKeySize {
		return nil, fmt.Errorf("luks2: volume key is %d bytes, want %d", len(volumeKey), VolumeKeySize)
	}
	if o.SectorSize == 0 {
		o.SectorSize = DefaultSectorSize
	}
	switch o.SectorSize {
	case 512, 1024, 2048, 4096:
	default:
		return nil, fmt.Errorf("luks2: bad sector size %d", o.SectorSize)
	}
	if o.DataOffset == 0 {
		o.DataOffset = DefaultDataOffset
	}
	if o.DataOffset < 0 || o.DataOffset%dataAlign != 0 {
		return nil, fmt.Errorf("luks2: data offset %d is not a positive multiple of 1 MiB", o.DataOffset)
	}
	if o.PBKDFIterations == 0 {
		o.PBKDFIterations = MinPBKDFIterations
	}
	if o.PBKDFIterations < MinPBKDFIterations {
		return nil, fmt.Errorf("luks2: %d PBKDF2 iterations, at least %d needed", o.PBKDFIterations, MinPBKDFIterations)
	}
	if len(o.Label) >= labelLen || strings.IndexByte(o.Label, 0) >= 0 {
		return nil, fmt.Errorf("luks2: label must be at most %d bytes without NUL", labelLen-1)
	}
	if o.Rand == nil {
		o.Rand = rand.Reader
	}
	uuid := strings.ToLower(o.UUID)
	if uuid == "" {
		var err error
		if uuid, err = newUUID(o.Rand); err != nil {
			return nil, err
		}
	} else if !validUUID(uuid) {
		return nil, fmt.Errorf("luks2: bad UUID %q", o.UUID)
	}

	const hdrSize = defaultMetadataSize
	keyslotsSize := min(o.DataOffset-2*hdrSize, maxKeyslotsSize)
	keyslotsSize -= keyslotsSize % 4096
	areaOffset := int64(2 * hdrSize)
	areaSize := int64(roundUp(VolumeKeySize*afStripes, 4096))
	if areaSize > keyslotsSize {
		return nil, fmt.Errorf("luks2: data offset %d leaves no room for a keyslot", o.DataOffset)
	}

	var salts [2][saltLen]byte
	kdfSalt := make([]byte, kdfSaltLen)
	digestSalt := make([]byte, kdfSaltLen)
	for _, b := range [][]byte{salts[0][:], salts[1][:], kdfSalt, digestSalt} {
		if _, err := io.ReadFull(o.Rand, b); err != nil {
			return nil, fmt.Errorf("luks2: random: %w", err)
		}
	}

	// Keyslot 0: split the volume key and encrypt it under the derived key.
	derived, err := pbkdf2.Key(sha256.New, string(passphrase), kdfSalt, o.PBKDFIterations, VolumeKeySize)
	if err != nil {
		return nil, fmt.Errorf("luks2: pbkdf2: %w", err)
	}
	defer clear(derived)
	material, err := afSplit(volumeKey, afStripes, sha256.New, o.Rand)
	if err != nil {
		return nil, fmt.Errorf("luks2: %w", err)
	}
	if err := cryptArea(derived, material, true); err != nil {
		return nil, fmt.Errorf("luks2: %w", err)
	}
	digestSum, err := pbkdf2.Key(sha256.New, string(volumeKey), digestSalt, o.PBKDFIterations, sha256.Size)
	if err != nil {
		return nil, fmt.Errorf("luks2: pbkdf2: %w", err)
	}

	text, err := formatJSON(formatParams{
		iterations:   o.PBKDFIterations,
		kdfSalt:      kdfSalt,
		digestSalt:   digestSalt,
		digest:       digestSum,
		areaOffset:   areaOffset,
		areaSize:     areaSize,
		dataOffset:   o.DataOffset,
		sectorSize:   o.SectorSize,
		jsonSize:     hdrSize - binHeaderSize,
		keyslotsSize: keyslotsSize,
	})
	if err != nil {
		return nil, fmt.Errorf("luks2: %w", err)
	}
	area := make([]byte, hdrSize-binHeaderSize)
	copy(area, text)
	md, err := parseMetadata(area, hdrSize)
	if err != nil {
		return nil, fmt.Errorf("luks2: generated metadata: %w", err) // a bug
	}
	h := &Header{
		bin: binHeader{
			hdrSize: hdrSize,
			label:   o.Label,
			csumAlg: "sha256",
			uuid:    uuid,
		},
		salts: salts,
		md:    md,
	}

	// The keyslots area: random, with keyslot 0's material at its offset.
	if err := fillRandom(w, areaOffset, keyslotsSize, o.Rand, func(buf []byte, off int64) {
		if lo, hi := max(off, areaOffset), min(off+int64(len(buf)), areaOffset+int64(len(material))); lo < hi {
			copy(buf[lo-off:hi-off], material[lo-areaOffset:hi-areaOffset])
		}
	}); err != nil {
		return nil, fmt.Errorf("luks2: write keyslots area: %w", err)
	}
	if err := h.Write(w, nil); err != nil {
		return nil, err
	}
	return h, nil
}

type formatParams struct {
	iterations                  int
	kdfSalt, digestSalt, digest []byte
	areaOffset, areaSize        int64
	dataOffset                  int64
	sectorSize                  int
	jsonSize, keyslotsSize      int64
}

// formatJSON renders the metadata of a new header, with cryptsetup's field
// names and order.
func formatJSON(p formatParams) ([]byte, error) {
	b64 := base64.StdEncoding.EncodeToString
	itoa := func(n int64) string { return strconv.FormatInt(n, 10) }
	type (
		af struct {
			Type    string `json:"type"`
			Stripes int    `json:"stripes"`
			Hash    string `json:"hash"`
		}
		area struct {
			Type       string `json:"type"`
			Offset     string `json:"offset"`
			Size       string `json:"size"`
			Encryption string `json:"encryption"`
			KeySize    int    `json:"key_size"`
		}
		kdf struct {
			Type       string `json:"type"`
			Hash       string `json:"hash"`
			Iterations int    `json:"iterations"`
			Salt       string `json:"salt"`
		}
		keyslot struct {
			Type    string `json:"type"`
			KeySize int    `json:"key_size"`
			AF      af     `json:"af"`
			Area    area   `json:"area"`
			KDF     kdf    `json:"kdf"`
		}
		segment struct {
			Type       string `json:"type"`
			Offset     string `json:"offset"`
			Size       string `json:"size"`
			IVTweak    string `json:"iv_tweak"`
			Encryption string `json:"encryption"`
			SectorSize int    `json:"sector_size"`
		}
		digest struct {
			Type       string   `json:"type"`
			Keyslots   []string `json:"keyslots"`
			Segments   []string `json:"segments"`
			Hash       string   `json:"hash"`
			Iterations int      `json:"iterations"`
			Salt       string   `json:"salt"`
			Digest     string   `json:"digest"`
		}
		config struct {
			JSONSize     string `json:"json_size"`
			KeyslotsSize string `json:"keyslots_size"`
		}
		top struct {
			Keyslots map[string]keyslot  `json:"keyslots"`
			Tokens   map[string]struct{} `json:"tokens"`
			Segments map[string]segment  `json:"segments"`
			Digests  map[string]digest   `json:"digests"`
			Config   config              `json:"config"`
		}
	)
	return marshal(top{
		Keyslots: map[string]keyslot{"0": {
			Type:    "luks2",
			KeySize: VolumeKeySize,
			AF:      af{Type: "luks1", Stripes: afStripes, Hash: "sha256"},
			Area: area{Type: "raw", Offset: itoa(p.areaOffset), Size: itoa(p.areaSize),
				Encryption: formatCipher, KeySize: VolumeKeySize},
			KDF: kdf{Type: "pbkdf2", Hash: "sha256", Iterations: p.iterations, Salt: b64(p.kdfSalt)},
		}},
		Tokens: map[string]struct{}{},
		Segments: map[string]segment{"0": {
			Type: "crypt", Offset: itoa(p.dataOffset), Size: "dynamic", IVTweak: "0",
			Encryption: formatCipher, SectorSize: p.sectorSize,
		}},
		Digests: map[string]digest{"0": {
			Type: "pbkdf2", Keyslots: []string{"0"}, Segments: []string{"0"}, Hash: "sha256",
			Iterations: p.iterations, Salt: b64(p.digestSalt), Digest: b64(p.digest),
		}},
		Config: config{JSONSize: itoa(p.jsonSize), KeyslotsSize: itoa(p.keyslotsSize)},
	})
}

// Wipe crypto-shreds a LUKS2 device: it overwrites everything before h's
// data offset (both metadata copies and the whole keyslots area) with random
// bytes, keyslots area first, calling sync after each part. Without the
// keyslots the data region cannot be decrypted, even with a passphrase.
// sync may be nil. Wipe does not touch the data region.
func Wipe(w io.WriterAt, h *Header, sync func() error) error {
	if sync == nil {
		sync = func() error { return nil }
	}
	mdEnd := 2 * h.bin.hdrSize
	end := max(h.DataOffset(), mdEnd+int64(h.md.keyslotsSize))
	if err := fillRandom(w, mdEnd, end-mdEnd, rand.Reader, nil); err != nil {
		return fmt.Errorf("luks2: wipe keyslots area: %w", err)
	}
	if err := sync(); err != nil {
		return fmt.Errorf("luks2: wipe: sync: %w", err)
	}
	if err := fillRandom(w, 0, mdEnd, rand.Reader, nil); err != nil {
		return fmt.Errorf("luks2: wipe metadata: %w", err)
	}
	if err := sync(); err != nil {
		return fmt.Errorf("luks2: wipe: sync: %w", err)
	}
	return nil
}

// fillRandom writes n random bytes at off in chunks; overlay, if not nil,
// may change each chunk (given its device offset) before it is written.
func fillRandom(w io.WriterAt, off, n int64, rnd io.Reader, overlay func(buf []byte, off int64)) error {
	buf := make([]byte, min(n, chunkSize))
	defer clear(buf)
	for done := int64(0); done < n; {
		b := buf[:min(n-done, int64(len(buf)))]
		if _, err := io.ReadFull(rnd, b); err != nil {
			return fmt.Errorf("random: %w", err)
		}
		if overlay != nil {
			overlay(b, off+done)
		}
		if _, err := w.WriteAt(b, off+done); err != nil {
			return err
		}
		done += int64(len(b))
	}
	return nil
}

func newUUID(rnd io.Reader) (string, error) {
	var u [16]byte
	if _, err := io.ReadFull(rnd, u[:]); err != nil {
		return "", fmt.Errorf("luks2: random: %w", err)
	}
	u[6] = u[6]&0x0f | 0x40 // version 4
	u[8] = u[8]&0x3f | 0x80 // RFC 4122 variant
	s := hex.EncodeToString(u[:])
	return s[:8] + "-" + s[8:12] + "-" + s[12:16] + "-" + s[16:20] + "-" + s[20:], nil
}

func validUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := 0; i < len(s); i++ {
		switch i {
		case 8, 13, 18, 23:
			if s[i] != '-' {
				return false
			}
		default:
			if !strings.ContainsRune("0123456789abcdef", rune(s[i])) {
				return false
			}
		}
	}
	return true
}
