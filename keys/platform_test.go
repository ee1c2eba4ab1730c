package keys_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cryptnbd/cryptnbd/keys"
)

func TestPlatformRoundTripAndPersistence(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	p, err := keys.OpenPlatform(dir)
	if err != nil {
		t.Fatalf("OpenPlatform: %v", err)
	}
	st, err := os.Stat(filepath.Join(dir, "platform-key.json"))
	if err != nil {
		t.Fatalf("key file: %v", err)
	}
	if got := st.Mode().Perm(); got != 0o600 {
		t.Errorf("key file mode = %o, want 600", got)
	}
	secret := bytes.Repeat([]byte{7}, 32)
	kid, alg, wrapped, err := p.Wrap(ctx, secret, []byte("disk-a"))
	if err != nil {
		t.Fatalf("Wrap: %v", err)
	}
	if alg != keys.PlatformAlgorithm || !strings.HasPrefix(kid, "platform:") {
		t.Errorf("Wrap gave kid %q alg %q", kid, alg)
	}
	if bytes.Contains(wrapped, secret) {
		t.Errorf("wrapped value contains the secret")
	}
	p.Close()

	p2, err := keys.OpenPlatform(dir)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer p2.Close()
	got, err := p2.Unwrap(ctx, kid, alg, wrapped, []byte("disk-a"))
	if err != nil {
		t.Fatalf("Unwrap after reopen: %v", err)
	}
	if !bytes.Equal(got, secret) {
		t.Errorf("Unwrap = %x, want %x", got, secret)
	}
	if _, err := p2.Unwrap(ctx, kid, alg, wrapped, []byte("disk-b")); !errors.Is(err, keys.ErrUnwrap) {
		t.Errorf("Unwrap with another disk's aad: err = %v, want ErrUnwrap", err)
	}
	tampered := bytes.Clone(wrapped)
	tampered[len(tampered)-1] ^= 1
	if _, err := p2.Unwrap(ctx, kid, alg, tampered, []byte("disk-a")); !errors.Is(err, keys.ErrUnwrap) {
		t.Errorf("Unwrap of tampered value: err = %v, want ErrUnwrap", err)
	}
	if _, err := p2.Unwrap(ctx, "platform:keys/platform-master/00", alg, wrapped, nil); !errors.Is(err, keys.ErrKeyNotFound) {
		t.Errorf("Unwrap with unknown version: err = %v, want ErrKeyNotFound", err)
	}
}

func TestPlatformRotateKeepsOldVersions(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	p, err := keys.OpenPlatform(dir)
	if err != nil {
		t.Fatal(err)
	}
	kid1, alg, w1, err := p.Wrap(ctx, []byte("s1"), nil)
	if err != nil {
		t.Fatal(err)
	}
	kid2, err := p.Rotate()
	if err != nil {
		t.Fatalf("Rotate: %v", err)
	}
	if kid2 == kid1 || p.CurrentKeyID() != kid2 {
		t.Errorf("after Rotate current = %q, old %q, new %q", p.CurrentKeyID(), kid1, kid2)
	}
	p.Close()
	p, err = keys.OpenPlatform(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if got, err := p.Unwrap(ctx, kid1, alg, w1, nil); err != nil || string(got) != "s1" {
		t.Errorf("old version after rotate: %q, %v", got, err)
	}
	st, err := p.Status(ctx, kid1)
	if err != nil || !st.Enabled || st.Latest != kid2 {
		t.Errorf("Status(old) = %+v, %v; want enabled with Latest %s", st, err, kid2)
	}
}

func TestPlatformRefusesLooseKeyFile(t *testing.T) {
	dir := t.TempDir()
	p, err := keys.OpenPlatform(dir)
	if err != nil {
		t.Fatal(err)
	}
	p.Close()
	if err := os.Chmod(filepath.Join(dir, "platform-key.json"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := keys.OpenPlatform(dir); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("OpenPlatform on a 0644 key file: err = %v, want a chmod hint", err)
	}
}
