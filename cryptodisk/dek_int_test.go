package cryptodisk

import (
	"bytes"
	"context"
	"errors"
	"reflect"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk/cryptodisktest"
	"github.com/cryptnbd/cryptnbd/cryptodisk/memstore"
	"github.com/cryptnbd/cryptnbd/cryptodisk/xts"
)

// spyCipher wraps a SectorCipher, records Zero, and notes any use after it
// instead of passing it on (the fast cipher would panic).
type spyCipher struct {
	inner     SectorCipher
	zeroed    atomic.Bool
	zeroCalls atomic.Int32
	misuse    atomic.Bool
	// Key material visible in the inner cipher's arrays just before and
	// just after its Zero: nonzero bytes counted by reflection.
	beforeZero, afterZero int
}

func (s *spyCipher) EncryptSectors(dst, src []byte, ss int, tweak, step uint64) {
	if s.zeroed.Load() {
		s.misuse.Store(true)
		return
	}
	s.inner.EncryptSectors(dst, src, ss, tweak, step)
}

func (s *spyCipher) DecryptSectors(dst, src []byte, ss int, tweak, step uint64) {
	if s.zeroed.Load() {
		s.misuse.Store(true)
		return
	}
	s.inner.DecryptSectors(dst, src, ss, tweak, step)
}

func (s *spyCipher) Zero() {
	s.zeroCalls.Add(1)
	s.zeroed.Store(true)
	s.beforeZero, _ = keyBytes(reflect.ValueOf(s.inner))
	s.inner.Zero()
	s.afterZero, _ = keyBytes(reflect.ValueOf(s.inner))
}

// keyBytes counts the nonzero and total bytes in the byte arrays reachable
// from v through pointers, structs and arrays: where xts.Cipher keeps its
// round keys, whatever the fields are called. Interfaces and slices (memory
// a cipher cannot wipe, such as crypto/aes's) are not followed.
func keyBytes(v reflect.Value) (nonzero, total int) {
	switch v.Kind() {
	case reflect.Pointer:
		if !v.IsNil() {
			return keyBytes(v.Elem())
		}
	case reflect.Struct:
		for i := range v.NumField() {
			n, t := keyBytes(v.Field(i))
			nonzero, total = nonzero+n, total+t
		}
	case reflect.Array:
		if v.Type().Elem().Kind() == reflect.Uint8 {
			for i := range v.Len() {
				if v.Index(i).Uint() != 0 {
					nonzero++
				}
			}
			return nonzero, v.Len()
		}
		for i := range v.Len() {
			n, t := keyBytes(v.Index(i))
			nonzero, total = nonzero+n, total+t
		}
	}
	return nonzero, total
}

// spyFactory is a CipherFactory that keeps the key slices it was given (to
// check that the disk wiped them) and the ciphers it made.
type spyFactory struct {
	inner CipherFactory

	mu      sync.Mutex
	keys    [][]byte
	ciphers []*spyCipher
}

func (f *spyFactory) make(key []byte) (SectorCipher, error) {
	c, err := f.inner(key)
	if err != nil {
		return nil, err
	}
	s := &spyCipher{inner: c}
	f.mu.Lock()
	defer f.mu.Unlock()
	if allZero(key) {
		panic("cipher factory given an all-zero key")
	}
	f.keys = append(f.keys, key)
	f.ciphers = append(f.ciphers, s)
	return s, nil
}

func (f *spyFactory) last() (*spyCipher, []byte, int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := len(f.ciphers)
	if n == 0 {
		return nil, nil, 0
	}
	return f.ciphers[n-1], f.keys[n-1], n
}

var factories = []struct {
	name string
	f    CipherFactory
}{
	{"reference", NewReferenceCipher},
	{"xts", func(key []byte) (SectorCipher, error) { return xts.New(key) }},
	{"default", func(key []byte) (SectorCipher, error) { return DefaultCipher(key) }},
}

// checkZeroed checks that c was zeroed exactly once and, for the fast
// cipher, which keeps its key schedule in arrays of its own, that they held
// key material before Zero and none after.
func checkZeroed(t *testing.T, what string, c *spyCipher) {
	t.Helper()
	if n := c.zeroCalls.Load(); n != 1 {
		t.Errorf("%s: cipher Zero called %d times, want 1", what, n)
	}
	if _, fast := c.inner.(*xts.Cipher); fast {
		if c.beforeZero == 0 {
			t.Errorf("%s: found no key bytes in the cipher before Zero: the reflection check sees nothing", what)
		}
		if c.afterZero != 0 {
			t.Errorf("%s: %d key schedule bytes still nonzero after Zero", what, c.afterZero)
		}
	}
	if c.misuse.Load() {
		t.Errorf("%s: cipher used after Zero", what)
	}
}

func TestDEKZeroing(t *testing.T) {
	for _, fc := range factories {
		t.Run(fc.name, func(t *testing.T) {
			ctx := context.Background()
			spy := &spyFactory{inner: fc.f}
			keys := cryptodisktest.NewKeys("int")
			store := memstore.New(0)
			d, err := Create(ctx, store, keys, CreateOptions{SizeBytes: 1 << 20, Provider: "test"}, Options{Cipher: spy.make})
			if err != nil {
				t.Fatal(err)
			}
			c1, key1, n := spy.last()
			if n != 1 {
				t.Fatalf("Create built %d ciphers, want 1", n)
			}
			if !allZero(key1) {
				t.Errorf("volume key passed to the factory not wiped after Create")
			}
			if err := d.WriteAt(ctx, bytes.Repeat([]byte{9}, 5000), 100); err != nil {
				t.Fatal(err)
			}

			d.Suspend("test")
			checkZeroed(t, "Suspend", c1)
			if d.cipher != nil {
				t.Errorf("disk still references a cipher while suspended")
			}

			// A failed Resume builds no cipher.
			keys.Fail(syscall.EACCES)
			if err := d.Resume(ctx, keys); err == nil {
				t.Fatal("Resume with a failing unwrapper succeeded")
			}
			keys.Fail(nil)
			if _, _, n := spy.last(); n != 1 {
				t.Errorf("failed Resume built a cipher")
			}

			if err := d.Resume(ctx, keys); err != nil {
				t.Fatal(err)
			}
			c2, key2, n := spy.last()
			if n != 2 {
				t.Fatalf("Resume built %d ciphers in all, want 2", n)
			}
			if !allZero(key2) {
				t.Errorf("volume key passed to the factory not wiped after Resume")
			}
			got := make([]byte, 5000)
			if err := d.ReadAt(ctx, got, 100); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{9}, 5000)) {
				t.Errorf("ReadAt after Resume: %v, data right %v", err, bytes.Equal(got, bytes.Repeat([]byte{9}, 5000)))
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			checkZeroed(t, "Close", c2)

			// Open wipes its volume key as well; Close of a suspended disk
			// zeroes nothing twice.
			d, err = Open(ctx, store.Reopen(), keys, Options{Cipher: spy.make})
			if err != nil {
				t.Fatal(err)
			}
			c3, key3, _ := spy.last()
			if !allZero(key3) {
				t.Errorf("volume key passed to the factory not wiped after Open")
			}
			d.Suspend("test")
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			checkZeroed(t, "Suspend then Close", c3)
		})
	}
}

// TestResumeRacingClose closes the disk while Resume is unwrapping: the
// cipher Resume then builds must be zeroed, not installed.
func TestResumeRacingClose(t *testing.T) {
	ctx := context.Background()
	spy := &spyFactory{inner: NewReferenceCipher}
	keys := cryptodisktest.NewKeys("int")
	// The store outlives the disk's Close, so Resume can still read the
	// keyslot after it.
	store := keepOpen{memstore.New(0)}
	d, err := Create(ctx, store, keys, CreateOptions{SizeBytes: 1 << 20, Provider: "test"}, Options{Cipher: spy.make})
	if err != nil {
		t.Fatal(err)
	}
	d.Suspend("test")
	closing := cryptodisktest.UnwrapFunc(func(ctx context.Context, kid, alg string, wrapped, aad []byte) ([]byte, error) {
		d.Close()
		return keys.Unwrap(ctx, kid, alg, wrapped, aad)
	})
	if err := d.Resume(ctx, closing); err != nil {
		t.Errorf("Resume racing Close: %v", err)
	}
	c, _, n := spy.last()
	if n != 2 {
		t.Fatalf("%d ciphers built, want 2", n)
	}
	if c.zeroCalls.Load() != 1 {
		t.Errorf("cipher built by a Resume that lost to Close was not zeroed")
	}
	if st, _, _ := d.State(); st != StateClosed || d.cipher != nil {
		t.Errorf("after Resume racing Close: state %s, cipher %v", st, d.cipher)
	}
}

// TestNoCipherUseAfterZero flaps the gate under load: no request may use a
// cipher after Suspend zeroed it.
func TestNoCipherUseAfterZero(t *testing.T) {
	ctx := context.Background()
	spy := &spyFactory{inner: func(key []byte) (SectorCipher, error) { return xts.New(key) }}
	keys := cryptodisktest.NewKeys("int")
	d, err := Create(ctx, memstore.New(0), keys, CreateOptions{SizeBytes: 1 << 20, SectorSize: 512, Provider: "test"}, Options{Cipher: spy.make})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var ioErr atomic.Value
	for g := range 3 {
		wg.Go(func() {
			buf := make([]byte, 3000)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				off := int64(g)*300000 + int64(i%50)*1001
				var err error
				if i%2 == 0 {
					err = d.WriteAt(ctx, buf, off)
				} else {
					err = d.ReadAt(ctx, buf, off)
				}
				if err != nil && !errors.Is(err, ErrSuspended) {
					ioErr.Store(err)
				}
			}
		})
	}
	for range 30 {
		d.Suspend("flap")
		if err := d.Resume(ctx, keys); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	if err, _ := ioErr.Load().(error); err != nil {
		t.Errorf("I/O during flapping: %v", err)
	}
	spy.mu.Lock()
	defer spy.mu.Unlock()
	for i, c := range spy.ciphers {
		if c.misuse.Load() {
			t.Errorf("cipher %d used after Zero", i)
		}
		if want := int32(1); i < len(spy.ciphers)-1 && c.zeroCalls.Load() != want {
			t.Errorf("cipher %d zeroed %d times, want 1", i, c.zeroCalls.Load())
		}
	}
}

// keepOpen is a store that ignores Close.
type keepOpen struct{ cryptodisktest.Storage }

func (keepOpen) Close() error { return nil }
