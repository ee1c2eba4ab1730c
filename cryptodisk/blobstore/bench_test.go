package blobstore_test

import (
	"context"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk/blobstore"
)

// The benchmarks measure this package plus Azurite on the local machine, so
// they show per-request overhead and the effect of concurrency, not what
// Azure itself would deliver (see docs/azure-storage.md).

func benchmarkIO(b *testing.B, size int, write bool) {
	ctx := context.Background()
	c := account(b).NewContainerClient("bench")
	if err := blobstore.CreateContainer(ctx, c); err != nil {
		b.Fatal(err)
	}
	const blobSize = 64 << 20
	s, err := blobstore.Create(ctx, blobstore.Options{Container: c, Name: b.Name()}, blobSize, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer func() {
		s.Delete(ctx)
	}()
	b.SetBytes(int64(size))
	b.SetParallelism(8) // 16 requests in flight on 2 CPUs: DefaultMaxConcurrency
	b.RunParallel(func(pb *testing.PB) {
		buf := make([]byte, size)
		buf[0] = 1
		off := int64(0)
		for pb.Next() {
			var err error
			if write {
				err = s.WriteAt(ctx, buf, off)
			} else {
				err = s.ReadAt(ctx, buf, off)
			}
			if err != nil {
				b.Error(err)
				return
			}
			off = (off + int64(size)) % blobSize
		}
	})
}

func BenchmarkWrite4K(b *testing.B) { benchmarkIO(b, 4<<10, true) }
func BenchmarkRead4K(b *testing.B)  { benchmarkIO(b, 4<<10, false) }
func BenchmarkWrite4M(b *testing.B) { benchmarkIO(b, 4<<20, true) }
func BenchmarkRead4M(b *testing.B)  { benchmarkIO(b, 4<<20, false) }
