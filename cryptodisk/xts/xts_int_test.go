package xts

import (
	"bytes"
	"encoding/hex"
	"testing"
)

func TestZeroWipesSchedules(t *testing.T) {
	key := bytes.Repeat([]byte{0x42}, KeySize)
	for _, im := range availableImpls() {
		t.Run(im.String(), func(t *testing.T) {
			c, err := newImpl(key, im)
			if err != nil {
				t.Fatal(err)
			}
			schedules := map[string]*roundKeys{"enc": &c.enc, "dec": &c.dec, "tweak": &c.tweak}
			for name, rk := range schedules {
				if *rk == (roundKeys{}) {
					t.Fatalf("%s schedule is zero before Zero", name)
				}
			}
			c.Zero()
			for name, rk := range schedules {
				if *rk != (roundKeys{}) {
					t.Errorf("%s schedule not wiped: %x", name, rk[0])
				}
			}
			if c.data != nil || c.tweakBlock != nil {
				t.Errorf("crypto/aes blocks still referenced after Zero")
			}
			if !c.zeroed {
				t.Errorf("zeroed flag not set")
			}
		})
	}
}

// TestKeySchedule checks expandKey256 against FIPS-197 Appendix A.3.
func TestKeySchedule(t *testing.T) {
	key, _ := hex.DecodeString("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
	var enc, dec roundKeys
	expandKey256(&enc, &dec, key)
	tests := []struct {
		word int
		want string
	}{
		{0, "603deb10"},
		{8, "9ba35411"},
		{9, "8e6925af"},
		{12, "a8b09c1a"},
		{56, "fe4890d1"},
		{59, "706c631e"},
	}
	for _, tt := range tests {
		got := hex.EncodeToString(enc[tt.word/4][4*(tt.word%4) : 4*(tt.word%4)+4])
		if got != tt.want {
			t.Errorf("w[%d] = %s, want %s", tt.word, got, tt.want)
		}
	}
	if dec[0] != enc[14] || dec[14] != enc[0] {
		t.Errorf("decryption schedule ends are not the swapped encryption ends")
	}
	for r := 1; r < 14; r++ {
		if mixColumns(dec[r]) != enc[14-r] {
			t.Errorf("dec[%d] is not InvMixColumns(enc[%d])", r, 14-r)
		}
	}
}

// mixColumns is the forward MixColumns, only to check invMixColumns.
func mixColumns(s [16]byte) [16]byte {
	var o [16]byte
	for c := range 4 {
		a0, a1, a2, a3 := s[4*c], s[4*c+1], s[4*c+2], s[4*c+3]
		o[4*c] = gmul(a0, 2) ^ gmul(a1, 3) ^ a2 ^ a3
		o[4*c+1] = a0 ^ gmul(a1, 2) ^ gmul(a2, 3) ^ a3
		o[4*c+2] = a0 ^ a1 ^ gmul(a2, 2) ^ gmul(a3, 3)
		o[4*c+3] = gmul(a0, 3) ^ a1 ^ a2 ^ gmul(a3, 2)
	}
	return o
}

func TestSboxAndMixColumns(t *testing.T) {
	for _, tt := range []struct{ in, want byte }{{0x00, 0x63}, {0x01, 0x7c}, {0x53, 0xed}, {0xff, 0x16}} {
		if got := sbox(tt.in); got != tt.want {
			t.Errorf("sbox(%#02x) = %#02x, want %#02x", tt.in, got, tt.want)
		}
	}
	var seen [256]bool
	for x := range 256 {
		seen[sbox(byte(x))] = true
	}
	for y, ok := range seen {
		if !ok {
			t.Fatalf("sbox is not a permutation: %#02x missing", y)
		}
	}
	// FIPS-197 / the classic MixColumns example: db 13 53 45 -> 8e 4d a1 bc.
	in := [16]byte{0xdb, 0x13, 0x53, 0x45}
	got := mixColumns(in)
	if want := [4]byte{0x8e, 0x4d, 0xa1, 0xbc}; [4]byte(got[:4]) != want {
		t.Errorf("mixColumns = %x, want %x", got[:4], want)
	}
	if back := invMixColumns(got); back != in {
		t.Errorf("invMixColumns(mixColumns(x)) = %x, want %x", back, in)
	}
}

func TestMulAlpha(t *testing.T) {
	tests := []struct{ lo, hi, wantLo, wantHi uint64 }{
		{1, 0, 2, 0},
		{1 << 63, 0, 0, 1},
		{0, 1 << 63, 0x87, 0},
		{^uint64(0), ^uint64(0), 0xfffffffffffffffe ^ 0x87, ^uint64(0)},
	}
	for _, tt := range tests {
		lo, hi := mulAlpha(tt.lo, tt.hi)
		if lo != tt.wantLo || hi != tt.wantHi {
			t.Errorf("mulAlpha(%#x, %#x) = (%#x, %#x), want (%#x, %#x)", tt.lo, tt.hi, lo, hi, tt.wantLo, tt.wantHi)
		}
	}
}
