package cryptodisk

import "github.com/cryptnbd/cryptnbd/cryptodisk/xts"

// SectorCipher encrypts whole encryption sectors with XTS. Unit i of a call
// uses tweak firstTweak+i*tweakStep (plain64, little-endian). dst and src may
// be the same slice. Implementations must be safe for concurrent use until
// Zero, which wipes the key schedule.
type SectorCipher interface {
	EncryptSectors(dst, src []byte, sectorSize int, firstTweak, tweakStep uint64)
	DecryptSectors(dst, src []byte, sectorSize int, firstTweak, tweakStep uint64)
	Zero()
}

// CipherFactory builds a SectorCipher from a 64-byte XTS-AES-256 key. The
// factory must not keep key: the caller zeroes it afterwards.
type CipherFactory func(key []byte) (SectorCipher, error)

// DefaultCipher is the sector cipher disks use unless told otherwise: the
// AES-NI/VAES kernel, whose key schedule Zero really wipes.
func DefaultCipher(key []byte) (SectorCipher, error) {
	c, err := xts.New(key)
	if err != nil {
		return nil, err
	}
	return c, nil
}
