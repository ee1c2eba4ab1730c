package keys

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/http"
	"net/url"
	"regexp"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"
)

const (
	// KeyVaultName is the provider name recorded in disk tokens.
	KeyVaultName = "keyvault"
	// DefaultWrapAlgorithm is the algorithm new wraps use.
	DefaultWrapAlgorithm = "RSA-OAEP-256"
	// DefaultCallTimeout bounds each Key Vault call.
	DefaultCallTimeout = 10 * time.Second
)

// KeyVaultOptions configure a KeyVault provider.
type KeyVaultOptions struct {
	// KeyURL is https://{vault}/keys/{name}[/{version}]. Without a version,
	// Wrap uses whatever version the vault says is latest until SetCurrent.
	KeyURL string
	// Credential is the disk encryption set's identity.
	Credential azcore.TokenCredential
	// ClientOptions are passed to azkeys, e.g. a Transport trusting a
	// private CA, or Retry settings.
	ClientOptions azcore.ClientOptions
	// AllowNonAzureHost turns off azkeys' challenge-resource verification.
	// Only for an explicitly configured non-Azure host (like the local
	// server); never for *.vault.azure.net etc.
	AllowNonAzureHost bool
	// WrapAlgorithm is RSA-OAEP-256 (default) or RSA-OAEP.
	WrapAlgorithm string
	// CallTimeout bounds each Key Vault call, SDK retries included;
	// default 10s.
	CallTimeout time.Duration
	// Logger receives debug logs; nil discards them.
	Logger *slog.Logger
	// Observe, if set, is called once per Key Vault operation (after the
	// SDK's own retries; one call per page for listings) with op (get,
	// getLatest, wrapKey, unwrapKey, versions), the final HTTP status (0
	// when there was no response) and the duration. It must be fast and
	// safe for concurrent use.
	Observe func(op string, status int, d time.Duration)
}

// KeyVault is the customer-managed-key provider: it wraps keyslot secrets
// with an RSA key in Azure Key Vault (or a compatible server) through
// azkeys, as a disk encryption set's identity. It holds one long-lived
// azkeys.Client for its vault and refuses key ids of other vaults, so a
// forged disk token cannot send the identity's token elsewhere. It is safe
// for concurrent use.
type KeyVault struct {
	keyURL   string // as configured, normalised
	vaultURL string // https://host
	host     string // lower case, with port if any
	keyName  string
	alg      string
	timeout  time.Duration
	allowNon bool
	log      *slog.Logger
	observe  func(string, int, time.Duration)
	client   *azkeys.Client

	mu      sync.Mutex
	current string                    // versioned kid Wrap uses, or "" for the latest
	pubs    map[string]*rsa.PublicKey // versioned kid → public key, for Probe
}

var (
	keyNameRE    = regexp.MustCompile(`^[0-9A-Za-z-]{1,127}$`)
	keyVersionRE = regexp.MustCompile(`^[0-9A-Fa-f]{32}$`)
)

// keyRef is a parsed key URL or kid.
type keyRef struct {
	host, name, version string
}

// parseKeyURL checks u is https://host/keys/{name}[/{32-hex version}].
func parseKeyURL(u string) (keyRef, error) {
	p, err := url.Parse(u)
	if err != nil {
		return keyRef{}, fmt.Errorf("keys: key URL %q: %w", u, err)
	}
	if p.Scheme != "https" || p.Host == "" || p.User != nil || p.RawQuery != "" || p.Fragment != "" {
		return keyRef{}, fmt.Errorf("keys: key URL %q: want https://{vault}/keys/{name}[/{version}]", u)
	}
	segs := strings.Split(strings.Trim(p.Path, "/"), "/")
	if len(segs) < 2 || len(segs) > 3 || segs[0] != "keys" {
		return keyRef{}, fmt.Errorf("keys: key URL %q: path must be /keys/{name}[/{version}]", u)
	}
	r := keyRef{host: strings.ToLower(p.Host), name: segs[1]}
	if !keyNameRE.MatchString(r.name) {
		return keyRef{}, fmt.Errorf("keys: key URL %q: invalid key name %q", u, r.name)
	}
	if len(segs) == 3 {
		if !keyVersionRE.MatchString(segs[2]) {
			return keyRef{}, fmt.Errorf("keys: key URL %q: version %q is not 32 hex digits", u, segs[2])
		}
		r.version = strings.ToLower(segs[2])
	}
	return r, nil
}

func (r keyRef) String() string {
	s := "https://" + r.host + "/keys/" + r.name
	if r.version != "" {
		s += "/" + r.version
	}
	return s
}

// azureVaultSuffixes are the DNS suffixes of Key Vault and Managed HSM in
// the public and sovereign clouds.
var azureVaultSuffixes = []string{
	".vault.azure.net", ".vault.azure.cn", ".vault.usgovcloudapi.net", ".vault.microsoftazure.de",
	".managedhsm.azure.net", ".managedhsm.azure.cn", ".managedhsm.usgovcloudapi.net",
}

func isAzureVaultHost(host string) bool {
	h := strings.ToLower(host)
	if i := strings.LastIndexByte(h, ':'); i >= 0 && !strings.Contains(h[i:], "]") {
		h = h[:i]
	}
	for _, s := range azureVaultSuffixes {
		if strings.HasSuffix(h, s) {
			return true
		}
	}
	return false
}

// NewKeyVault validates o and builds the client; it does not contact the
// vault.
func NewKeyVault(o KeyVaultOptions) (*KeyVault, error) {
	ref, err := parseKeyURL(o.KeyURL)
	if err != nil {
		return nil, err
	}
	if o.Credential == nil {
		return nil, errors.New("keys: key vault: a credential is required")
	}
	switch o.WrapAlgorithm {
	case "":
		o.WrapAlgorithm = DefaultWrapAlgorithm
	case "RSA-OAEP-256", "RSA-OAEP":
	default:
		return nil, fmt.Errorf("keys: key vault: wrap algorithm %q: use RSA-OAEP-256 or RSA-OAEP", o.WrapAlgorithm)
	}
	if o.CallTimeout <= 0 {
		o.CallTimeout = DefaultCallTimeout
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	k := &KeyVault{
		keyURL: ref.String(), vaultURL: "https://" + ref.host, host: ref.host, keyName: ref.name,
		alg: o.WrapAlgorithm, timeout: o.CallTimeout, allowNon: o.AllowNonAzureHost,
		log: o.Logger.With("vault", ref.host), observe: o.Observe, pubs: map[string]*rsa.PublicKey{},
	}
	if ref.version != "" {
		k.current = ref.String()
	}
	k.client, err = azkeys.NewClient(k.vaultURL, &markedCredential{o.Credential}, &azkeys.ClientOptions{
		ClientOptions:                        o.ClientOptions,
		DisableChallengeResourceVerification: o.AllowNonAzureHost,
	})
	if err != nil {
		return nil, fmt.Errorf("keys: key vault client: %w", err)
	}
	return k, nil
}

// markedCredential marks its credential's failures as *tokenError so that
// Classify recognises them however the SDK wraps them.
type markedCredential struct{ c azcore.TokenCredential }

func (m *markedCredential) GetToken(ctx context.Context, o policy.TokenRequestOptions) (azcore.AccessToken, error) {
	tk, err := m.c.GetToken(ctx, o)
	if err != nil {
		return tk, &tokenError{err}
	}
	return tk, nil
}

// Name is KeyVaultName.
func (k *KeyVault) Name() string { return KeyVaultName }

// KeyURL is the configured key URL (normalised).
func (k *KeyVault) KeyURL() string { return k.keyURL }

// Current is the versioned kid Wrap uses, or "" while Wrap follows the
// version the vault calls latest (a key URL without a version and no
// SetCurrent yet).
func (k *KeyVault) Current() string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.current
}

// wrapKeyURL is the key URL Wrap uses: Current, or the versionless key URL.
func (k *KeyVault) wrapKeyURL() string {
	if cur := k.Current(); cur != "" {
		return cur
	}
	return k.keyURL
}

// SetCurrent makes kid, a versioned key id in this vault (e.g. the Latest
// that Status or the watcher reported), the version new wraps use.
// SetCurrent("") goes back to the vault's latest version. Wrap reports an
// error if kid is not usable.
func (k *KeyVault) SetCurrent(kid string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.current = kid
}

// ref parses kid and checks it names a version in this vault.
func (k *KeyVault) ref(kid string, needVersion bool) (keyRef, error) {
	r, err := parseKeyURL(kid)
	if err != nil {
		return keyRef{}, err
	}
	if r.host != k.host {
		return keyRef{}, fmt.Errorf("keys: key %s is not in vault %s", kid, k.vaultURL)
	}
	if needVersion && r.version == "" {
		return keyRef{}, fmt.Errorf("keys: key id %s has no version", kid)
	}
	return r, nil
}

// call runs one SDK operation under the call timeout, turning its error
// into a *VaultError and a panic into an error, and reports it to Observe.
func (k *KeyVault) call(ctx context.Context, op, kid string, f func(ctx context.Context) error) (err error) {
	ctx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	start := time.Now()
	defer func() {
		if v := recover(); v != nil {
			k.log.Debug("key vault client panicked", "op", op, "kid", kid, "panic", v, "stack", string(debug.Stack()))
			err = &VaultError{Op: op, KeyID: kid, Err: panicError(v)}
		}
		if k.observe != nil {
			status := http.StatusOK
			var ve *VaultError
			if errors.As(err, &ve) {
				status = ve.Status
			}
			k.observe(op, status, time.Since(start))
		}
	}()
	if err = f(ctx); err != nil {
		ve := newVaultError(op, kid, err)
		if ve.Status == 0 && !k.allowNon && !isAzureVaultHost(k.host) && Classify(ve) == ClassOther {
			ve.Err = fmt.Errorf("%w (host %s is not an Azure Key Vault or Managed HSM host: if it is a vault you trust, configure it as an allowed non-Azure host)", err, k.host)
		}
		return ve
	}
	return nil
}

// Wrap wraps secret with wrapKey under the current version (see
// SetCurrent) and returns the versioned kid the vault reports. aad is
// ignored: RSA has none, and the disk's check value covers swapped secrets.
func (k *KeyVault) Wrap(ctx context.Context, secret, aad []byte) (string, string, []byte, error) {
	cur := k.wrapKeyURL()
	r, err := k.ref(cur, false)
	if err != nil {
		return "", "", nil, fmt.Errorf("keys: key vault wrap: current key: %w", err)
	}
	alg := azkeys.EncryptionAlgorithm(k.alg)
	var resp azkeys.WrapKeyResponse
	err = k.call(ctx, "wrapKey", cur, func(ctx context.Context) error {
		var err error
		resp, err = k.client.WrapKey(ctx, r.name, r.version, azkeys.KeyOperationParameters{Algorithm: &alg, Value: secret}, nil)
		return err
	})
	if err != nil {
		return "", "", nil, err
	}
	if resp.KID == nil || len(resp.Result) == 0 {
		return "", "", nil, &VaultError{Op: "wrapKey", KeyID: cur, Err: errors.New("response has no kid or value")}
	}
	kid := string(*resp.KID)
	if _, err := k.ref(kid, true); err != nil {
		return "", "", nil, &VaultError{Op: "wrapKey", KeyID: cur, Err: fmt.Errorf("response kid: %w", err)}
	}
	return kid, k.alg, resp.Result, nil
}

// Unwrap unwraps with unwrapKey on exactly the versioned kid. It accepts
// RSA-OAEP-256, RSA-OAEP and (for old wraps) RSA1_5. aad is ignored.
func (k *KeyVault) Unwrap(ctx context.Context, kid, alg string, wrapped, aad []byte) ([]byte, error) {
	switch alg {
	case "RSA-OAEP-256", "RSA-OAEP", "RSA1_5":
	default:
		return nil, fmt.Errorf("keys: key vault unwrap: algorithm %q is not an RSA key-wrap algorithm", alg)
	}
	r, err := k.ref(kid, true)
	if err != nil {
		return nil, fmt.Errorf("keys: key vault unwrap: %w", err)
	}
	return k.unwrap(ctx, r, kid, alg, wrapped)
}

func (k *KeyVault) unwrap(ctx context.Context, r keyRef, kid, alg string, wrapped []byte) ([]byte, error) {
	a := azkeys.EncryptionAlgorithm(alg)
	var resp azkeys.UnwrapKeyResponse
	err := k.call(ctx, "unwrapKey", kid, func(ctx context.Context) error {
		var err error
		resp, err = k.client.UnwrapKey(ctx, r.name, r.version, azkeys.KeyOperationParameters{Algorithm: &a, Value: wrapped}, nil)
		return err
	})
	if err != nil {
		return nil, err
	}
	if len(resp.Result) == 0 {
		return nil, &VaultError{Op: "unwrapKey", KeyID: kid, Err: errors.New("response has no value")}
	}
	return resp.Result, nil
}

// keyInfo is what a GET tells about one version.
type keyInfo struct {
	kid           string
	kty           string
	enabled       bool
	expires, nbf  time.Time
	recoveryLevel string
	pub           *rsa.PublicKey // nil unless kty is RSA or RSA-HSM
}

// get fetches a version (r.version "" for the latest).
func (k *KeyVault) get(ctx context.Context, op string, r keyRef) (keyInfo, error) {
	var resp azkeys.GetKeyResponse
	kid := r.String()
	err := k.call(ctx, op, kid, func(ctx context.Context) error {
		var err error
		resp, err = k.client.GetKey(ctx, r.name, r.version, nil)
		return err
	})
	if err != nil {
		return keyInfo{}, err
	}
	if resp.Key == nil || resp.Key.KID == nil {
		return keyInfo{}, &VaultError{Op: op, KeyID: kid, Err: errors.New("response has no key")}
	}
	info := keyInfo{kid: string(*resp.Key.KID), enabled: true} // Key Vault's default
	if resp.Key.Kty != nil {
		info.kty = string(*resp.Key.Kty)
	}
	if a := resp.Attributes; a != nil {
		if a.Enabled != nil {
			info.enabled = *a.Enabled
		}
		if a.Expires != nil {
			info.expires = *a.Expires
		}
		if a.NotBefore != nil {
			info.nbf = *a.NotBefore
		}
		if a.RecoveryLevel != nil {
			info.recoveryLevel = *a.RecoveryLevel
		}
	}
	if (info.kty == "RSA" || info.kty == "RSA-HSM") && len(resp.Key.N) > 0 && len(resp.Key.E) > 0 && len(resp.Key.E) <= 4 {
		e := new(big.Int).SetBytes(resp.Key.E)
		info.pub = &rsa.PublicKey{N: new(big.Int).SetBytes(resp.Key.N), E: int(e.Int64())}
		k.mu.Lock()
		k.pubs[strings.ToLower(info.kid)] = info.pub
		k.mu.Unlock()
	}
	return info, nil
}

// Status GETs the version kid and reports Enabled, Expires and NotBefore.
// Latest is the newest enabled version: from the version list when the
// identity may list, else the version the vault calls latest if it is
// enabled (a disk encryption set's identity usually has only get, wrapKey
// and unwrapKey). A failure to find Latest is not an error: Latest is then
// empty. An error means the GET of kid failed; see Classify.
func (k *KeyVault) Status(ctx context.Context, kid string) (KeyStatus, error) {
	r, err := k.ref(kid, true)
	if err != nil {
		return KeyStatus{}, fmt.Errorf("keys: key vault status: %w", err)
	}
	info, err := k.get(ctx, "get", r)
	if err != nil {
		return KeyStatus{}, err
	}
	st := KeyStatus{KeyID: kid, Enabled: info.enabled, Expires: info.expires, NotBefore: info.nbf}
	st.Latest, err = k.latest(ctx, r.name)
	if err != nil {
		k.log.Debug("latest key version unknown", "key", r.name, "err", err)
	}
	return st, nil
}

// latest returns the kid of the newest enabled version of the key name.
func (k *KeyVault) latest(ctx context.Context, name string) (string, error) {
	pager := k.client.NewListKeyPropertiesVersionsPager(name, nil)
	var best string
	var bestCreated time.Time
	for pager.More() {
		var page azkeys.ListKeyPropertiesVersionsResponse
		err := k.call(ctx, "versions", k.vaultURL+"/keys/"+name, func(ctx context.Context) error {
			var err error
			page, err = pager.NextPage(ctx)
			return err
		})
		if err != nil {
			var ve *VaultError
			if errors.As(err, &ve) && ve.Status == http.StatusForbidden {
				return k.latestByGet(ctx, name)
			}
			return "", err
		}
		for _, p := range page.Value {
			if p == nil || p.KID == nil || p.Attributes == nil || p.Attributes.Enabled == nil || !*p.Attributes.Enabled {
				continue
			}
			var created time.Time
			if p.Attributes.Created != nil {
				created = *p.Attributes.Created
			}
			// On equal creation times (one-second resolution) the later
			// entry in the listing wins.
			if best == "" || !created.Before(bestCreated) {
				best, bestCreated = string(*p.KID), created
			}
		}
	}
	return best, nil
}

func (k *KeyVault) latestByGet(ctx context.Context, name string) (string, error) {
	info, err := k.get(ctx, "getLatest", keyRef{host: k.host, name: name})
	if err != nil {
		return "", err
	}
	if !info.enabled {
		return "", nil
	}
	return info.kid, nil
}

// publicKey returns the cached public key of the versioned kid, fetching it
// with a GET if needed. A disabled version is an ErrKeyDisabled VaultError.
func (k *KeyVault) publicKey(ctx context.Context, r keyRef, kid string) (*rsa.PublicKey, error) {
	k.mu.Lock()
	pub := k.pubs[strings.ToLower(kid)]
	k.mu.Unlock()
	if pub != nil {
		return pub, nil
	}
	info, err := k.get(ctx, "get", r)
	if err != nil {
		return nil, err
	}
	if info.pub == nil {
		return nil, &VaultError{Op: "get", KeyID: kid, Err: fmt.Errorf("key type %q is not RSA", info.kty)}
	}
	return info.pub, nil
}

// Probe proves the identity can still unwrap with the version kid: it
// encrypts 32 random bytes locally with the version's public key
// (RSA-OAEP-256; the key is fetched once and cached) and unwraps them
// through the vault. Unlike a GET, it catches a removed unwrapKey
// permission. Errors are *VaultError; see Classify.
func (k *KeyVault) Probe(ctx context.Context, kid string) error {
	r, err := k.ref(kid, true)
	if err != nil {
		return fmt.Errorf("keys: key vault probe: %w", err)
	}
	pub, err := k.publicKey(ctx, r, kid)
	if err != nil {
		return err
	}
	want := make([]byte, 32)
	rand.Read(want)
	ct, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, want, nil)
	if err != nil {
		return &VaultError{Op: "probe", KeyID: kid, Err: err}
	}
	got, err := k.unwrap(ctx, r, kid, "RSA-OAEP-256", ct)
	if err != nil {
		return err
	}
	if !bytes.Equal(got, want) {
		return &VaultError{Op: "unwrapKey", KeyID: kid, Err: fmt.Errorf("probe: vault returned other bytes: %w", ErrUnwrap)}
	}
	return nil
}
