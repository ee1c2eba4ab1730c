package cryptodisk_test

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/cryptodisktest"
	"github.com/cryptnbd/cryptnbd/cryptodisk/filestore"
	"github.com/cryptnbd/cryptnbd/cryptodisk/memstore"
	"github.com/cryptnbd/cryptnbd/cryptodisk/xts"
)

// extraBenchCiphers are measured besides DefaultCipher.
var extraBenchCiphers = []struct {
	name string
	f    cryptodisk.CipherFactory
}{{"xts", func(key []byte) (cryptodisk.SectorCipher, error) { return xts.New(key) }}}

// benchSize is the benchmark disks' size.
const benchSize = 64 << 20

// benchDisk is a disk on store whose data region is fully written, so
// reads decrypt rather than skip holes.
func benchDisk(b *testing.B, store cryptodisk.Storage, ss int, factory cryptodisk.CipherFactory) *cryptodisk.Disk {
	b.Helper()
	d, err := cryptodisk.Create(context.Background(), store, cryptodisktest.NewKeys("bench"),
		cryptodisk.CreateOptions{SizeBytes: benchSize, SectorSize: ss, Provider: "bench"},
		cryptodisk.Options{Cipher: factory})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { d.Close() })
	buf := make([]byte, 1<<20)
	for off := int64(0); off < benchSize; off += int64(len(buf)) {
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
// with allocations per request, and for aligned requests TryReadAt and
// TryWriteAt too. Aligned requests take the in-place path; "unaligned"
// ones (offset 512 into a 4096-byte sector) add a partial head and tail.
func BenchmarkDisk(b *testing.B) {
	ciphers := []struct {
		name string
		f    cryptodisk.CipherFactory
	}{{"reference", cryptodisk.NewReferenceCipher}}
	ciphers = append(ciphers, extraBenchCiphers...)
	for _, c := range ciphers {
		for _, ss := range []int{4096, 512} {
			d := benchDisk(b, memstore.New(0), ss, c.f)
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
					if shift == 0 {
						b.Run("TryReadAt/"+name, func(b *testing.B) { benchTry(b, d.TryReadAt, buf, span) })
						b.Run("TryWriteAt/"+name, func(b *testing.B) { benchTry(b, d.TryWriteAt, buf, span) })
					}
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

func benchTry(b *testing.B, try func(context.Context, []byte, int64) (bool, error), buf []byte, span int64) {
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	ctx := context.Background()
	var off int64
	for b.Loop() {
		if ok, err := try(ctx, buf, off); !ok || err != nil {
			b.Fatalf("at %d: served %v, %v", off, ok, err)
		}
		off = (off + int64(len(buf))) % span
	}
}

// BenchmarkDiskLent measures 1 MiB requests on a file in /dev/shm that lends
// its pages, so the cipher works on the page cache directly, with
// allocations per request (the fault handling must not add any).
func BenchmarkDiskLent(b *testing.B) {
	f, err := filestore.Create(filepath.Join(cryptodisktest.TmpfsDir(b), "disk.img"), 0)
	if err != nil {
		b.Fatal(err)
	}
	f.Map(nil)
	if read, write := f.Mapped(); !read || !write {
		b.Fatalf("Mapped() = %v, %v on tmpfs: the benchmark would measure the copying path", read, write)
	}
	// Filled with pwrite (the pages are holes until then), then cached.
	d := benchDisk(b, f, 4096, nil)
	ctx := context.Background()
	buf := make([]byte, 1<<20)
	for _, op := range []string{"ReadAt", "WriteAt"} {
		b.Run(op+"/1024K", func(b *testing.B) {
			b.SetBytes(int64(len(buf)))
			b.ReportAllocs()
			var off int64
			for b.Loop() {
				var err error
				if op == "ReadAt" {
					err = d.ReadAt(ctx, buf, off)
				} else {
					err = d.WriteAt(ctx, buf, off)
				}
				if err != nil {
					b.Fatal(err)
				}
				off = (off + int64(len(buf))) % benchSize
			}
		})
	}
}
