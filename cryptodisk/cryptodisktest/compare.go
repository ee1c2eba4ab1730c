package cryptodisktest

import "bytes"

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
