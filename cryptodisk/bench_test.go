package cryptodisk_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/cryptodisktest"
	"github.com/cryptnbd/cryptnbd/cryptodisk/memstore"
	"github.com/cryptnbd/cryptnbd/cryptodisk/xts"
)

// extraBenchCiphers are measured besides DefaultCipher.
var extraBenchCiphers = []struct {
	name string
	f    cryptodisk.CipherFactory
}{{"xts", func(key []byte) (cryptodisk.SectorCipher, error) { return xts.New(key) }}}

// benchDisk is a 64 MiB memory disk whose data region is fully written, so
// reads decrypt rather than skip holes.
func benchDisk(b *testing.B, ss int, factory cryptodisk.CipherFactory) *cryptodisk.Disk {
	b.Helper()
	const size = 64 << 20
	d, err := cryptodisk.Create(context.Background(), memstore.New(0), cryptodisktest.NewKeys("bench"),
		cryptodisk.CreateOptions{SizeBytes: size, SectorSize: ss, Provider: "bench"},
		cryptodisk.Options{Cipher: factory})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { d.Close() })
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		for i := range buf {
			buf[i] = byte(i) | 1
		}
		if err := d.WriteAt(context.Background(), buf, off); err != nil {
			b.Fatal(err)
		}
	}
	return d
}

// BenchmarkDisk measures steady-state ReadAt and WriteAt on a memory store,
// with allocations per request. Aligned requests take the in-place path;
// "unaligned" ones (offset 512 into a 4096-byte sector) add a partial
// head and tail.
func BenchmarkDisk(b *testing.B) {
	ciphers := []struct {
		name string
		f    cryptodisk.CipherFactory
	}{{"reference", cryptodisk.NewReferenceCipher}}
	ciphers = append(ciphers, extraBenchCiphers...)
	for _, c := range ciphers {
		for _, ss := range []int{4096, 512} {
			d := benchDisk(b, ss, c.f)
			for _, n := range []int{4 << 10, 1 << 20} {
				for _, shift := range []int64{0, 512} {
					if shift != 0 && ss == 512 {
						continue // 512 is aligned there
					}
					align := "aligned"
					if shift != 0 {
						align = "unaligned"
					}
					name := fmt.Sprintf("%s/%d/%s/%dK", c.name, ss, align, n>>10)
					buf := make([]byte, n)
					span := int64(d.Size()) - int64(n) - shift
					b.Run("ReadAt/"+name, func(b *testing.B) {
						b.SetBytes(int64(n))
						b.ReportAllocs()
						ctx := context.Background()
						var off int64
						for b.Loop() {
							if err := d.ReadAt(ctx, buf, off+shift); err != nil {
								b.Fatal(err)
							}
							off = (off + int64(n)) % span
						}
					})
					b.Run("WriteAt/"+name, func(b *testing.B) {
						b.SetBytes(int64(n))
						b.ReportAllocs()
						ctx := context.Background()
						var off int64
						for b.Loop() {
							if err := d.WriteAt(ctx, buf, off+shift); err != nil {
								b.Fatal(err)
							}
							off = (off + int64(n)) % span
						}
					})
				}
			}
		}
	}
}
