package cryptodisktest

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
)

// FirstDiff returns the index of the first byte where a and b differ, the
// shorter length if one is a prefix of the other, or -1 if they are equal.
func FirstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// RandomBytes returns n bytes from r in which every byte is odd, so never
// zero: a lost write, or a sector read back as a hole, shows.
func RandomBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n+8)
	for i := 0; i < n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64()|0x0101010101010101)
	}
	return b[:n:n]
}
