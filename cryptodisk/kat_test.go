package cryptodisk_test

import (
	"bytes"
	"context"
	"crypto/aes"
	"fmt"
	"github.com/cryptnbd/cryptnbd/cryptodisk/cryptodisktest"
	"math/rand/v2"
	"testing"

	refxts "golang.org/x/crypto/xts"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/luks2"
	"github.com/cryptnbd/cryptnbd/cryptodisk/xts"
)

// TestKnownAnswer decrypts sectors of an image our code wrote with
// golang.org/x/crypto/xts under the volume key recovered independently
// (keyslot secret from the unwrapper → luks2 keyslot → volume key), at the
// plain64 tweak dm-crypt uses for LUKS2: the sector number in 512-byte
// units, so s*8 for 4096-byte sectors. And the other way round: ciphertext
// made by the reference cipher and put in the store reads back as plaintext.
func TestKnownAnswer(t *testing.T) {
	ciphers := []struct {
		name string
		f    cryptodisk.CipherFactory
	}{
		{"default", nil},
		{"xts", func(key []byte) (cryptodisk.SectorCipher, error) { return xts.New(key) }},
	}
	for _, c := range ciphers {
		for _, ss := range sectorSizes {
			t.Run(fmt.Sprintf("%s/%d", c.name, ss), func(t *testing.T) {
				testKnownAnswer(t, ss, c.f)
			})
		}
	}
}

func testKnownAnswer(t *testing.T, ss int, factory cryptodisk.CipherFactory) {
	ctx := context.Background()
	e := newEnv(t, backends[0], ss, diskSize, cryptodisk.Options{Cipher: factory})
	info, err := cryptodisk.Inspect(ctx, e.store)
	if err != nil {
		t.Fatal(err)
	}

	// The volume key, the long way round.
	secret, err := e.keys.Unwrap(ctx, info.Token.KeyID, info.Token.Algorithm, info.Token.Wrapped, []byte("cryptnbd disk "+info.UUID))
	if err != nil {
		t.Fatalf("unwrap the token's secret: %v", err)
	}
	hdr, err := luks2.Read(storeRW{e.store})
	if err != nil {
		t.Fatal(err)
	}
	if hdr.Cipher() != "aes-xts-plain64" || hdr.KeySize() != 64 || hdr.SectorSize() != ss {
		t.Fatalf("segment: cipher %s, key %d bytes, sector %d; want aes-xts-plain64, 64, %d", hdr.Cipher(), hdr.KeySize(), hdr.SectorSize(), ss)
	}
	vk, err := hdr.Unlock(storeRW{e.store}, secret)
	if err != nil {
		t.Fatalf("keyslot: %v", err)
	}
	ref, err := refxts.NewCipher(aes.NewCipher, vk)
	if err != nil {
		t.Fatal(err)
	}
	tweak := func(sector int64) uint64 { return uint64(sector) * uint64(ss/512) }
	raw := func(sector int64) []byte {
		b := make([]byte, ss)
		if err := e.store.ReadAt(ctx, b, info.DataOffset+sector*int64(ss)); err != nil {
			t.Fatal(err)
		}
		return b
	}

	r := rand.New(rand.NewPCG(uint64(ss), 5))
	last := int64(diskSize/ss) - 1
	for _, s := range []int64{0, 1, 37, last / 2, last} {
		pt := cryptodisktest.RandomBytes(r, ss)
		write(t, e.d, pt, s*int64(ss))
		ct := raw(s)
		if bytes.Equal(ct, pt) {
			t.Fatalf("sector %d stored in the clear", s)
		}
		got := make([]byte, ss)
		ref.Decrypt(got, ct, tweak(s))
		if !bytes.Equal(got, pt) {
			t.Errorf("sector %d: x/crypto/xts at tweak %d does not decrypt what the disk wrote", s, tweak(s))
		}
	}

	// Reference ciphertext put in the store reads as its plaintext.
	for _, s := range []int64{2, 100, last - 1} {
		pt := cryptodisktest.RandomBytes(r, ss)
		ct := make([]byte, ss)
		ref.Encrypt(ct, pt, tweak(s))
		if err := e.store.WriteAt(ctx, ct, info.DataOffset+s*int64(ss)); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, ss)
		if err := e.d.ReadAt(ctx, got, s*int64(ss)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, pt) {
			t.Errorf("sector %d: the disk does not decrypt x/crypto/xts ciphertext at tweak %d", s, tweak(s))
		}
	}

	// An unwritten sector is a hole in the store and reads as zeros.
	if got := raw(50); !bytes.Equal(got, make([]byte, ss)) {
		t.Errorf("unwritten sector 50 is not all zero in the store")
	}
	// A WRITE of zeros is encrypted like anything else.
	write(t, e.d, make([]byte, ss), 60*int64(ss))
	got := make([]byte, ss)
	ref.Decrypt(got, raw(60), tweak(60))
	if !bytes.Equal(got, make([]byte, ss)) || bytes.Equal(raw(60), make([]byte, ss)) {
		t.Errorf("sector 60: a written zero sector is not stored as encrypted zeros")
	}
}
