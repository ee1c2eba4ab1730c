package kvserver

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// File names inside Options.DataDir.
const (
	stateFile   = "state.json"   // vault state; private keys sealed with secrets.json's storage key
	secretsFile = "secrets.json" // storage key, token signing key, identity header secret (0600)
	adminFile   = "admin.json"   // AdminConfig for local clients (0600)
	caFile      = "ca.pem"       // CA certificate clients trust
	caKeyFile   = "ca-key.pem"   // CA private key (0600)
	certFile    = "server.pem"   // server certificate chain
	keyFile     = "server-key.pem"
)

// secrets are the server's own keys. They live in their own 0600 file so that
// state.json alone reveals no private key material.
type secrets struct {
	StorageKey     []byte `json:"storageKey"`     // AES-256-GCM key sealing private keys
	TokenKey       []byte `json:"tokenKey"`       // HMAC-SHA256 key signing access tokens
	IdentityHeader string `json:"identityHeader"` // X-IDENTITY-HEADER secret of the token endpoint
}

// state is everything the vault persists apart from secrets. It is written
// as a whole, atomically, after every mutation.
type state struct {
	TenantID      string                `json:"tenantId"`
	AdminObjectID string                `json:"adminObjectId"`
	Principals    map[string]*Principal `json:"principals"` // by object id
	Policies      map[string][]string   `json:"policies"`   // object id → lower-case key permissions
	Keys          map[string]*vaultKey  `json:"keys"`       // by lower-case name
}

// vaultKey is one named key with all its versions.
type vaultKey struct {
	Name           string          `json:"name"`
	Versions       []*keyVersion   `json:"versions"` // creation order; the last is the latest
	DeletedDate    int64           `json:"deletedDate,omitempty"`
	PurgeDate      int64           `json:"scheduledPurgeDate,omitempty"`
	RotationPolicy *rotationPolicy `json:"rotationPolicy,omitempty"` // nil: the default policy
}

// rotationPolicy is a key's stored rotation policy. The server keeps and
// returns it but does not rotate keys on its own.
type rotationPolicy struct {
	LifetimeActions []lifetimeAction `json:"lifetimeActions"`
	ExpiryTime      string           `json:"expiryTime,omitempty"` // ISO 8601 duration, e.g. P90D
	Created         int64            `json:"created"`
	Updated         int64            `json:"updated"`
}

type lifetimeAction struct {
	Trigger struct {
		TimeAfterCreate  string `json:"timeAfterCreate,omitempty"`
		TimeBeforeExpiry string `json:"timeBeforeExpiry,omitempty"`
	} `json:"trigger"`
	Action struct {
		Type string `json:"type"`
	} `json:"action"`
}

func (k *vaultKey) deleted() bool { return k.DeletedDate != 0 }

func (k *vaultKey) latest() *keyVersion { return k.Versions[len(k.Versions)-1] }

func (k *vaultKey) version(v string) *keyVersion {
	if v == "" {
		return k.latest()
	}
	for _, kv := range k.Versions {
		if kv.Version == v {
			return kv
		}
	}
	return nil
}

// keyVersion is one RSA key version. Sealed holds the PKCS#1 private key
// sealed with AES-256-GCM (nonce || ciphertext), bound to name/version.
type keyVersion struct {
	Version string            `json:"version"`
	Kty     string            `json:"kty"`
	KeyOps  []string          `json:"keyOps"`
	Enabled bool              `json:"enabled"`
	NBF     *int64            `json:"nbf,omitempty"`
	Exp     *int64            `json:"exp,omitempty"`
	Created int64             `json:"created"`
	Updated int64             `json:"updated"`
	Tags    map[string]string `json:"tags,omitempty"`
	N       []byte            `json:"n"`
	E       []byte            `json:"e"`
	Sealed  []byte            `json:"sealed"`
}

// writeFileAtomic replaces path with data: temp file, fsync, rename, fsync dir.
func writeFileAtomic(path string, data []byte, perm fs.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after a successful rename
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// loadOrCreateSecrets reads DIR/secrets.json, creating it on first start.
func loadOrCreateSecrets(dir string) (*secrets, error) {
	path := filepath.Join(dir, secretsFile)
	b, err := os.ReadFile(path)
	if err == nil {
		var s secrets
		if err := json.Unmarshal(b, &s); err != nil {
			return nil, fmt.Errorf("kvserver: parse %s: %w", path, err)
		}
		if len(s.StorageKey) != 32 || len(s.TokenKey) < 32 || s.IdentityHeader == "" {
			return nil, fmt.Errorf("kvserver: %s is incomplete", path)
		}
		return &s, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("kvserver: read secrets: %w", err)
	}
	s := &secrets{StorageKey: randBytes(32), TokenKey: randBytes(32), IdentityHeader: randHex(32)}
	b, err = json.MarshalIndent(s, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("kvserver: encode secrets: %w", err)
	}
	if err := writeFileAtomic(path, b, 0o600); err != nil {
		return nil, fmt.Errorf("kvserver: write secrets: %w", err)
	}
	return s, nil
}

// loadState reads DIR/state.json; ok is false if it does not exist yet.
func loadState(dir string) (st *state, ok bool, err error) {
	path := filepath.Join(dir, stateFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("kvserver: read state: %w", err)
	}
	st = new(state)
	if err := json.Unmarshal(b, st); err != nil {
		return nil, false, fmt.Errorf("kvserver: parse %s: %w", path, err)
	}
	if st.Principals == nil {
		st.Principals = map[string]*Principal{}
	}
	if st.Policies == nil {
		st.Policies = map[string][]string{}
	}
	if st.Keys == nil {
		st.Keys = map[string]*vaultKey{}
	}
	return st, true, nil
}

func saveState(dir string, st *state) error {
	b, err := json.MarshalIndent(st, "", " ")
	if err != nil {
		return fmt.Errorf("kvserver: encode state: %w", err)
	}
	if err := writeFileAtomic(filepath.Join(dir, stateFile), b, 0o600); err != nil {
		return fmt.Errorf("kvserver: write state: %w", err)
	}
	return nil
}

// sealer seals private keys with AES-256-GCM. It is safe for concurrent use.
type sealer struct{ aead cipher.AEAD }

func newSealer(key []byte) (*sealer, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("kvserver: storage key: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("kvserver: storage key: %w", err)
	}
	return &sealer{aead: aead}, nil
}

func (s *sealer) seal(priv *rsa.PrivateKey, name, version string) []byte {
	nonce := randBytes(s.aead.NonceSize())
	return s.aead.Seal(nonce, nonce, x509.MarshalPKCS1PrivateKey(priv), []byte(name+"/"+version))
}

func (s *sealer) open(sealed []byte, name, version string) (*rsa.PrivateKey, error) {
	ns := s.aead.NonceSize()
	if len(sealed) < ns {
		return nil, errors.New("kvserver: sealed key too short")
	}
	der, err := s.aead.Open(nil, sealed[:ns], sealed[ns:], []byte(name+"/"+version))
	if err != nil {
		return nil, fmt.Errorf("kvserver: unseal %s/%s: %w", name, version, err)
	}
	priv, err := x509.ParsePKCS1PrivateKey(der)
	if err != nil {
		return nil, fmt.Errorf("kvserver: parse %s/%s: %w", name, version, err)
	}
	return priv, nil
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b) // never fails (crypto/rand docs)
	return b
}

func randHex(n int) string { return fmt.Sprintf("%x", randBytes(n/2)) }

// newUUID returns a random RFC 4122 version-4 UUID.
func newUUID() string {
	b := randBytes(16)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
