package luks2

import (
	"crypto/aes"
	"crypto/pbkdf2"
	"crypto/subtle"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"math"
	"slices"

	"golang.org/x/crypto/argon2"
	"golang.org/x/crypto/xts"
)

const (
	afStripes      = 4000 // LUKS_STRIPES: cryptsetup always uses 4000
	kdfSaltLen     = 32   // LUKS_SALTSIZE
	areaSectorSize = 512  // keyslot areas are encrypted in 512-byte sectors
	// maxArgon2MemoryKiB is cryptsetup's upper bound for argon2 memory (4 GiB).
	maxArgon2MemoryKiB = 4 << 20
)

// errSkip marks a keyslot Unlock cannot use (unknown type, KDF, cipher).
var errSkip = errors.New("keyslot not usable")

// Unlock derives the volume key from passphrase through the keyslots bound to
// the data segment, trying high-priority keyslots first and skipping those
// with priority "ignore", and checks each candidate against the segment's
// digest. It reads the keyslot areas from r. The caller owns the returned key
// and should zero it when done; intermediate key material is zeroed (best
// effort: the KDF implementations keep copies this package cannot reach).
//
// Errors: ErrWrongPassphrase if no usable keyslot opens; ErrUnsupported if
// no keyslot is usable at all; I/O errors from r, wrapped.
func (h *Header) Unlock(r io.ReaderAt, passphrase []byte) ([]byte, error) {
	ids := h.segmentKeyslots()
	prio := func(id int) int64 {
		if p := h.md.keyslots[id].Priority; p != nil {
			return *p
		}
		return 1
	}
	slices.SortStableFunc(ids, func(a, b int) int { return int(prio(b) - prio(a)) })
	tried := 0
	var lastSkip error
	for _, id := range ids {
		if prio(id) == 0 {
			continue
		}
		vk, err := h.openKeyslot(r, id, passphrase)
		if errors.Is(err, errSkip) {
			lastSkip = err
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("luks2: keyslot %d: %w", id, err)
		}
		tried++
		ok, err := h.verifyKey(id, vk)
		if err != nil {
			clear(vk)
			if errors.Is(err, errSkip) {
				lastSkip = err
				continue
			}
			return nil, fmt.Errorf("luks2: keyslot %d: %w", id, err)
		}
		if ok {
			return vk, nil
		}
		clear(vk)
	}
	if tried == 0 {
		if lastSkip != nil {
			return nil, fmt.Errorf("%w: no usable keyslot: %v", ErrUnsupported, lastSkip)
		}
		return nil, fmt.Errorf("%w: no keyslot for the data segment", ErrUnsupported)
	}
	return nil, ErrWrongPassphrase
}

// openKeyslot returns the candidate volume key stored in keyslot id under
// passphrase. A wrong passphrase yields a wrong key, not an error.
func (h *Header) openKeyslot(r io.ReaderAt, id int, passphrase []byte) ([]byte, error) {
	ks := h.md.keyslots[id]
	if ks.Type != "luks2" {
		return nil, fmt.Errorf("keyslot %d type %q: %w", id, ks.Type, errSkip)
	}
	var af keyslotAF
	var kdf keyslotKDF
	if err := json.Unmarshal(ks.AF, &af); err != nil {
		return nil, fmt.Errorf("af: %w", err) // validated by Read; unreachable
	}
	if err := json.Unmarshal(ks.KDF, &kdf); err != nil {
		return nil, fmt.Errorf("kdf: %w", err)
	}
	afHash, ok := newHash(af.Hash)
	if !ok {
		return nil, fmt.Errorf("keyslot %d AF hash %q: %w", id, af.Hash, errSkip)
	}
	if *af.Stripes != afStripes {
		return nil, fmt.Errorf("keyslot %d: %d AF stripes: %w", id, *af.Stripes, errSkip)
	}
	if ks.Area.Encryption != "aes-xts-plain64" || (*ks.Area.KeySize != 32 && *ks.Area.KeySize != 64) {
		return nil, fmt.Errorf("keyslot %d area cipher %s/%d: %w", id, ks.Area.Encryption, *ks.Area.KeySize, errSkip)
	}
	keySize := int(*ks.KeySize)
	if keySize == 0 || keySize > 1024 {
		return nil, fmt.Errorf("keyslot %d key size %d: %w", id, keySize, errSkip)
	}
	afLen := roundUp(uint64(keySize)*afStripes, areaSectorSize)
	if afLen > ks.areaSize {
		return nil, fmt.Errorf("keyslot %d: area of %d bytes cannot hold %d: %w", id, ks.areaSize, afLen, errSkip)
	}

	derived, err := deriveKey(kdf, passphrase, int(*ks.Area.KeySize))
	if err != nil {
		return nil, fmt.Errorf("keyslot %d: %w", id, err)
	}
	defer clear(derived)

	material := make([]byte, afLen)
	defer clear(material)
	if err := readFull(r, material, int64(ks.areaOffset)); err != nil {
		return nil, fmt.Errorf("read keyslot area: %w", err)
	}
	if err := cryptArea(derived, material, false); err != nil {
		return nil, err
	}
	return afMerge(material, keySize, afStripes, afHash), nil
}

// deriveKey runs a keyslot KDF over passphrase.
func deriveKey(kdf keyslotKDF, passphrase []byte, keyLen int) ([]byte, error) {
	salt, err := base64.StdEncoding.DecodeString(kdf.Salt)
	if err != nil || len(salt) != kdfSaltLen {
		return nil, fmt.Errorf("bad KDF salt: %w", errSkip)
	}
	switch kdf.Type {
	case "pbkdf2":
		hf, ok := newHash(kdf.Hash)
		if !ok {
			return nil, fmt.Errorf("pbkdf2 hash %q: %w", kdf.Hash, errSkip)
		}
		if *kdf.Iterations < 1 || *kdf.Iterations > math.MaxUint32 {
			return nil, fmt.Errorf("pbkdf2 iterations %d: %w", *kdf.Iterations, errSkip)
		}
		// crypto/pbkdf2 takes the passphrase as a string: that copy cannot
		// be zeroed.
		k, err := pbkdf2.Key(hf, string(passphrase), salt, int(*kdf.Iterations), keyLen)
		if err != nil {
			return nil, fmt.Errorf("pbkdf2: %w", err)
		}
		return k, nil
	case "argon2i", "argon2id":
		t, m, p := *kdf.Time, *kdf.Memory, *kdf.CPUs
		if t < 1 || t > math.MaxUint32 || m < 8*p || m > maxArgon2MemoryKiB || p < 1 || p > 255 {
			return nil, fmt.Errorf("argon2 parameters t=%d m=%d p=%d: %w", t, m, p, errSkip)
		}
		if kdf.Type == "argon2i" {
			return argon2.Key(passphrase, salt, uint32(t), uint32(m), uint8(p), uint32(keyLen)), nil
		}
		return argon2.IDKey(passphrase, salt, uint32(t), uint32(m), uint8(p), uint32(keyLen)), nil
	}
	return nil, fmt.Errorf("KDF %q: %w", kdf.Type, errSkip)
}

// verifyKey checks a candidate volume key against the digests that bind
// keyslot id to the data segment.
func (h *Header) verifyKey(id int, vk []byte) (bool, error) {
	want := fmt.Sprint(id)
	for _, did := range h.md.segmentDigests(0) {
		d := h.md.digests[did]
		if !slices.Contains(d.Keyslots, want) {
			continue
		}
		if d.Type != "pbkdf2" {
			return false, fmt.Errorf("digest %d type %q: %w", did, d.Type, errSkip)
		}
		hf, ok := newHash(d.Hash)
		if !ok || d.Iterations == nil || *d.Iterations < 1 || *d.Iterations > math.MaxUint32 {
			return false, fmt.Errorf("digest %d parameters: %w", did, errSkip)
		}
		salt, err := base64.StdEncoding.DecodeString(d.Salt)
		if err != nil || len(salt) != kdfSaltLen {
			return false, fmt.Errorf("digest %d salt: %w", did, errSkip)
		}
		sum, err := base64.StdEncoding.DecodeString(d.Digest)
		// 20 bytes for headers converted from LUKS1 (SHA-1 sized digests).
		if err != nil || (len(sum) != 20 && len(sum) != hf().Size()) {
			return false, fmt.Errorf("digest %d value: %w", did, errSkip)
		}
		got, err := pbkdf2.Key(hf, string(vk), salt, int(*d.Iterations), len(sum))
		if err != nil {
			return false, fmt.Errorf("digest %d: %w", did, err)
		}
		if subtle.ConstantTimeCompare(got, sum) == 1 {
			return true, nil
		}
	}
	return false, nil
}

// cryptArea encrypts or decrypts a keyslot area in place with
// aes-xts-plain64: 512-byte sectors, the tweak being the little-endian
// sector number counted from the start of the area.
func cryptArea(key, buf []byte, encrypt bool) error {
	c, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		return fmt.Errorf("keyslot cipher: %w", err)
	}
	for s := 0; s*areaSectorSize < len(buf); s++ {
		sec := buf[s*areaSectorSize : (s+1)*areaSectorSize]
		if encrypt {
			c.Encrypt(sec, sec, uint64(s))
		} else {
			c.Decrypt(sec, sec, uint64(s))
		}
	}
	return nil
}

// diffuse is the AF splitter's diffusion: buf is cut into hash-sized
// blocks, block i becomes H(be32(i) || block), truncated for the last one.
func diffuse(buf []byte, hf func() hash.Hash) {
	h := hf()
	var ivb [4]byte
	sum := make([]byte, 0, h.Size())
	for i, off := 0, 0; off < len(buf); i, off = i+1, off+h.Size() {
		end := min(off+h.Size(), len(buf))
		h.Reset()
		binary.BigEndian.PutUint32(ivb[:], uint32(i))
		h.Write(ivb[:])
		h.Write(buf[off:end])
		sum = h.Sum(sum[:0])
		copy(buf[off:end], sum)
	}
	clear(sum[:cap(sum)])
}

// afMerge recovers a key of keySize bytes from its AF-split material
// (stripes × keySize bytes, LUKS1 anti-forensic splitter).
func afMerge(material []byte, keySize, stripes int, hf func() hash.Hash) []byte {
	d := make([]byte, keySize)
	for i := 0; i < stripes-1; i++ {
		subtle.XORBytes(d, d, material[i*keySize:(i+1)*keySize])
		diffuse(d, hf)
	}
	subtle.XORBytes(d, d, material[(stripes-1)*keySize:stripes*keySize])
	return d
}

// afSplit spreads key over stripes × len(key) bytes: stripes-1 random
// blocks, and a last one that makes afMerge return key.
func afSplit(key []byte, stripes int, hf func() hash.Hash, rnd io.Reader) ([]byte, error) {
	n := len(key)
	out := make([]byte, n*stripes)
	if _, err := io.ReadFull(rnd, out[:n*(stripes-1)]); err != nil {
		return nil, fmt.Errorf("random: %w", err)
	}
	d := make([]byte, n)
	defer clear(d)
	for i := 0; i < stripes-1; i++ {
		subtle.XORBytes(d, d, out[i*n:(i+1)*n])
		diffuse(d, hf)
	}
	subtle.XORBytes(out[(stripes-1)*n:], d, key)
	return out, nil
}

func roundUp(n, to uint64) uint64 { return (n + to - 1) / to * to }
