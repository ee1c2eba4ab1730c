package xts

import "encoding/binary"

// cryptGeneric is the portable implementation: crypto/aes for the block
// cipher, the tweak as two uint64 halves (little-endian, as IEEE 1619 orders
// the bytes).
func (c *Cipher) cryptGeneric(dst, src []byte, sectorSize int, tweak, step uint64, decrypt bool) {
	var t, b [blockSize]byte
	for off := 0; off < len(src); off += sectorSize {
		binary.LittleEndian.PutUint64(t[:8], tweak)
		binary.LittleEndian.PutUint64(t[8:], 0)
		c.tweakBlock.Encrypt(t[:], t[:])
		lo := binary.LittleEndian.Uint64(t[:8])
		hi := binary.LittleEndian.Uint64(t[8:])
		for j := off; j < off+sectorSize; j += blockSize {
			s, d := src[j:j+blockSize], dst[j:j+blockSize]
			binary.LittleEndian.PutUint64(b[:8], binary.LittleEndian.Uint64(s[:8])^lo)
			binary.LittleEndian.PutUint64(b[8:], binary.LittleEndian.Uint64(s[8:])^hi)
			if decrypt {
				c.data.Decrypt(b[:], b[:])
			} else {
				c.data.Encrypt(b[:], b[:])
			}
			binary.LittleEndian.PutUint64(d[:8], binary.LittleEndian.Uint64(b[:8])^lo)
			binary.LittleEndian.PutUint64(d[8:], binary.LittleEndian.Uint64(b[8:])^hi)
			lo, hi = mulAlpha(lo, hi)
		}
		tweak += step
	}
	clear(t[:])
	clear(b[:])
}

// mulAlpha multiplies the tweak (lo, hi) by x in GF(2^128) modulo
// x^128+x^7+x^2+x+1, in constant time.
func mulAlpha(lo, hi uint64) (uint64, uint64) {
	carry := hi >> 63
	hi = hi<<1 | lo>>63
	lo = lo<<1 ^ 0x87&-carry
	return lo, hi
}
