package xts

import (
	"crypto/aes"
	"crypto/cipher"
	"errors"
	"fmt"
	"unsafe"
)

// KeySize is the length of an XTS-AES-256 key: two AES-256 keys, the data
// key first and the tweak key second (the order of IEEE 1619, dm-crypt and
// golang.org/x/crypto/xts).
const KeySize = 64

// blockSize is the AES block size.
const blockSize = 16

// ErrKeySize is returned by New for a key that is not KeySize bytes long.
var ErrKeySize = errors.New("xts: key must be 64 bytes (XTS-AES-256)")

// impl names one implementation of the sector loop.
type impl uint8

const (
	implGeneric impl = iota // pure Go over crypto/aes
	implAESNI               // amd64 AES-NI + PCLMULQDQ, 8 blocks in flight
	implVAES                // amd64 VAES + VPCLMULQDQ on YMM, 16 blocks in flight
)

func (i impl) String() string {
	switch i {
	case implGeneric:
		return "generic"
	case implAESNI:
		return "aesni"
	case implVAES:
		return "vaes"
	}
	return fmt.Sprintf("impl(%d)", uint8(i))
}

// Cipher is XTS-AES-256 with a 64-byte key (two AES-256 keys).
//
// A Cipher is read-only after New, so any number of goroutines may call
// EncryptSectors and DecryptSectors at once. Zero must not run concurrently
// with them; the caller (the disk's suspend gate) drains in-flight I/O first.
// After Zero, EncryptSectors and DecryptSectors panic.
type Cipher struct {
	// The expanded round keys live in the Cipher's own arrays so that Zero
	// can wipe them. The generic implementation does not use them.
	enc   roundKeys // data key, encryption schedule
	dec   roundKeys // data key, Equivalent Inverse Cipher schedule
	tweak roundKeys // tweak key, encryption schedule

	impl impl
	// data and tweakBlock are crypto/aes ciphers used only by the generic
	// implementation; their internal key schedules cannot be wiped.
	data, tweakBlock cipher.Block

	zeroed bool
}

// New returns an XTS-AES-256 Cipher for key, which must be KeySize (64)
// bytes: the data key followed by the tweak key. New does not retain key; the
// caller may wipe it as soon as New returns.
func New(key []byte) (*Cipher, error) {
	return newImpl(key, bestImpl())
}

func newImpl(key []byte, im impl) (*Cipher, error) {
	if len(key) != KeySize {
		return nil, ErrKeySize
	}
	c := &Cipher{impl: im}
	expandKey256(&c.enc, &c.dec, key[:32])
	expandKey256(&c.tweak, nil, key[32:])
	if im == implGeneric {
		var err error
		if c.data, err = aes.NewCipher(key[:32]); err != nil {
			return nil, fmt.Errorf("xts: data key: %w", err)
		}
		if c.tweakBlock, err = aes.NewCipher(key[32:]); err != nil {
			return nil, fmt.Errorf("xts: tweak key: %w", err)
		}
	}
	return c, nil
}

// EncryptSectors encrypts len(src)/sectorSize consecutive data units
// (sectors) from src into dst. Unit i uses the tweak firstTweak + i*tweakStep
// (modulo 2^64) as a little-endian 64-bit number padded with zeros to 16
// bytes: dm-crypt's plain64 IV. LUKS2 counts the IV in 512-byte units, so a
// disk with 4096-byte sectors uses tweakStep 8 and one with 512-byte sectors
// uses tweakStep 1.
//
// sectorSize must be a positive multiple of 16, so no ciphertext stealing
// happens (and none is implemented). len(src) must be a multiple of
// sectorSize and len(dst) at least len(src); only dst[:len(src)] is written.
// dst and src may be the same slice (in-place encryption) but must not
// otherwise overlap. EncryptSectors panics if any of this does not hold, or
// if the Cipher has been zeroed.
func (c *Cipher) EncryptSectors(dst, src []byte, sectorSize int, firstTweak, tweakStep uint64) {
	c.check(dst, src, sectorSize)
	c.crypt(dst, src, sectorSize, firstTweak, tweakStep, false)
}

// DecryptSectors decrypts len(src)/sectorSize consecutive data units from
// src into dst. Tweaks, sizes, aliasing and panics are as for EncryptSectors.
func (c *Cipher) DecryptSectors(dst, src []byte, sectorSize int, firstTweak, tweakStep uint64) {
	c.check(dst, src, sectorSize)
	c.crypt(dst, src, sectorSize, firstTweak, tweakStep, true)
}

// Zero overwrites the key schedules held by the Cipher. The Cipher must not
// be used afterwards: every later EncryptSectors or DecryptSectors call
// panics. Zero must not run concurrently with other methods.
//
// Zeroising is best effort: on the generic implementation (other
// architectures, the purego build tag, or amd64 without AES-NI) the data is
// also processed by crypto/aes, whose internal key schedule Zero cannot
// reach; Zero drops the references so that it becomes garbage.
func (c *Cipher) Zero() {
	clear(c.enc[:])
	clear(c.dec[:])
	clear(c.tweak[:])
	c.data, c.tweakBlock = nil, nil
	c.zeroed = true
}

// Implementation reports which implementation the Cipher uses: "vaes",
// "aesni" or "generic". It is meant for logs and benchmarks.
func (c *Cipher) Implementation() string { return c.impl.String() }

func (c *Cipher) check(dst, src []byte, sectorSize int) {
	if c.zeroed {
		panic("xts: Cipher used after Zero")
	}
	if sectorSize < blockSize || sectorSize%blockSize != 0 {
		panic("xts: sector size must be a positive multiple of 16")
	}
	if len(src)%sectorSize != 0 {
		panic("xts: input is not a whole number of sectors")
	}
	if len(dst) < len(src) {
		panic("xts: output smaller than input")
	}
	if inexactOverlap(dst[:len(src)], src) {
		panic("xts: invalid buffer overlap")
	}
}

// inexactOverlap reports whether x and y share memory at different offsets.
func inexactOverlap(x, y []byte) bool {
	if len(x) == 0 || len(y) == 0 || &x[0] == &y[0] {
		return false
	}
	xs := uintptr(unsafe.Pointer(&x[0]))
	ys := uintptr(unsafe.Pointer(&y[0]))
	return xs < ys+uintptr(len(y)) && ys < xs+uintptr(len(x))
}
