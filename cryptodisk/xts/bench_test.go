package xts_test

import (
	"crypto/aes"
	"fmt"
	"runtime"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk/xts"
	refxts "golang.org/x/crypto/xts"
)

// BenchmarkXTS compares golang.org/x/crypto/xts ("xcrypto") with every
// implementation of this package, in MB/s on one core, over a 64 KiB buffer
// of 512- or 4096-byte sectors (an NBD-sized request). On Linux it also
// reports cpuMB/s, bytes per second of the benchmark thread's CPU time, which
// stays meaningful when other processes compete for the cores.
func BenchmarkXTS(b *testing.B) {
	key := make([]byte, xts.KeySize)
	for i := range key {
		key[i] = byte(i)
	}
	buf := make([]byte, 64<<10)
	for _, sectorSize := range []int{512, 4096} {
		step := uint64(sectorSize / 512)
		for _, op := range []string{"encrypt", "decrypt"} {
			b.Run(fmt.Sprintf("sector=%d/%s/xcrypto", sectorSize, op), func(b *testing.B) {
				c, err := refxts.NewCipher(aes.NewCipher, key)
				if err != nil {
					b.Fatal(err)
				}
				f := c.Encrypt
				if op == "decrypt" {
					f = c.Decrypt
				}
				b.SetBytes(int64(len(buf)))
				defer reportCPU(b, len(buf))()
				for b.Loop() {
					tweak := uint64(0)
					for off := 0; off < len(buf); off += sectorSize {
						f(buf[off:off+sectorSize], buf[off:off+sectorSize], tweak)
						tweak += step
					}
				}
			})
			for _, name := range xts.Impls() {
				b.Run(fmt.Sprintf("sector=%d/%s/%s", sectorSize, op, name), func(b *testing.B) {
					c, err := xts.NewImpl(key, name)
					if err != nil {
						b.Fatal(err)
					}
					f := c.EncryptSectors
					if op == "decrypt" {
						f = c.DecryptSectors
					}
					b.SetBytes(int64(len(buf)))
					defer reportCPU(b, len(buf))()
					for b.Loop() {
						f(buf, buf, sectorSize, 0, step)
					}
				})
			}
		}
	}
}

// reportCPU pins the benchmark goroutine to its thread and returns a func
// that reports the cpuMB/s metric; call it deferred around the b.Loop loop.
func reportCPU(b *testing.B, bytesPerOp int) func() {
	runtime.LockOSThread()
	start, ok := threadCPU()
	return func() {
		defer runtime.UnlockOSThread()
		end, ok2 := threadCPU()
		if !ok || !ok2 || end <= start {
			return
		}
		b.ReportMetric(float64(b.N)*float64(bytesPerOp)/(end-start).Seconds()/1e6, "cpuMB/s")
	}
}
