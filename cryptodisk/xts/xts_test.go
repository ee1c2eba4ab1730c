package xts_test

import (
	"bytes"
	"crypto/aes"
	"encoding/hex"
	"errors"
	"fmt"
	"github.com/cryptnbd/cryptnbd/cryptodisk/cryptodisktest"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk/xts"
	refxts "golang.org/x/crypto/xts"
)

func mustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad hex: %v", err)
	}
	return b
}

// eachImpl runs f once per implementation available on this machine.
func eachImpl(t *testing.T, f func(t *testing.T, newCipher func(key []byte) *xts.Cipher)) {
	t.Helper()
	for _, name := range xts.Impls() {
		t.Run(name, func(t *testing.T) {
			f(t, func(key []byte) *xts.Cipher {
				t.Helper()
				c, err := xts.NewImpl(key, name)
				if err != nil {
					t.Fatalf("NewImpl(%s): %v", name, err)
				}
				if got := c.Implementation(); got != name {
					t.Fatalf("Implementation() = %q, want %q", got, name)
				}
				return c
			})
		})
	}
}

func TestImplementationsAvailable(t *testing.T) {
	t.Logf("implementations tested here: %v", xts.Impls())
	c, err := xts.New(make([]byte, xts.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	impls := xts.Impls()
	if got, want := c.Implementation(), impls[len(impls)-1]; got != want {
		t.Errorf("New chose %q, want the fastest available %q", got, want)
	}
}

// ieee1619Key is the key of IEEE P1619/D16 vectors 10 to 14 (XTS-AES-256):
// Key1 then Key2.
const ieee1619Key = "2718281828459045235360287471352662497757247093699959574966967627" +
	"3141592653589793238462643383279502884197169399375105820974944592"

// ieee1619Vectors are IEEE P1619/D16 (IEEE 1619-2007) Annex B vectors 10 to
// 14: one 512-byte data unit of the bytes 00 01 .. ff 00 01 .. ff encrypted
// with ieee1619Key under the given data unit sequence number.
var ieee1619Vectors = []struct {
	vector   int
	dataUnit uint64
	ct       string
}{
	{10, 0xff, "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b" +
		"5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd" +
		"5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0" +
		"c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca" +
		"2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0" +
		"b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f" +
		"93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec" +
		"583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a" +
		"84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1" +
		"505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae" +
		"9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29" +
		"a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac" +
		"6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f" +
		"645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385" +
		"1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa" +
		"773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151"},
	{11, 0xffff, "77a31251618a15e6b92d1d66dffe7b50b50bad552305ba0217a610688eff7e11" +
		"e1d0225438e093242d6db274fde801d4cae06f2092c728b2478559df58e837c2" +
		"469ee4a4fa794e4bbc7f39bc026e3cb72c33b0888f25b4acf56a2a9804f1ce6d" +
		"3d6e1dc6ca181d4b546179d55544aa7760c40d06741539c7e3cd9d2f6650b201" +
		"3fd0eeb8c2b8e3d8d240ccae2d4c98320a7442e1c8d75a42d6e6cfa4c2eca179" +
		"8d158c7aecdf82490f24bb9b38e108bcda12c3faf9a21141c3613b58367f922a" +
		"aa26cd22f23d708dae699ad7cb40a8ad0b6e2784973dcb605684c08b8d6998c6" +
		"9aac049921871ebb65301a4619ca80ecb485a31d744223ce8ddc2394828d6a80" +
		"470c092f5ba413c3378fa6054255c6f9df4495862bbb3287681f931b687c888a" +
		"bf844dfc8fc28331e579928cd12bd2390ae123cf03818d14dedde5c0c24c8ab0" +
		"18bfca75ca096f2d531f3d1619e785f1ada437cab92e980558b3dce1474afb75" +
		"bfedbf8ff54cb2618e0244c9ac0d3c66fb51598cd2db11f9be39791abe447c63" +
		"094f7c453b7ff87cb5bb36b7c79efb0872d17058b83b15ab0866ad8a58656c5a" +
		"7e20dbdf308b2461d97c0ec0024a2715055249cf3b478ddd4740de654f75ca68" +
		"6e0d7345c69ed50cdc2a8b332b1f8824108ac937eb050585608ee734097fc090" +
		"54fbff89eeaeea791f4a7ab1f9868294a4f9e27b42af8100cb9d59cef9645803"},
	{12, 0xffffff, "e387aaa58ba483afa7e8eb469778317ecf4cf573aa9d4eac23f2cdf914e4e200" +
		"a8b490e42ee646802dc6ee2b471b278195d60918ececb44bf79966f83faba049" +
		"9298ebc699c0c8634715a320bb4f075d622e74c8c932004f25b41e361025b5a8" +
		"7815391f6108fc4afa6a05d9303c6ba68a128a55705d415985832fdeaae6c8e1" +
		"9110e84d1b1f199a2692119edc96132658f09da7c623efcec712537a3d94c0bf" +
		"5d7e352ec94ae5797fdb377dc1551150721adf15bd26a8efc2fcaad56881fa9e" +
		"62462c28f30ae1ceaca93c345cf243b73f542e2074a705bd2643bb9f7cc79bb6" +
		"e7091ea6e232df0f9ad0d6cf502327876d82207abf2115cdacf6d5a48f6c1879" +
		"a65b115f0f8b3cb3c59d15dd8c769bc014795a1837f3901b5845eb491adfefe0" +
		"97b1fa30a12fc1f65ba22905031539971a10f2f36c321bb51331cdefb39e3964" +
		"c7ef079994f5b69b2edd83a71ef549971ee93f44eac3938fcdd61d01fa71799d" +
		"a3a8091c4c48aa9ed263ff0749df95d44fef6a0bb578ec69456aa5408ae32c7a" +
		"f08ad7ba8921287e3bbee31b767be06a0e705c864a769137df28292283ea81a2" +
		"480241b44d9921cdbec1bc28dc1fda114bd8e5217ac9d8ebafa720e9da4f9ace" +
		"231cc949e5b96fe76ffc21063fddc83a6b8679c00d35e09576a875305bed5f36" +
		"ed242c8900dd1fa965bc950dfce09b132263a1eef52dd6888c309f5a7d712826"},
	{13, 0xffffffff, "bf53d2dade78e822a4d949a9bc6766b01b06a8ef70d26748c6a7fc36d80ae4c5" +
		"520f7c4ab0ac8544424fa405162fef5a6b7f229498063618d39f0003cb5fb8d1" +
		"c86b643497da1ff945c8d3bedeca4f479702a7a735f043ddb1d6aaade3c4a0ac" +
		"7ca7f3fa5279bef56f82cd7a2f38672e824814e10700300a055e1630b8f1cb0e" +
		"919f5e942010a416e2bf48cb46993d3cb6a51c19bacf864785a00bc2ecff15d3" +
		"50875b246ed53e68be6f55bd7e05cfc2b2ed6432198a6444b6d8c247fab941f5" +
		"69768b5c429366f1d3f00f0345b96123d56204c01c63b22ce78baf116e525ed9" +
		"0fdea39fa469494d3866c31e05f295ff21fea8d4e6e13d67e47ce722e9698a1c" +
		"1048d68ebcde76b86fcf976eab8aa9790268b7068e017a8b9b749409514f1053" +
		"027fd16c3786ea1bac5f15cb79711ee2abe82f5cf8b13ae73030ef5b9e4457e7" +
		"5d1304f988d62dd6fc4b94ed38ba831da4b7634971b6cd8ec325d9c61c00f1df" +
		"73627ed3745a5e8489f3a95c69639c32cd6e1d537a85f75cc844726e8a72fc00" +
		"77ad22000f1d5078f6b866318c668f1ad03d5a5fced5219f2eabbd0aa5c0f460" +
		"d183f04404a0d6f469558e81fab24a167905ab4c7878502ad3e38fdbe62a4155" +
		"6cec37325759533ce8f25f367c87bb5578d667ae93f9e2fd99bcbc5f2fbba88c" +
		"f6516139420fcff3b7361d86322c4bd84c82f335abb152c4a93411373aaa8220"},
	{14, 0xffffffffff, "64497e5a831e4a932c09be3e5393376daa599548b816031d224bbf50a818ed23" +
		"50eae7e96087c8a0db51ad290bd00c1ac1620857635bf246c176ab463be30b80" +
		"8da548081ac847b158e1264be25bb0910bbc92647108089415d45fab1b3d2604" +
		"e8a8eff1ae4020cfa39936b66827b23f371b92200be90251e6d73c5f86de5fd4" +
		"a950781933d79a28272b782a2ec313efdfcc0628f43d744c2dc2ff3dcb66999b" +
		"50c7ca895b0c64791eeaa5f29499fb1c026f84ce5b5c72ba1083cddb5ce45434" +
		"631665c333b60b11593fb253c5179a2c8db813782a004856a1653011e93fb6d8" +
		"76c18366dd8683f53412c0c180f9c848592d593f8609ca736317d356e13e2bff" +
		"3a9f59cd9aeb19cd482593d8c46128bb32423b37a9adfb482b99453fbe25a41b" +
		"f6feb4aa0bef5ed24bf73c762978025482c13115e4015aac992e5613a3b5c2f6" +
		"85b84795cb6e9b2656d8c88157e52c42f978d8634c43d06fea928f2822e465aa" +
		"6576e9bf419384506cc3ce3c54ac1a6f67dc66f3b30191e698380bc999b05abc" +
		"e19dc0c6dcc2dd001ec535ba18deb2df1a101023108318c75dc98611a09dc48a" +
		"0acdec676fabdf222f07e026f059b672b56e5cbc8e1d21bbd867dd9272120546" +
		"81d70ea737134cdfce93b6f82ae22423274e58a0821cc5502e2d0ab4585e94de" +
		"6975be5e0b4efce51cd3e70c25a1fbbbd609d273ad5b0d59631c531f6a0a57b9"},
}

func TestIEEE1619Vectors(t *testing.T) {
	key := mustHex(t, ieee1619Key)
	pt := make([]byte, 512)
	for i := range pt {
		pt[i] = byte(i)
	}
	eachImpl(t, func(t *testing.T, newCipher func([]byte) *xts.Cipher) {
		c := newCipher(key)
		for _, v := range ieee1619Vectors {
			t.Run(fmt.Sprintf("vector%d", v.vector), func(t *testing.T) {
				want := mustHex(t, v.ct)
				got := make([]byte, len(pt))
				c.EncryptSectors(got, pt, 512, v.dataUnit, 1)
				if !bytes.Equal(got, want) {
					t.Errorf("encrypt: got %x..., want %x...", got[:32], want[:32])
				}
				c.DecryptSectors(got, want, 512, v.dataUnit, 1)
				if !bytes.Equal(got, pt) {
					t.Errorf("decrypt: got %x..., want %x...", got[:32], pt[:32])
				}
				// The same data unit as the second of two, in place.
				two := append(make([]byte, 512), pt...)
				c.EncryptSectors(two, two, 512, v.dataUnit-1, 1)
				if !bytes.Equal(two[512:], want) {
					t.Errorf("second sector in place: got %x..., want %x...", two[512:544], want[:32])
				}
			})
		}
	})
}

// reference encrypts or decrypts sector by sector with golang.org/x/crypto/xts.
func reference(t testing.TB, key, src []byte, sectorSize int, tweak, step uint64, decrypt bool) []byte {
	t.Helper()
	ref, err := refxts.NewCipher(aes.NewCipher, key)
	if err != nil {
		t.Fatalf("x/crypto/xts: %v", err)
	}
	out := make([]byte, len(src))
	for off := 0; off < len(src); off += sectorSize {
		if decrypt {
			ref.Decrypt(out[off:off+sectorSize], src[off:off+sectorSize], tweak)
		} else {
			ref.Encrypt(out[off:off+sectorSize], src[off:off+sectorSize], tweak)
		}
		tweak += step
	}
	return out
}

func differentialSizes() []int {
	var sizes []int
	for s := 16; s <= 512; s += 16 {
		sizes = append(sizes, s)
	}
	return append(sizes, 1024, 4096, 8192)
}

type diffCase struct {
	key, src       []byte
	wantCT, wantPT []byte
	sectorSize     int
	tweak, step    uint64
}

// differentialCases builds random inputs over sector sizes 16, 32, ..., 512
// (1 to 32 blocks per sector, so every 8- and 16-block tail), 1024, 4096 and
// 8192, and sector counts around the batch of 32 tweaks (or 128 KiB) per
// kernel call, with the expected output from x/crypto/xts computed once for
// all implementations.
func differentialCases(t *testing.T) []diffCase {
	t.Helper()
	rng := rand.New(rand.NewChaCha8([32]byte{'x', 't', 's'}))
	var cases []diffCase
	for _, sectorSize := range differentialSizes() {
		key := make([]byte, xts.KeySize)
		for i := range key {
			key[i] = byte(rng.Uint32())
		}
		counts := []int{1, 3, 33}
		switch {
		case sectorSize <= 64:
			counts = append(counts, 65)
		case sectorSize == 8192:
			counts = []int{1, 3, 17} // 17 crosses the 128 KiB batch limit
		}
		for _, n := range counts {
			src := make([]byte, n*sectorSize)
			for i := range src {
				src[i] = byte(rng.Uint32())
			}
			tweak := rng.Uint64()
			if n == 3 {
				tweak = ^uint64(0) - 1 // the tweak wraps around 2^64
			}
			step := []uint64{1, 8, rng.Uint64()}[rng.IntN(3)]
			cases = append(cases, diffCase{
				key: key, src: src, sectorSize: sectorSize, tweak: tweak, step: step,
				wantCT: reference(t, key, src, sectorSize, tweak, step, false),
				wantPT: reference(t, key, src, sectorSize, tweak, step, true),
			})
		}
	}
	return cases
}

func TestDifferential(t *testing.T) {
	cases := differentialCases(t)
	eachImpl(t, func(t *testing.T, newCipher func([]byte) *xts.Cipher) {
		for _, tc := range cases {
			c := newCipher(tc.key)
			for _, decrypt := range []bool{false, true} {
				op, want := c.EncryptSectors, tc.wantCT
				if decrypt {
					op, want = c.DecryptSectors, tc.wantPT
				}
				got := make([]byte, len(tc.src))
				op(got, tc.src, tc.sectorSize, tc.tweak, tc.step)
				if !bytes.Equal(got, want) {
					t.Errorf("sector %d x %d, tweak %#x step %d, decrypt %v: differs from x/crypto/xts at byte %d",
						tc.sectorSize, len(tc.src)/tc.sectorSize, tc.tweak, tc.step, decrypt, cryptodisktest.FirstDiff(got, want))
				}
				inPlace := bytes.Clone(tc.src)
				op(inPlace, inPlace, tc.sectorSize, tc.tweak, tc.step)
				if !bytes.Equal(inPlace, want) {
					t.Errorf("sector %d x %d, tweak %#x step %d, decrypt %v, in place: differs from x/crypto/xts at byte %d",
						tc.sectorSize, len(tc.src)/tc.sectorSize, tc.tweak, tc.step, decrypt, cryptodisktest.FirstDiff(inPlace, want))
				}
			}
		}
	})
}

func TestLongerDst(t *testing.T) {
	eachImpl(t, func(t *testing.T, newCipher func([]byte) *xts.Cipher) {
		c := newCipher(bytes.Repeat([]byte{7}, xts.KeySize))
		src := make([]byte, 64)
		dst := bytes.Repeat([]byte{0xaa}, 80)
		c.EncryptSectors(dst, src, 32, 0, 1)
		if !bytes.Equal(dst[64:], bytes.Repeat([]byte{0xaa}, 16)) {
			t.Errorf("bytes past len(src) changed: %x", dst[64:])
		}
		if bytes.Equal(dst[:64], src) {
			t.Errorf("dst[:64] was not encrypted")
		}
		// An empty input is a valid no-op.
		c.EncryptSectors(nil, nil, 512, 0, 1)
	})
}

func TestNewKeySize(t *testing.T) {
	for _, n := range []int{0, 32, 63, 65, 128} {
		if _, err := xts.New(make([]byte, n)); !errors.Is(err, xts.ErrKeySize) {
			t.Errorf("New(%d-byte key): got %v, want ErrKeySize", n, err)
		}
	}
}

func TestMisusePanics(t *testing.T) {
	eachImpl(t, func(t *testing.T, newCipher func([]byte) *xts.Cipher) {
		buf := make([]byte, 4096)
		tests := []struct {
			name string
			f    func(c *xts.Cipher)
		}{
			{"sector size 0", func(c *xts.Cipher) { c.EncryptSectors(buf, buf, 0, 0, 1) }},
			{"sector size 8", func(c *xts.Cipher) { c.EncryptSectors(buf, buf, 8, 0, 1) }},
			{"sector size 24", func(c *xts.Cipher) { c.DecryptSectors(buf, buf, 24, 0, 1) }},
			{"sector size negative", func(c *xts.Cipher) { c.EncryptSectors(buf, buf, -512, 0, 1) }},
			{"partial sector", func(c *xts.Cipher) { c.EncryptSectors(buf, buf[:1000], 512, 0, 1) }},
			{"short dst", func(c *xts.Cipher) { c.DecryptSectors(buf[:512], buf[1024:2048], 512, 0, 1) }},
			{"overlap ahead", func(c *xts.Cipher) { c.EncryptSectors(buf[16:1040], buf[:1024], 512, 0, 1) }},
			{"overlap behind", func(c *xts.Cipher) { c.DecryptSectors(buf[:1024], buf[512:1536], 512, 0, 1) }},
			{"after Zero", func(c *xts.Cipher) { c.Zero(); c.EncryptSectors(buf, buf, 512, 0, 1) }},
			{"decrypt after Zero", func(c *xts.Cipher) { c.Zero(); c.DecryptSectors(buf, buf, 512, 0, 1) }},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				c := newCipher(make([]byte, xts.KeySize))
				defer func() {
					if recover() == nil {
						t.Errorf("no panic")
					}
				}()
				tt.f(c)
			})
		}
	})
}

func TestConcurrentUse(t *testing.T) {
	key := bytes.Repeat([]byte{0x5c}, xts.KeySize)
	src := make([]byte, 16*4096)
	for i := range src {
		src[i] = byte(i * 7)
	}
	want := reference(t, key, src, 4096, 1000, 8, false)
	eachImpl(t, func(t *testing.T, newCipher func([]byte) *xts.Cipher) {
		c := newCipher(key)
		var wg sync.WaitGroup
		errs := make(chan string, 8)
		for g := range 8 {
			wg.Go(func() {
				dst := make([]byte, len(src))
				for range 4 {
					c.EncryptSectors(dst, src, 4096, 1000, 8)
					if !bytes.Equal(dst, want) {
						errs <- fmt.Sprintf("goroutine %d: wrong ciphertext", g)
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for e := range errs {
			t.Error(e)
		}
	})
}

// fuzzInput turns fuzzer bytes into a valid call: the key is padded to 64
// bytes and data cut to whole sectors of 16*(1+sel%64) bytes.
func fuzzInput(keyIn, data []byte, sel uint8) (key, src []byte, sectorSize int) {
	key = make([]byte, xts.KeySize)
	copy(key, keyIn)
	sectorSize = 16 * (1 + int(sel%64))
	if sel >= 192 {
		sectorSize = 4096
	}
	return key, data[:len(data)/sectorSize*sectorSize], sectorSize
}

func FuzzXTSRoundTrip(f *testing.F) {
	f.Add([]byte("0123456789abcdef0123456789abcdef"), bytes.Repeat([]byte{1}, 1024), uint8(31), uint64(0), uint64(1))
	f.Fuzz(func(t *testing.T, keyIn, data []byte, sel uint8, tweak, step uint64) {
		if len(data) > 1<<20 {
			t.Skip("input too large")
		}
		key, src, sectorSize := fuzzInput(keyIn, data, sel)
		var first []byte
		for _, name := range xts.Impls() {
			c, err := xts.NewImpl(key, name)
			if err != nil {
				t.Fatal(err)
			}
			ct := make([]byte, len(src))
			c.EncryptSectors(ct, src, sectorSize, tweak, step)
			if first == nil {
				first = bytes.Clone(ct)
			} else if !bytes.Equal(ct, first) {
				t.Fatalf("%s: ciphertext differs from %s", name, xts.Impls()[0])
			}
			c.DecryptSectors(ct, ct, sectorSize, tweak, step)
			if !bytes.Equal(ct, src) {
				t.Fatalf("%s: round trip differs at byte %d", name, cryptodisktest.FirstDiff(ct, src))
			}
		}
	})
}

func FuzzXTSDifferential(f *testing.F) {
	f.Add([]byte("key"), bytes.Repeat([]byte{0xee}, 4096), uint8(200), uint64(1<<63), uint64(8))
	f.Fuzz(func(t *testing.T, keyIn, data []byte, sel uint8, tweak, step uint64) {
		if len(data) > 1<<20 {
			t.Skip("input too large")
		}
		key, src, sectorSize := fuzzInput(keyIn, data, sel)
		wantCT := reference(t, key, src, sectorSize, tweak, step, false)
		wantPT := reference(t, key, src, sectorSize, tweak, step, true)
		for _, name := range xts.Impls() {
			c, err := xts.NewImpl(key, name)
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(src))
			c.EncryptSectors(got, src, sectorSize, tweak, step)
			if !bytes.Equal(got, wantCT) {
				t.Fatalf("%s: encryption differs from x/crypto/xts at byte %d", name, cryptodisktest.FirstDiff(got, wantCT))
			}
			c.DecryptSectors(got, src, sectorSize, tweak, step)
			if !bytes.Equal(got, wantPT) {
				t.Fatalf("%s: decryption differs from x/crypto/xts at byte %d", name, cryptodisktest.FirstDiff(got, wantPT))
			}
		}
	})
}
