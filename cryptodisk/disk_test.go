package cryptodisk_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"syscall"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/cryptodisktest"
	"github.com/cryptnbd/cryptnbd/cryptodisk/luks2"
	"github.com/cryptnbd/cryptnbd/cryptodisk/memstore"
)

func TestCreateOpenRoundTrip(t *testing.T) {
	forEach(t, func(t *testing.T, b backend, ss int) {
		e := newEnv(t, b, ss, diskSize, cryptodisk.Options{})
		ctx := context.Background()
		uuid := e.d.UUID()
		model := make([]byte, diskSize)
		r := rand.New(rand.NewPCG(uint64(ss), 4))
		for _, off := range []int64{0, 4096*3 + 17, 500000} {
			data := cryptodisktest.RandomBytes(r, 9000)
			write(t, e.d, data, off)
			copy(model[off:], data)
		}
		if err := e.d.Trim(ctx, 4096*4, 4096); err != nil {
			t.Fatal(err)
		}
		clear(model[4096*4 : 4096*5])

		// A new Keys from the same seed: nothing but the image carries over.
		e.reopenDisk(t, cryptodisktest.NewKeys(testSeed))
		if got := e.d.UUID(); got != uuid {
			t.Errorf("UUID after reopen = %s, want %s", got, uuid)
		}
		if got := e.d.SectorSize(); got != ss {
			t.Errorf("SectorSize after reopen = %d, want %d", got, ss)
		}
		if got := e.d.Size(); got != diskSize {
			t.Errorf("Size after reopen = %d, want %d", got, diskSize)
		}
		checkDisk(t, e.d, model)

		info, err := cryptodisk.Inspect(ctx, e.store)
		if err != nil {
			t.Fatalf("Inspect: %v", err)
		}
		tok := e.d.Token()
		if info.UUID != uuid || info.Label != "test disk" || info.SectorSize != ss || info.SizeBytes != diskSize {
			t.Errorf("Inspect = %+v; want uuid %s, label %q, sector %d, size %d", info, uuid, "test disk", ss, diskSize)
		}
		if tok.Type != cryptodisk.TokenType || tok.Provider != "test" || tok.KeyID != e.keys.KeyID() ||
			tok.Algorithm != cryptodisktest.Algorithm || tok.Properties["name"] != "disk0" || len(tok.Check) != 16 {
			t.Errorf("Token() = %+v", tok)
		}
		if info.Token.KeyID != tok.KeyID || !bytes.Equal(info.Token.Wrapped, tok.Wrapped) {
			t.Errorf("Inspect token %+v differs from the open disk's %+v", info.Token, tok)
		}
	})
}

func TestCreateRejects(t *testing.T) {
	keys := cryptodisktest.NewKeys(testSeed)
	for _, tc := range []struct {
		name string
		co   cryptodisk.CreateOptions
	}{
		{"SectorSize1024", cryptodisk.CreateOptions{SizeBytes: diskSize, SectorSize: 1024, Provider: "p"}},
		{"ZeroSize", cryptodisk.CreateOptions{SizeBytes: 0, Provider: "p"}},
		{"NegativeSize", cryptodisk.CreateOptions{SizeBytes: -4096, Provider: "p"}},
		{"PartialSector", cryptodisk.CreateOptions{SizeBytes: diskSize + 512, SectorSize: 4096, Provider: "p"}},
		{"NoProvider", cryptodisk.CreateOptions{SizeBytes: diskSize}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := memstore.New(0)
			if d, err := cryptodisk.Create(context.Background(), store, keys, tc.co, cryptodisk.Options{}); err == nil {
				d.Close()
				t.Fatalf("Create(%+v) succeeded", tc.co)
			}
			if store.AllocatedBytes() != 0 {
				t.Errorf("rejected Create wrote to the store")
			}
		})
	}
	t.Run("WrapFails", func(t *testing.T) {
		k := cryptodisktest.NewKeys(testSeed)
		k.Fail(syscall.EACCES)
		_, err := cryptodisk.Create(context.Background(), memstore.New(0), k,
			cryptodisk.CreateOptions{SizeBytes: diskSize, Provider: "p"}, cryptodisk.Options{})
		if !errors.Is(err, syscall.EACCES) {
			t.Errorf("Create with a failing wrapper: got %v, want EACCES", err)
		}
	})
	t.Run("SectorSizeDefault", func(t *testing.T) {
		d, err := cryptodisk.Create(context.Background(), memstore.New(0), keys,
			cryptodisk.CreateOptions{SizeBytes: diskSize, Provider: "p"}, cryptodisk.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		if d.SectorSize() != 4096 {
			t.Errorf("default SectorSize = %d, want 4096", d.SectorSize())
		}
	})
}

func TestOpenWrongKey(t *testing.T) {
	e := newEnv(t, backends[0], 4096, diskSize, cryptodisk.Options{})
	write(t, e.d, []byte("secret data"), 0)
	if err := e.d.Close(); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		u    cryptodisk.KeyUnwrapper
		want error
	}{
		{"WrongSecret", cryptodisktest.WrongSecret(32), cryptodisk.ErrWrongKey},
		{"ShortSecret", cryptodisktest.WrongSecret(5), cryptodisk.ErrWrongKey},
		{"OtherKey", cryptodisktest.NewKeys("another seed"), cryptodisktest.ErrUnknownKey},
		{"ProviderDown", func() cryptodisk.KeyUnwrapper {
			k := cryptodisktest.NewKeys(testSeed)
			k.Fail(syscall.EHOSTUNREACH)
			return k
		}(), syscall.EHOSTUNREACH},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := cryptodisk.Open(ctx, e.reopen(t), tc.u, cryptodisk.Options{})
			if err == nil {
				d.Close()
				t.Fatalf("Open succeeded")
			}
			if !errors.Is(err, tc.want) {
				t.Errorf("Open: got %v, want %v", err, tc.want)
			}
		})
	}
	// The right key still opens it: nothing above damaged the image.
	e.reopenDiskAfterClose(t)
	got := make([]byte, 11)
	if err := e.d.ReadAt(ctx, got, 0); err != nil || string(got) != "secret data" {
		t.Errorf("ReadAt = %q, %v", got, err)
	}
}

// reopenDiskAfterClose opens e's image again with e's keys; the disk must
// already be closed.
func (e *env) reopenDiskAfterClose(t *testing.T) {
	t.Helper()
	e.store = e.reopen(t)
	d, err := cryptodisk.Open(context.Background(), e.store, e.keys, cryptodisk.Options{})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	e.d = d
}

// setToken replaces the cryptnbd token of the image in store.
func setToken(t *testing.T, store cryptodisk.Storage, tok cryptodisk.Token) {
	t.Helper()
	rw := storeRW{store}
	hdr, err := luks2.Read(rw)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := jsonMarshal(tok)
	if err != nil {
		t.Fatal(err)
	}
	if err := hdr.SetToken(0, raw); err != nil {
		t.Fatal(err)
	}
	if err := hdr.Write(rw, nil); err != nil {
		t.Fatal(err)
	}
}

func TestTokenFromAnotherDisk(t *testing.T) {
	ctx := context.Background()
	for _, ignoreAAD := range []bool{true, false} {
		name := "AADBound"
		if ignoreAAD {
			name = "NoAAD"
		}
		t.Run(name, func(t *testing.T) {
			keys := cryptodisktest.NewKeys(testSeed)
			keys.IgnoreAAD(ignoreAAD)
			storeA, storeB := memstore.New(0), memstore.New(0)
			a := create(t, storeA, keys, 4096, diskSize, cryptodisk.Options{})
			b := create(t, storeB, keys, 4096, diskSize, cryptodisk.Options{})
			tokB := b.Token()
			a.Close()
			b.Close()
			setToken(t, storeA.Reopen(), tokB)
			d, err := cryptodisk.Open(ctx, storeA.Reopen(), keys, cryptodisk.Options{})
			if err == nil {
				d.Close()
				t.Fatal("Open with another disk's token succeeded")
			}
			// Without AAD only the check value can tell; with AAD the
			// provider refuses first.
			if ignoreAAD && !errors.Is(err, cryptodisk.ErrWrongKey) {
				t.Errorf("Open: got %v, want ErrWrongKey", err)
			}
		})
	}
}

func TestOpenNotCryptnbd(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, backends[0], 4096, diskSize, cryptodisk.Options{})
	e.d.Close()
	store := e.reopen(t)
	rw := storeRW{store}
	hdr, err := luks2.Read(rw)
	if err != nil {
		t.Fatal(err)
	}
	hdr.RemoveToken(0)
	if err := hdr.Write(rw, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := cryptodisk.Open(ctx, store, e.keys, cryptodisk.Options{}); !errors.Is(err, cryptodisk.ErrNotCryptnbd) {
		t.Errorf("Open without a token: got %v, want ErrNotCryptnbd", err)
	}
	if _, err := cryptodisk.Inspect(ctx, store); !errors.Is(err, cryptodisk.ErrNotCryptnbd) {
		t.Errorf("Inspect without a token: got %v, want ErrNotCryptnbd", err)
	}
	if _, err := cryptodisk.Open(ctx, memstore.New(32<<20), e.keys, cryptodisk.Options{}); err == nil {
		t.Errorf("Open of an all-zero store succeeded")
	}
}

func TestRewrap(t *testing.T) {
	forEach(t, func(t *testing.T, b backend, ss int) {
		e := newEnv(t, b, ss, diskSize, cryptodisk.Options{})
		ctx := context.Background()
		write(t, e.d, []byte("before rewrap"), 4000)
		newKeys := cryptodisktest.NewKeys("rotated")
		if err := e.d.Rewrap(ctx, cryptodisktest.WrongSecret(32), newKeys, "p2"); !errors.Is(err, cryptodisk.ErrWrongKey) {
			t.Errorf("Rewrap with a wrong unwrapper: got %v, want ErrWrongKey", err)
		}
		if err := e.d.Rewrap(ctx, e.keys, newKeys, "p2"); err != nil {
			t.Fatalf("Rewrap: %v", err)
		}
		if tok := e.d.Token(); tok.KeyID != newKeys.KeyID() || tok.Provider != "p2" {
			t.Errorf("Token after Rewrap = %s/%s, want %s/p2", tok.KeyID, tok.Provider, newKeys.KeyID())
		}
		// The open disk keeps working without a new unlock.
		write(t, e.d, []byte("after rewrap"), 9000)
		e.reopenDisk(t, newKeys)
		for off, want := range map[int64]string{4000: "before rewrap", 9000: "after rewrap"} {
			got := make([]byte, len(want))
			if err := e.d.ReadAt(ctx, got, off); err != nil || string(got) != want {
				t.Errorf("ReadAt(%d) = %q, %v; want %q", off, got, err, want)
			}
		}
		e.d.Close()
		if _, err := cryptodisk.Open(ctx, e.reopen(t), e.keys, cryptodisk.Options{}); err == nil {
			t.Errorf("Open with the old key after Rewrap succeeded")
		}
		// A suspended disk can be rewrapped (rotation while revoked).
		e.store = e.reopen(t)
		d, err := cryptodisk.Open(ctx, e.store, newKeys, cryptodisk.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		d.Suspend("rotating")
		if err := d.Rewrap(ctx, newKeys, e.keys, "p1"); err != nil {
			t.Errorf("Rewrap while suspended: %v", err)
		}
		if err := d.Resume(ctx, e.keys); err != nil {
			t.Errorf("Resume with the rewrapped key: %v", err)
		}
	})
}

func TestRecoverySecret(t *testing.T) {
	e := newEnv(t, backends[0], 4096, diskSize, cryptodisk.Options{})
	ctx := context.Background()
	secret, err := e.d.RecoverySecret(ctx, e.keys)
	if err != nil {
		t.Fatalf("RecoverySecret: %v", err)
	}
	hdr, err := luks2.Read(storeRW{e.store})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := hdr.Unlock(storeRW{e.store}, secret); err != nil {
		t.Errorf("the recovery secret does not open keyslot 0: %v", err)
	}
	e.keys.Fail(syscall.EPERM)
	if _, err := e.d.RecoverySecret(ctx, e.keys); !errors.Is(err, syscall.EPERM) {
		t.Errorf("RecoverySecret with a revoked key: got %v, want EPERM", err)
	}
}

func TestGrowWhileIO(t *testing.T) {
	forEach(t, func(t *testing.T, b backend, ss int) {
		e := newEnv(t, b, ss, diskSize, cryptodisk.Options{})
		ctx := context.Background()
		if err := e.d.Grow(ctx, diskSize-int64(ss)); err == nil {
			t.Errorf("shrinking Grow succeeded")
		}
		if err := e.d.Grow(ctx, diskSize+int64(ss)/2); err == nil {
			t.Errorf("Grow to a partial sector succeeded")
		}
		const workers = 3
		var wg sync.WaitGroup
		stop := make(chan struct{})
		errs := make(chan error, workers)
		model := make([]byte, 4*diskSize)
		for g := range workers {
			wg.Go(func() {
				buf := make([]byte, 3000)
				got := make([]byte, 3000)
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					off := int64(g)*100000 + int64(i%10)*7000 + 1
					for j := range buf {
						buf[j] = byte(g + i + j)
					}
					copy(model[off:], buf)
					if err := e.d.WriteAt(ctx, buf, off); err != nil {
						errs <- err
						return
					}
					if err := e.d.ReadAt(ctx, got, off); err != nil {
						errs <- err
						return
					}
					// Each worker owns its 100000-byte region of model.
					if !bytes.Equal(got, model[off:off+int64(len(got))]) {
						errs <- fmt.Errorf("worker %d: read at %d differs from what it wrote", g, off)
						return
					}
				}
			})
		}
		for size := int64(diskSize); size < 4*diskSize; size += diskSize / 2 {
			if err := e.d.Grow(ctx, size+diskSize/2); err != nil {
				t.Errorf("Grow(%d): %v", size+diskSize/2, err)
			}
		}
		close(stop)
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Errorf("I/O during Grow: %v", err)
		}
		if got := e.d.Size(); got != 4*diskSize {
			t.Fatalf("Size after Grow = %d, want %d", got, 4*diskSize)
		}
		tail := []byte("at the new end")
		off := int64(4*diskSize - len(tail))
		write(t, e.d, tail, off)
		copy(model[off:], tail)
		e.reopenDisk(t, e.keys)
		if got := e.d.Size(); got != 4*diskSize {
			t.Errorf("Size after reopen = %d, want %d", got, 4*diskSize)
		}
		checkDisk(t, e.d, model)
	})
}

func TestShred(t *testing.T) {
	forEach(t, func(t *testing.T, b backend, ss int) {
		e := newEnv(t, b, ss, diskSize, cryptodisk.Options{})
		ctx := context.Background()
		write(t, e.d, []byte("to be destroyed"), 0)
		if err := e.d.Close(); err != nil {
			t.Fatal(err)
		}
		store := e.reopen(t)
		defer store.Close()
		if err := cryptodisk.Shred(ctx, store); err != nil {
			t.Fatalf("Shred: %v", err)
		}
		if d, err := cryptodisk.Open(ctx, store, e.keys, cryptodisk.Options{}); err == nil {
			d.Close()
			t.Fatal("Open after Shred succeeded")
		}
		if _, err := cryptodisk.Inspect(ctx, store); err == nil {
			t.Error("Inspect after Shred succeeded")
		}
		// No header is left to try a keyslot secret on.
		if _, err := luks2.Read(storeRW{store}); err == nil {
			t.Error("luks2.Read after Shred found a header")
		}
		if err := cryptodisk.Shred(ctx, store); err == nil {
			t.Error("second Shred succeeded on a shredded image")
		}
	})
}
