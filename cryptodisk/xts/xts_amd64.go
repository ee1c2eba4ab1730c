//go:build amd64 && !purego

package xts

import (
	"encoding/binary"

	"golang.org/x/sys/cpu"
)

//go:generate go run ./asm/gen.go -out xts_amd64.s

// aesEncBlocks encrypts nblocks 16-byte blocks from src to dst (ECB, which
// may be in place) with AES-NI. It encrypts the sector tweaks.
//
//go:noescape
func aesEncBlocks(rk *roundKeys, dst, src *byte, nblocks int)

// The xts kernels process sectors consecutive sectors of sectorBlocks
// blocks each; tweaks points at one already encrypted 16-byte tweak per
// sector. dst and src may be equal. rk is the encryption schedule for the
// Enc kernels and the Equivalent Inverse Cipher schedule for the Dec ones.

//go:noescape
func xtsEncAESNI(rk *roundKeys, dst, src *byte, sectorBlocks, sectors int, tweaks *[16]byte)

//go:noescape
func xtsDecAESNI(rk *roundKeys, dst, src *byte, sectorBlocks, sectors int, tweaks *[16]byte)

//go:noescape
func xtsEncVAES(rk *roundKeys, dst, src *byte, sectorBlocks, sectors int, tweaks *[16]byte)

//go:noescape
func xtsDecVAES(rk *roundKeys, dst, src *byte, sectorBlocks, sectors int, tweaks *[16]byte)

//go:noescape
func cpuid(eaxArg, ecxArg uint32) (eax, ebx, ecx, edx uint32)

var (
	hasAESNI = cpu.X86.HasAES && cpu.X86.HasPCLMULQDQ
	// x/sys/cpu reports VAES only together with AVX-512 (HasAVX512VAES), but
	// Zen 3 and Alder Lake have VEX-encoded VAES/VPCLMULQDQ on YMM without
	// AVX-512, so read CPUID leaf 7 ourselves. HasAVX2 implies that the OS
	// saves YMM state.
	hasVAES = hasAESNI && cpu.X86.HasAVX2 && cpuidVAES()
)

func cpuidVAES() bool {
	if maxID, _, _, _ := cpuid(0, 0); maxID < 7 {
		return false
	}
	_, _, ecx, _ := cpuid(7, 0)
	const vaes, vpclmulqdq = 1 << 9, 1 << 10
	return ecx&vaes != 0 && ecx&vpclmulqdq != 0
}

func bestImpl() impl {
	switch {
	case hasVAES:
		return implVAES
	case hasAESNI:
		return implAESNI
	}
	return implGeneric
}

func availableImpls() []impl {
	ims := []impl{implGeneric}
	if hasAESNI {
		ims = append(ims, implAESNI)
	}
	if hasVAES {
		ims = append(ims, implVAES)
	}
	return ims
}

// tweakBatch is how many sector tweaks are encrypted per aesEncBlocks call.
const tweakBatch = 32

// maxBatchBytes bounds the bytes handled by one kernel call, so that huge
// sector sizes do not keep the goroutine in non-preemptible assembly for long.
const maxBatchBytes = 128 << 10

func (c *Cipher) crypt(dst, src []byte, sectorSize int, tweak, step uint64, decrypt bool) {
	if c.impl == implGeneric {
		c.cryptGeneric(dst, src, sectorSize, tweak, step, decrypt)
		return
	}
	sectors := len(src) / sectorSize
	batch := max(1, min(tweakBatch, maxBatchBytes/sectorSize))
	used := min(sectors, batch)
	var tw [tweakBatch][16]byte
	for off := 0; sectors > 0; {
		n := min(sectors, batch)
		for i := range n {
			binary.LittleEndian.PutUint64(tw[i][:8], tweak)
			binary.LittleEndian.PutUint64(tw[i][8:], 0)
			tweak += step
		}
		aesEncBlocks(&c.tweak, &tw[0][0], &tw[0][0], n)
		// Direct calls, not a function variable: through a variable the
		// compiler cannot apply //go:noescape, and tw would move to the
		// heap on every call.
		sb := sectorSize / blockSize
		switch {
		case c.impl == implVAES && decrypt:
			xtsDecVAES(&c.dec, &dst[off], &src[off], sb, n, &tw[0])
		case c.impl == implVAES:
			xtsEncVAES(&c.enc, &dst[off], &src[off], sb, n, &tw[0])
		case decrypt:
			xtsDecAESNI(&c.dec, &dst[off], &src[off], sb, n, &tw[0])
		default:
			xtsEncAESNI(&c.enc, &dst[off], &src[off], sb, n, &tw[0])
		}
		off += n * sectorSize
		sectors -= n
	}
	// Best effort: the encrypted tweaks are key-derived masks.
	clear(tw[:used])
}
