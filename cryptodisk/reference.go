package cryptodisk

import (
	"crypto/aes"
	"fmt"

	"golang.org/x/crypto/xts"
)

// referenceCipher is golang.org/x/crypto/xts behind SectorCipher: slow but
// obviously right, the yardstick the fast cipher is tested against.
type referenceCipher struct{ c *xts.Cipher }

// NewReferenceCipher builds the x/crypto/xts SectorCipher. Its Zero cannot
// reach crypto/aes's key schedule, so production disks use the fast cipher.
func NewReferenceCipher(key []byte) (SectorCipher, error) {
	c, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		return nil, fmt.Errorf("cryptodisk: reference xts: %w", err)
	}
	return &referenceCipher{c}, nil
}

func (r *referenceCipher) EncryptSectors(dst, src []byte, sectorSize int, tweak, step uint64) {
	for i := 0; i < len(src); i += sectorSize {
		r.c.Encrypt(dst[i:i+sectorSize], src[i:i+sectorSize], tweak)
		tweak += step
	}
}

func (r *referenceCipher) DecryptSectors(dst, src []byte, sectorSize int, tweak, step uint64) {
	for i := 0; i < len(src); i += sectorSize {
		r.c.Decrypt(dst[i:i+sectorSize], src[i:i+sectorSize], tweak)
		tweak += step
	}
}

func (r *referenceCipher) Zero() { r.c = nil }
