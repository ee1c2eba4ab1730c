package keys

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

const (
	// PlatformName is the provider name recorded in disk tokens.
	PlatformName = "platform"
	// PlatformAlgorithm is AES-256-GCM with a random 96-bit nonce; the
	// wrapped value is nonce || ciphertext || tag.
	PlatformAlgorithm = "A256GCM"
	platformKeyFile   = "platform-key.json"
	platformKIDPrefix = "platform:keys/platform-master/"
)

// Platform is the default provider: a 256-bit master key, with versions,
// created on first start in the data directory with mode 0600. It is what
// platform-managed keys are on a managed disk: no setup, no external service.
// Safe for concurrent use.
type Platform struct {
	path string

	mu       sync.RWMutex
	versions map[string]*platformVersion
	current  string
}

type platformVersion struct {
	key     secret
	aead    cipher.AEAD
	created time.Time
	enabled bool
}

// platformFile is the on-disk form. The key bytes are stored raw: the file
// is the root of trust of platform-managed disks, protected by its mode and
// the data directory's, as a TPM-less host can do no better.
type platformFile struct {
	Current  string              `json:"current"`
	Versions []platformFileEntry `json:"versions"`
}

type platformFileEntry struct {
	Version string `json:"version"`
	Key     []byte `json:"key"`
	Created int64  `json:"created"`
	Enabled bool   `json:"enabled"`
}

// OpenPlatform loads the platform key from dataDir, creating it on first use.
func OpenPlatform(dataDir string) (*Platform, error) {
	p := &Platform{path: filepath.Join(dataDir, platformKeyFile), versions: map[string]*platformVersion{}}
	raw, err := os.ReadFile(p.path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if _, err := p.addVersion(); err != nil {
			return nil, err
		}
		if err := p.save(); err != nil {
			return nil, err
		}
		return p, nil
	case err != nil:
		return nil, fmt.Errorf("keys: platform key: %w", err)
	}
	st, err := os.Stat(p.path)
	if err != nil {
		return nil, fmt.Errorf("keys: platform key: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("keys: platform key %s has mode %o: it must be readable by its owner only (chmod 600)", p.path, st.Mode().Perm())
	}
	var f platformFile
	if err := json.Unmarshal(raw, &f); err != nil {
		return nil, fmt.Errorf("keys: platform key %s: %w", p.path, err)
	}
	clear(raw)
	for _, e := range f.Versions {
		v, err := newPlatformVersion(e.Key, time.Unix(e.Created, 0), e.Enabled)
		clear(e.Key)
		if err != nil {
			return nil, fmt.Errorf("keys: platform key version %s: %w", e.Version, err)
		}
		p.versions[e.Version] = v
	}
	if p.versions[f.Current] == nil {
		return nil, fmt.Errorf("keys: platform key %s: current version %q missing", p.path, f.Current)
	}
	p.current = f.Current
	return p, nil
}

func newPlatformVersion(key []byte, created time.Time, enabled bool) (*platformVersion, error) {
	if len(key) != 32 {
		return nil, fmt.Errorf("keys: platform key is %d bytes, want 32", len(key))
	}
	k := make(secret, 32)
	copy(k, key)
	block, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &platformVersion{key: k, aead: aead, created: created, enabled: enabled}, nil
}

// addVersion makes a new current version. The caller holds mu or owns p.
func (p *Platform) addVersion() (string, error) {
	key := make([]byte, 32)
	defer clear(key)
	if _, err := rand.Read(key); err != nil {
		return "", fmt.Errorf("keys: platform key: %w", err)
	}
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return "", fmt.Errorf("keys: platform key: %w", err)
	}
	version := hex.EncodeToString(id)
	v, err := newPlatformVersion(key, time.Now(), true)
	if err != nil {
		return "", err
	}
	p.versions[version] = v
	p.current = version
	return version, nil
}

// save writes the key file atomically: a crash leaves the old or the new.
func (p *Platform) save() error {
	f := platformFile{Current: p.current}
	for id, v := range p.versions {
		f.Versions = append(f.Versions, platformFileEntry{Version: id, Key: []byte(v.key), Created: v.created.Unix(), Enabled: v.enabled})
	}
	raw, err := json.Marshal(f)
	if err != nil {
		return fmt.Errorf("keys: platform key: %w", err)
	}
	defer clear(raw)
	return writeFileAtomic(p.path, raw, 0o600)
}

// Name is PlatformName.
func (p *Platform) Name() string { return PlatformName }

// CurrentKeyID is the kid new disks are wrapped under.
func (p *Platform) CurrentKeyID() string {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return platformKIDPrefix + p.current
}

// Wrap seals secret under the current version with aad as associated data.
func (p *Platform) Wrap(_ context.Context, sec, aad []byte) (string, string, []byte, error) {
	p.mu.RLock()
	id, v := p.current, p.versions[p.current]
	p.mu.RUnlock()
	nonce := make([]byte, v.aead.NonceSize(), v.aead.NonceSize()+len(sec)+v.aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return "", "", nil, fmt.Errorf("keys: platform wrap: %w", err)
	}
	return platformKIDPrefix + id, PlatformAlgorithm, v.aead.Seal(nonce, nonce, sec, aad), nil
}

// Unwrap opens a secret sealed by Wrap under the version kid names.
func (p *Platform) Unwrap(_ context.Context, kid, alg string, wrapped, aad []byte) ([]byte, error) {
	if alg != PlatformAlgorithm {
		return nil, fmt.Errorf("keys: platform unwrap: algorithm %q, want %s", alg, PlatformAlgorithm)
	}
	v, err := p.version(kid)
	if err != nil {
		return nil, err
	}
	if !v.enabled {
		return nil, fmt.Errorf("keys: platform unwrap %s: %w", kid, ErrKeyDisabled)
	}
	ns := v.aead.NonceSize()
	if len(wrapped) < ns+v.aead.Overhead() {
		return nil, fmt.Errorf("keys: platform unwrap: %w", ErrUnwrap)
	}
	out, err := v.aead.Open(nil, wrapped[:ns], wrapped[ns:], aad)
	if err != nil {
		return nil, fmt.Errorf("keys: platform unwrap: %w", ErrUnwrap)
	}
	return out, nil
}

func (p *Platform) version(kid string) (*platformVersion, error) {
	id, ok := strings.CutPrefix(kid, platformKIDPrefix)
	if !ok {
		return nil, fmt.Errorf("keys: %q is not a platform key id: %w", kid, ErrKeyNotFound)
	}
	p.mu.RLock()
	defer p.mu.RUnlock()
	v := p.versions[id]
	if v == nil {
		return nil, fmt.Errorf("keys: platform key %s: %w", kid, ErrKeyNotFound)
	}
	return v, nil
}

// Status reports whether the version exists and is enabled.
func (p *Platform) Status(_ context.Context, kid string) (KeyStatus, error) {
	v, err := p.version(kid)
	if err != nil {
		return KeyStatus{}, err
	}
	return KeyStatus{KeyID: kid, Enabled: v.enabled, Latest: p.CurrentKeyID()}, nil
}

// Rotate creates a new current version. Existing disks keep unwrapping
// under their old version until re-wrapped.
func (p *Platform) Rotate() (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	old := p.current
	id, err := p.addVersion()
	if err != nil {
		return "", err
	}
	if err := p.save(); err != nil {
		p.versions[id].key = nil
		delete(p.versions, id)
		p.current = old
		return "", err
	}
	return platformKIDPrefix + id, nil
}

// Close wipes the key material held in memory (best effort: crypto/aes
// keeps its own expanded copy, which Go gives no way to reach).
func (p *Platform) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, v := range p.versions {
		clear(v.key)
		v.aead = nil
	}
	p.versions = map[string]*platformVersion{}
}

// writeFileAtomic replaces path with data via a synced temporary file and a
// rename, then syncs the directory so the rename itself is durable.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("keys: write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(perm); err == nil {
		if _, err = tmp.Write(data); err == nil {
			err = tmp.Sync()
		}
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("keys: write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("keys: write %s: %w", path, err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("keys: sync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("keys: sync %s: %w", dir, err)
	}
	return nil
}
