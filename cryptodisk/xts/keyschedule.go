package xts

// AES-256 key expansion (FIPS-197 section 5.2) in plain Go, with no lookup
// tables: the S-box is computed as the affine map of the multiplicative
// inverse, so the schedule is built in constant time and lives only in arrays
// owned by the Cipher, which Zero can wipe.

// roundKeys is an AES-256 key schedule: 15 round keys of 16 bytes in the
// standard byte order, which is also the order AESENC and AESDEC expect.
type roundKeys [15][16]byte

// gmul multiplies a and b in GF(2^8) modulo x^8+x^4+x^3+x+1, in constant time.
func gmul(a, b byte) byte {
	var p byte
	for range 8 {
		p ^= a & -(b & 1)
		hi := a >> 7
		a = a<<1 ^ 0x1b&-hi
		b >>= 1
	}
	return p
}

// sbox computes the AES S-box in constant time: the inverse x^254 followed by
// the affine transformation.
func sbox(x byte) byte {
	// x^254 = x^(2+4+8+16+32+64+128).
	x2 := gmul(x, x)
	inv := x2
	sq := x2
	for range 6 {
		sq = gmul(sq, sq)
		inv = gmul(inv, sq)
	}
	rotl := func(b byte, n uint) byte { return b<<n | b>>(8-n) }
	return inv ^ rotl(inv, 1) ^ rotl(inv, 2) ^ rotl(inv, 3) ^ rotl(inv, 4) ^ 0x63
}

// expandKey256 fills enc with the AES-256 encryption schedule of key (32
// bytes) and dec with the schedule of the Equivalent Inverse Cipher
// (FIPS-197 section 5.3.5), the form AESDEC uses: the encryption round keys
// in reverse order, InvMixColumns applied to all but the first and last.
func expandKey256(enc, dec *roundKeys, key []byte) {
	var w [60][4]byte
	for i := range 8 {
		copy(w[i][:], key[4*i:4*i+4])
	}
	rcon := byte(1)
	for i := 8; i < 60; i++ {
		t := w[i-1]
		switch i % 8 {
		case 0:
			t = [4]byte{sbox(t[1]) ^ rcon, sbox(t[2]), sbox(t[3]), sbox(t[0])}
			rcon = gmul(rcon, 2)
		case 4:
			t = [4]byte{sbox(t[0]), sbox(t[1]), sbox(t[2]), sbox(t[3])}
		}
		for j := range 4 {
			w[i][j] = w[i-8][j] ^ t[j]
		}
	}
	for i := range w {
		copy(enc[i/4][4*(i%4):], w[i][:])
	}
	clear(w[:])
	if dec == nil {
		return
	}
	dec[0] = enc[14]
	dec[14] = enc[0]
	for r := 1; r < 14; r++ {
		dec[r] = invMixColumns(enc[14-r])
	}
}

// invMixColumns applies InvMixColumns to a 16-byte state in the standard
// (column-major) byte order, as AESIMC does.
func invMixColumns(s [16]byte) [16]byte {
	var o [16]byte
	for c := range 4 {
		a0, a1, a2, a3 := s[4*c], s[4*c+1], s[4*c+2], s[4*c+3]
		o[4*c] = gmul(a0, 14) ^ gmul(a1, 11) ^ gmul(a2, 13) ^ gmul(a3, 9)
		o[4*c+1] = gmul(a0, 9) ^ gmul(a1, 14) ^ gmul(a2, 11) ^ gmul(a3, 13)
		o[4*c+2] = gmul(a0, 13) ^ gmul(a1, 9) ^ gmul(a2, 14) ^ gmul(a3, 11)
		o[4*c+3] = gmul(a0, 11) ^ gmul(a1, 13) ^ gmul(a2, 9) ^ gmul(a3, 14)
	}
	return o
}
