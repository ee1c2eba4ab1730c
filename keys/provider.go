package keys

import (
	"context"
	"errors"
	"log/slog"
	"time"
)

// Provider wraps and unwraps keyslot secrets. Implementations are safe for
// concurrent use. Its method set satisfies cryptodisk's KeyWrapper and
// KeyUnwrapper.
type Provider interface {
	// Name is recorded in each disk's token to pick the provider on open.
	Name() string
	// Wrap wraps secret under the provider's current key version. aad binds
	// the result to one disk where the algorithm supports it.
	Wrap(ctx context.Context, secret, aad []byte) (kid, alg string, wrapped []byte, err error)
	// Unwrap recovers a secret wrapped under the versioned key kid.
	Unwrap(ctx context.Context, kid, alg string, wrapped, aad []byte) ([]byte, error)
	// Status reports the state of the versioned key kid.
	Status(ctx context.Context, kid string) (KeyStatus, error)
}

// KeyStatus is what a provider knows about one key version.
type KeyStatus struct {
	KeyID   string
	Enabled bool
	// Expires is zero when the key never expires.
	Expires time.Time
	// NotBefore is zero when the key has no start date.
	NotBefore time.Time
	// Latest is the kid of the newest enabled version of the same key, for
	// automatic rotation.
	Latest string
}

var (
	// ErrKeyNotFound means the provider has no such key or version.
	ErrKeyNotFound = errors.New("keys: key not found")
	// ErrKeyDisabled means the key version exists but may not be used.
	ErrKeyDisabled = errors.New("keys: key is disabled")
	// ErrUnwrap means the wrapped secret does not open under the key: it was
	// tampered with, or belongs to another disk.
	ErrUnwrap = errors.New("keys: wrapped secret does not verify")
)

// secret is key material: it never prints or logs its bytes.
type secret []byte

func (secret) String() string                 { return "[REDACTED]" }
func (secret) GoString() string               { return "[REDACTED]" }
func (secret) LogValue() slog.Value           { return slog.StringValue("[REDACTED]") }
func (s secret) MarshalJSON() ([]byte, error) { return []byte(`"[REDACTED]"`), nil }
