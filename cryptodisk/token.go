package cryptodisk

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/json"
	"fmt"
)

// TokenType is the LUKS2 token type that binds keyslot 0 to a key provider,
// the way systemd-cryptenroll and clevis bind theirs.
const TokenType = "cryptnbd-keywrap"

// tokenID is the LUKS2 token slot this package owns.
const tokenID = 0

// Token is the content of the cryptnbd-keywrap LUKS2 token: how to recover
// the passphrase of keyslot 0. It holds no secret in the clear.
type Token struct {
	Type     string   `json:"type"`
	Keyslots []string `json:"keyslots"`
	// Provider names the key provider ("platform", "keyvault").
	Provider string `json:"provider"`
	// KeyID is the full, versioned identifier of the wrapping key.
	KeyID string `json:"kid"`
	// Algorithm is the wrapping algorithm (A256GCM, RSA-OAEP-256, ...).
	Algorithm string `json:"alg"`
	// Wrapped is the keyslot secret, wrapped.
	Wrapped []byte `json:"wrapped"`
	// Check is HMAC-SHA256(secret, checkLabel || disk UUID) truncated to 16
	// bytes: opening detects a wrong key or a token copied from another disk
	// before trying the keyslot, even under algorithms without associated data.
	Check []byte `json:"check"`
	// Properties are the daemon's own metadata about the disk (its name,
	// encryption type, disk encryption set), kept in the image so it is
	// self-describing.
	Properties map[string]string `json:"properties,omitempty"`
}

const checkLabel = "cryptnbd keyslot check v1\x00"

func checkValue(secret []byte, uuid string) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(checkLabel))
	m.Write([]byte(uuid))
	return m.Sum(nil)[:16]
}

// aad binds a wrapped secret to one disk for providers that support
// associated data.
func aad(uuid string) []byte { return []byte("cryptnbd disk " + uuid) }

func parseToken(raw json.RawMessage) (Token, error) {
	var t Token
	if err := json.Unmarshal(raw, &t); err != nil {
		return Token{}, fmt.Errorf("cryptodisk: token: %w", err)
	}
	if t.Type != TokenType {
		return Token{}, fmt.Errorf("cryptodisk: token type %q, want %q: %w", t.Type, TokenType, ErrNotCryptnbd)
	}
	if t.Provider == "" || t.KeyID == "" || len(t.Wrapped) == 0 || len(t.Check) != 16 {
		return Token{}, fmt.Errorf("cryptodisk: token is incomplete: %w", ErrNotCryptnbd)
	}
	return t, nil
}
