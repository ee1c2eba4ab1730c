// Package cryptodisktest holds test doubles for cryptodisk: a key wrapper
// with a fixed key and injectable failures, Storage wrappers that block
// or fail I/O, and FirstDiff for reporting where data went wrong.
//
// It imports only the standard library, so white-box tests inside package
// cryptodisk can use it without an import cycle; its types satisfy
// cryptodisk's interfaces structurally.
package cryptodisktest

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
)

// Algorithm is the wrapping algorithm Keys records in tokens.
const Algorithm = "A256GCM"

// Keys is a KeyWrapper and KeyUnwrapper for tests: AES-256-GCM under a key
// derived from a fixed seed, with a random nonce, binding aad like a real
// provider. Two Keys made from the same seed unwrap each other's secrets.
//
// With IgnoreAAD set it behaves like a provider whose algorithm has no
// associated data (RSA-OAEP): it unwraps a secret wrapped for another disk,
// so that only the disk's check value can catch the mix-up.
//
// Keys is safe for concurrent use.
type Keys struct {
	kid  string
	aead cipher.AEAD

	mu        sync.Mutex
	ignoreAAD bool
	err       error
	unwraps   int
	wraps     int
}

// NewKeys returns Keys whose AES key is SHA-256(seed) and whose key ID is
// "test:" + seed.
func NewKeys(seed string) *Keys {
	key := sha256.Sum256([]byte(seed))
	block, err := aes.NewCipher(key[:])
	if err != nil {
		panic(err) // a 32-byte key cannot fail
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		panic(err)
	}
	return &Keys{kid: "test:" + seed, aead: aead}
}

// KeyID is the key identifier Wrap returns.
func (k *Keys) KeyID() string { return k.kid }

// Fail makes every later Wrap and Unwrap fail with an error wrapping err;
// Fail(nil) makes them work again.
func (k *Keys) Fail(err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.err = err
}

// IgnoreAAD makes Unwrap ignore aad (Wrap then binds none either).
func (k *Keys) IgnoreAAD(ignore bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.ignoreAAD = ignore
}

// Unwraps is how many Unwrap calls have succeeded.
func (k *Keys) Unwraps() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.unwraps
}

// Wraps is how many Wrap calls have succeeded.
func (k *Keys) Wraps() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.wraps
}

func (k *Keys) state() (err error, ignoreAAD bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.err, k.ignoreAAD
}

// Wrap seals secret under the fixed key: nonce || ciphertext || tag.
func (k *Keys) Wrap(ctx context.Context, secret, aad []byte) (kid, alg string, wrapped []byte, err error) {
	if err := ctx.Err(); err != nil {
		return "", "", nil, fmt.Errorf("cryptodisktest: wrap: %w", err)
	}
	fail, ignore := k.state()
	if fail != nil {
		return "", "", nil, fmt.Errorf("cryptodisktest: wrap: %w", fail)
	}
	if ignore {
		aad = nil
	}
	nonce := make([]byte, k.aead.NonceSize(), k.aead.NonceSize()+len(secret)+k.aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return "", "", nil, fmt.Errorf("cryptodisktest: wrap: %w", err)
	}
	wrapped = k.aead.Seal(nonce, nonce, secret, aad)
	k.mu.Lock()
	k.wraps++
	k.mu.Unlock()
	return k.kid, Algorithm, wrapped, nil
}

// ErrUnknownKey is returned by Unwrap for a kid or algorithm Keys did not
// produce.
var ErrUnknownKey = errors.New("cryptodisktest: unknown key or algorithm")

// Unwrap opens a value made by Wrap. The caller owns the returned secret.
func (k *Keys) Unwrap(ctx context.Context, kid, alg string, wrapped, aad []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("cryptodisktest: unwrap: %w", err)
	}
	fail, ignore := k.state()
	if fail != nil {
		return nil, fmt.Errorf("cryptodisktest: unwrap: %w", fail)
	}
	if kid != k.kid || alg != Algorithm {
		return nil, fmt.Errorf("cryptodisktest: unwrap %s/%s: %w", kid, alg, ErrUnknownKey)
	}
	if ignore {
		aad = nil
	}
	ns := k.aead.NonceSize()
	if len(wrapped) < ns+k.aead.Overhead() {
		return nil, errors.New("cryptodisktest: unwrap: wrapped value too short")
	}
	secret, err := k.aead.Open(nil, wrapped[:ns], wrapped[ns:], aad)
	if err != nil {
		return nil, fmt.Errorf("cryptodisktest: unwrap: %w", err)
	}
	k.mu.Lock()
	k.unwraps++
	k.mu.Unlock()
	return secret, nil
}

// UnwrapFunc adapts a function to a KeyUnwrapper, for unwrappers that
// misbehave in one particular way.
type UnwrapFunc func(ctx context.Context, kid, alg string, wrapped, aad []byte) ([]byte, error)

// Unwrap calls f.
func (f UnwrapFunc) Unwrap(ctx context.Context, kid, alg string, wrapped, aad []byte) ([]byte, error) {
	return f(ctx, kid, alg, wrapped, aad)
}

// WrongSecret is an unwrapper that succeeds with a random secret of n bytes,
// as a provider would after a key was replaced under the same name.
func WrongSecret(n int) UnwrapFunc {
	return func(context.Context, string, string, []byte, []byte) ([]byte, error) {
		s := make([]byte, n)
		rand.Read(s)
		return s, nil
	}
}
