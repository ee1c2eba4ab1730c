package keys_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/cryptnbd/cryptnbd/keys"
	"github.com/cryptnbd/cryptnbd/keys/kvserver"
	"github.com/cryptnbd/cryptnbd/keys/kvserver/kvservertest"
)

// vault is a local Key Vault with an administrator client.
type vault struct {
	in    *kvservertest.Instance
	admin *azkeys.Client
}

func startVault(t *testing.T, purgeProtection bool) *vault {
	t.Helper()
	in := kvservertest.Start(t, kvserver.Options{PurgeProtection: purgeProtection})
	return &vault{in: in, admin: in.KeysClient(t, in.Credential(t, ""), nil)}
}

// createKey makes an RSA key and returns its versioned kid.
func (v *vault) createKey(t *testing.T, name string, bits int32) string {
	t.Helper()
	r, err := v.admin.CreateKey(context.Background(), name, azkeys.CreateKeyParameters{
		Kty: to.Ptr(azkeys.KeyTypeRSA), KeySize: to.Ptr(bits),
	}, nil)
	if err != nil {
		t.Fatalf("CreateKey %s: %v", name, err)
	}
	return string(*r.Key.KID)
}

func (v *vault) rotate(t *testing.T, name string) string {
	t.Helper()
	r, err := v.admin.RotateKey(context.Background(), name, nil)
	if err != nil {
		t.Fatalf("RotateKey %s: %v", name, err)
	}
	return string(*r.Key.KID)
}

func (v *vault) setEnabled(t *testing.T, kid string, enabled bool) {
	t.Helper()
	id := azkeys.ID(kid)
	_, err := v.admin.UpdateKey(context.Background(), id.Name(), id.Version(), azkeys.UpdateKeyParameters{
		KeyAttributes: &azkeys.KeyAttributes{Enabled: to.Ptr(enabled)},
	}, nil)
	if err != nil {
		t.Fatalf("UpdateKey %s enabled=%v: %v", kid, enabled, err)
	}
}

func (v *vault) setPolicy(t *testing.T, objectID string, perms ...string) {
	t.Helper()
	if err := v.in.Admin.SetPolicy(context.Background(), objectID, perms); err != nil {
		t.Fatalf("SetPolicy: %v", err)
	}
}

// desPermissions are what a disk encryption set's identity is granted.
var desPermissions = []string{"get", "wrapKey", "unwrapKey"}

// fastRetry keeps the SDK's retries of 429 and 5xx short in tests.
var fastRetry = policy.RetryOptions{MaxRetries: 1, RetryDelay: 5 * time.Millisecond, MaxRetryDelay: 20 * time.Millisecond}

// provider returns a KeyVault for keyURL as the principal objectID.
func (v *vault) provider(t *testing.T, keyURL, objectID string, mod ...func(*keys.KeyVaultOptions)) *keys.KeyVault {
	t.Helper()
	co := v.in.ClientOptions
	co.Retry = fastRetry
	o := keys.KeyVaultOptions{
		KeyURL:            keyURL,
		Credential:        v.in.Credential(t, objectID),
		ClientOptions:     co,
		AllowNonAzureHost: true,
	}
	for _, m := range mod {
		m(&o)
	}
	k, err := keys.NewKeyVault(o)
	if err != nil {
		t.Fatalf("NewKeyVault: %v", err)
	}
	return k
}

// vaultErr returns err as a *keys.VaultError or fails the test.
func vaultErr(t *testing.T, err error) *keys.VaultError {
	t.Helper()
	var ve *keys.VaultError
	if !errors.As(err, &ve) {
		t.Fatalf("error %v (%T) is not a *keys.VaultError", err, err)
	}
	return ve
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func TestNewKeyVaultValidatesURL(t *testing.T) {
	cred := &staticCredential{}
	for _, tc := range []struct {
		url string
		ok  bool
	}{
		{"https://myvault.vault.azure.net/keys/disk-kek", true},
		{"https://myvault.vault.azure.net/keys/disk-kek/", true},
		{"https://myvault.vault.azure.net/keys/disk-kek/0123456789abcdef0123456789ABCDEF", true},
		{"https://127.0.0.1:8443/keys/k1", true},
		{"http://myvault.vault.azure.net/keys/disk-kek", false},
		{"https://myvault.vault.azure.net/secrets/disk-kek", false},
		{"https://myvault.vault.azure.net/keys/", false},
		{"https://myvault.vault.azure.net/keys/disk_kek", false},
		{"https://myvault.vault.azure.net/keys/disk-kek/123", false},
		{"https://myvault.vault.azure.net/keys/disk-kek/0123456789abcdef0123456789abcdef/x", false},
		{"https://myvault.vault.azure.net/keys/disk-kek?x=1", false},
		{"https:///keys/disk-kek", false},
		{"not a url", false},
	} {
		_, err := keys.NewKeyVault(keys.KeyVaultOptions{KeyURL: tc.url, Credential: cred})
		if (err == nil) != tc.ok {
			t.Errorf("NewKeyVault(%q) error %v, want ok=%v", tc.url, err, tc.ok)
		}
	}
	if _, err := keys.NewKeyVault(keys.KeyVaultOptions{KeyURL: "https://v.vault.azure.net/keys/k", Credential: cred, WrapAlgorithm: "RSA1_5"}); err == nil {
		t.Errorf("NewKeyVault accepted RSA1_5 for new wraps")
	}
	if _, err := keys.NewKeyVault(keys.KeyVaultOptions{KeyURL: "https://v.vault.azure.net/keys/k"}); err == nil {
		t.Errorf("NewKeyVault accepted a nil credential")
	}
	k, err := keys.NewKeyVault(keys.KeyVaultOptions{KeyURL: "https://V.vault.azure.net/keys/k/", Credential: cred})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := k.KeyURL(), "https://v.vault.azure.net/keys/k"; got != want {
		t.Errorf("KeyURL() = %q, want %q", got, want)
	}
	if got, want := k.Current(), ""; got != want {
		t.Errorf("Current() = %q, want %q", got, want)
	}
	if k.Name() != keys.KeyVaultName {
		t.Errorf("Name() = %q, want %q", k.Name(), keys.KeyVaultName)
	}
}

// staticCredential hands out a fixed token.
type staticCredential struct{}

func (staticCredential) GetToken(context.Context, policy.TokenRequestOptions) (azcore.AccessToken, error) {
	return azcore.AccessToken{Token: "t", ExpiresOn: time.Now().Add(time.Hour)}, nil
}

func TestKeyVaultRoundTrip(t *testing.T) {
	t.Parallel()
	v := startVault(t, true)
	des := v.in.NewPrincipal(t, "des", desPermissions...)
	sizes := []int32{2048, 3072}
	if !testing.Short() {
		sizes = append(sizes, 4096)
	}
	for _, bits := range sizes {
		t.Run(big.NewInt(int64(bits)).String(), func(t *testing.T) {
			name := "kek-" + big.NewInt(int64(bits)).String()
			kid := v.createKey(t, name, bits)
			ctx := context.Background()
			k := v.provider(t, v.in.URL+"/keys/"+name, des.ObjectID)
			secret := randBytes(32)
			gotKID, alg, wrapped, err := k.Wrap(ctx, secret, []byte("disk-1"))
			if err != nil {
				t.Fatalf("Wrap: %v", err)
			}
			if gotKID != kid || alg != "RSA-OAEP-256" || len(wrapped) != int(bits)/8 {
				t.Errorf("Wrap = kid %s, alg %s, %d bytes; want %s, RSA-OAEP-256, %d bytes", gotKID, alg, len(wrapped), kid, bits/8)
			}
			got, err := k.Unwrap(ctx, gotKID, alg, wrapped, []byte("ignored"))
			if err != nil {
				t.Fatalf("Unwrap: %v", err)
			}
			if !bytes.Equal(got, secret) {
				t.Errorf("Unwrap returned other bytes")
			}

			// A wrap made elsewhere with RSA-OAEP (SHA-1), e.g. by an older
			// client, still opens.
			st, err := k.Status(ctx, kid)
			if err != nil || !st.Enabled || st.KeyID != kid {
				t.Fatalf("Status = %+v, %v", st, err)
			}
			pub := publicKey(t, v, kid)
			ct, err := rsa.EncryptOAEP(sha1.New(), rand.Reader, pub, secret, nil)
			if err != nil {
				t.Fatal(err)
			}
			if got, err := k.Unwrap(ctx, kid, "RSA-OAEP", ct, nil); err != nil || !bytes.Equal(got, secret) {
				t.Errorf("Unwrap RSA-OAEP: %v (equal %v)", err, bytes.Equal(got, secret))
			}
			if err := k.Probe(ctx, kid); err != nil {
				t.Errorf("Probe: %v", err)
			}
		})
	}
}

func publicKey(t *testing.T, v *vault, kid string) *rsa.PublicKey {
	t.Helper()
	id := azkeys.ID(kid)
	r, err := v.admin.GetKey(context.Background(), id.Name(), id.Version(), nil)
	if err != nil {
		t.Fatalf("GetKey: %v", err)
	}
	return &rsa.PublicKey{N: new(big.Int).SetBytes(r.Key.N), E: int(new(big.Int).SetBytes(r.Key.E).Int64())}
}

func TestKeyVaultAlgorithmsAndErrors(t *testing.T) {
	t.Parallel()
	v := startVault(t, true)
	des := v.in.NewPrincipal(t, "des", desPermissions...)
	kid := v.createKey(t, "kek", 2048)
	ctx := context.Background()
	secret := randBytes(32)

	oaep := v.provider(t, kid, des.ObjectID, func(o *keys.KeyVaultOptions) { o.WrapAlgorithm = "RSA-OAEP" })
	if oaep.Current() != kid {
		t.Errorf("Current() = %s, want the versioned key URL %s", oaep.Current(), kid)
	}
	gotKID, alg, wrapped, err := oaep.Wrap(ctx, secret, nil)
	if err != nil || gotKID != kid || alg != "RSA-OAEP" {
		t.Fatalf("Wrap RSA-OAEP = %s, %s, %v", gotKID, alg, err)
	}
	k := v.provider(t, v.in.URL+"/keys/kek", des.ObjectID)
	if got, err := k.Unwrap(ctx, kid, "RSA-OAEP", wrapped, nil); err != nil || !bytes.Equal(got, secret) {
		t.Errorf("Unwrap RSA-OAEP: %v", err)
	}
	// RSA1_5 is accepted on unwrap for old wraps.
	ct, err := rsa.EncryptPKCS1v15(rand.Reader, publicKey(t, v, kid), secret)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := k.Unwrap(ctx, kid, "RSA1_5", ct, nil); err != nil || !bytes.Equal(got, secret) {
		t.Errorf("Unwrap RSA1_5: %v", err)
	}

	t.Run("tampered", func(t *testing.T) {
		bad := bytes.Clone(wrapped)
		bad[10] ^= 1
		_, err := k.Unwrap(ctx, kid, "RSA-OAEP", bad, nil)
		if !errors.Is(err, keys.ErrUnwrap) || keys.Classify(err) != keys.ClassOther {
			t.Errorf("Unwrap tampered: %v (class %v), want ErrUnwrap, ClassOther", err, keys.Classify(err))
		}
	})
	t.Run("refused", func(t *testing.T) {
		// wrapped is RSA-OAEP, so each of these would unwrap if it reached
		// the vault: the provider must refuse them before asking it.
		for _, tc := range []struct{ kid, alg string }{
			{kid, "A256GCM"},
			{v.in.URL + "/keys/kek", "RSA-OAEP"}, // no version
			{"https://other.example/keys/kek/" + versionOf(kid), "RSA-OAEP"}, // other vault
		} {
			_, err := k.Unwrap(ctx, tc.kid, tc.alg, wrapped, nil)
			var ve *keys.VaultError
			if err == nil || errors.As(err, &ve) {
				t.Errorf("Unwrap(%s, %s) = %v, want a refusal before any request", tc.kid, tc.alg, err)
			}
		}
	})
	t.Run("SetCurrent", func(t *testing.T) {
		kid2 := v.rotate(t, "kek")
		k := v.provider(t, v.in.URL+"/keys/kek", des.ObjectID)
		if got, _, _, err := k.Wrap(ctx, secret, nil); err != nil || got != kid2 {
			t.Errorf("Wrap following latest = %s, %v; want %s", got, err, kid2)
		}
		k.SetCurrent(kid)
		if k.Current() != kid {
			t.Errorf("Current() = %s, want %s", k.Current(), kid)
		}
		if got, _, _, err := k.Wrap(ctx, secret, nil); err != nil || got != kid {
			t.Errorf("Wrap after SetCurrent = %s, %v; want %s", got, err, kid)
		}
		k.SetCurrent("https://elsewhere.example/keys/kek/" + versionOf(kid))
		if _, _, _, err := k.Wrap(ctx, secret, nil); err == nil {
			t.Errorf("Wrap under a key of another vault succeeded")
		}
	})
}

// TestKeyVaultManagedIdentity uses azidentity's ManagedIdentityCredential,
// the production credential path; it sets the environment, so it is not
// parallel.
func TestKeyVaultManagedIdentity(t *testing.T) {
	v := startVault(t, true)
	des := v.in.NewPrincipal(t, "des", desPermissions...)
	kid := v.createKey(t, "kek", 2048)
	co := v.in.ClientOptions
	k, err := keys.NewKeyVault(keys.KeyVaultOptions{
		KeyURL: kid, Credential: v.in.ManagedIdentityCredential(t, des.ObjectID), ClientOptions: co, AllowNonAzureHost: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	secret := randBytes(32)
	gotKID, alg, wrapped, err := k.Wrap(ctx, secret, nil)
	if err != nil || gotKID != kid {
		t.Fatalf("Wrap = %s, %v", gotKID, err)
	}
	if got, err := k.Unwrap(ctx, gotKID, alg, wrapped, nil); err != nil || !bytes.Equal(got, secret) {
		t.Errorf("Unwrap: %v", err)
	}
}

func TestKeyVaultStatusLatest(t *testing.T) {
	t.Parallel()
	v := startVault(t, true)
	des := v.in.NewPrincipal(t, "des", desPermissions...)
	lister := v.in.NewPrincipal(t, "lister", "get", "list", "wrapKey", "unwrapKey")
	v1 := v.createKey(t, "kek", 2048)
	ctx := context.Background()
	exp := time.Now().Add(48 * time.Hour).Truncate(time.Second)
	id := azkeys.ID(v1)
	if _, err := v.admin.UpdateKey(ctx, id.Name(), id.Version(), azkeys.UpdateKeyParameters{
		KeyAttributes: &azkeys.KeyAttributes{Expires: &exp},
	}, nil); err != nil {
		t.Fatal(err)
	}
	v2 := v.rotate(t, "kek")
	// The DES identity cannot list versions and falls back to the latest
	// version; one that may list finds the newest enabled one.
	for _, tc := range []struct {
		who        string
		objectID   string
		disabledV2 string // Latest once v2 is disabled
	}{
		{"des", des.ObjectID, ""},
		{"lister", lister.ObjectID, v1},
	} {
		k := v.provider(t, v.in.URL+"/keys/kek", tc.objectID)
		st, err := k.Status(ctx, v1)
		if err != nil {
			t.Fatalf("%s: Status: %v", tc.who, err)
		}
		if st.KeyID != v1 || !st.Enabled || !st.Expires.Equal(exp) || st.Latest != v2 {
			t.Errorf("%s: Status = %+v, want enabled, expires %v, latest %s", tc.who, st, exp, v2)
		}
	}
	v.setEnabled(t, v2, false)
	for _, tc := range []struct {
		who, objectID, want string
	}{{"des", des.ObjectID, ""}, {"lister", lister.ObjectID, v1}} {
		k := v.provider(t, v.in.URL+"/keys/kek", tc.objectID)
		st, err := k.Status(ctx, v2)
		if err != nil {
			t.Fatalf("%s: Status: %v", tc.who, err)
		}
		if st.Enabled || st.Latest != tc.want {
			t.Errorf("%s: Status(disabled v2) = %+v, want disabled, latest %q", tc.who, st, tc.want)
		}
	}
}

func TestKeyVaultProbeUnwrapRemoved(t *testing.T) {
	t.Parallel()
	v := startVault(t, true)
	des := v.in.NewPrincipal(t, "des", desPermissions...)
	kid := v.createKey(t, "kek", 2048)
	ctx := context.Background()
	k := v.provider(t, kid, des.ObjectID)
	if err := k.Probe(ctx, kid); err != nil {
		t.Fatalf("Probe: %v", err)
	}
	v.setPolicy(t, des.ObjectID, "get", "wrapKey")
	if st, err := k.Status(ctx, kid); err != nil || !st.Enabled {
		t.Fatalf("Status after removing unwrapKey = %+v, %v; GET should still work", st, err)
	}
	err := k.Probe(ctx, kid)
	ve := vaultErr(t, err)
	if keys.Classify(err) != keys.ClassRevoked || !errors.Is(err, keys.ErrRevoked) || ve.Status != 403 || ve.InnerCode != "AccessDenied" || ve.Op != "unwrapKey" {
		t.Errorf("Probe = %v (class %v, %+v), want revoked 403 AccessDenied on unwrapKey", err, keys.Classify(err), *ve)
	}
	if got, want := err.Error(), "keyvault: unwrapKey "+kid+": 403 Forbidden/AccessDenied"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

func TestClassifyVault(t *testing.T) {
	t.Parallel()
	v := startVault(t, true)
	des := v.in.NewPrincipal(t, "des", desPermissions...)
	nobody := v.in.NewPrincipal(t, "nobody")
	kid := v.createKey(t, "kek", 2048)
	ctx := context.Background()
	k := v.provider(t, kid, des.ObjectID)
	_, alg, wrapped, err := k.Wrap(ctx, randBytes(32), nil)
	if err != nil {
		t.Fatal(err)
	}
	unwrap := func(k *keys.KeyVault) error { _, err := k.Unwrap(ctx, kid, alg, wrapped, nil); return err }

	type want struct {
		class     keys.Class
		status    int
		code      string
		inner     string
		sentinels []error
	}
	check := func(t *testing.T, err error, w want) *keys.VaultError {
		t.Helper()
		if got := keys.Classify(err); got != w.class {
			t.Errorf("Classify(%v) = %v, want %v", err, got, w.class)
		}
		ve := vaultErr(t, err)
		if ve.Status != w.status || ve.Code != w.code || ve.InnerCode != w.inner {
			t.Errorf("VaultError %d %s/%s, want %d %s/%s", ve.Status, ve.Code, ve.InnerCode, w.status, w.code, w.inner)
		}
		if errors.Is(err, keys.ErrRevoked) != (w.class == keys.ClassRevoked) {
			t.Errorf("errors.Is(%v, ErrRevoked) = %v", err, !(w.class == keys.ClassRevoked))
		}
		for _, s := range w.sentinels {
			if !errors.Is(err, s) {
				t.Errorf("errors.Is(%v, %v) = false", err, s)
			}
		}
		return ve
	}

	t.Run("disabled version", func(t *testing.T) {
		v.setEnabled(t, kid, false)
		defer v.setEnabled(t, kid, true)
		check(t, unwrap(k), want{keys.ClassRevoked, 403, "Forbidden", "KeyDisabled", []error{keys.ErrKeyDisabled}})
		// The GET says enabled: false, which the provider reports as status.
		st, err := k.Status(ctx, kid)
		if err != nil || st.Enabled {
			t.Errorf("Status of disabled version = %+v, %v", st, err)
		}
	})
	t.Run("missing permission", func(t *testing.T) {
		check(t, unwrap(v.provider(t, kid, nobody.ObjectID)), want{keys.ClassRevoked, 403, "Forbidden", "AccessDenied", nil})
	})
	t.Run("throttled", func(t *testing.T) {
		if err := v.in.Admin.Throttle(ctx, 10, 1, 5); err != nil {
			t.Fatal(err)
		}
		defer v.in.Admin.Throttle(ctx, 0, 0, 0)
		ve := check(t, unwrap(k), want{keys.ClassTransient, 429, "Throttled", "", nil})
		if ve.RetryAfter != 5*time.Millisecond {
			t.Errorf("RetryAfter = %v, want 5ms (x-ms-retry-after-ms)", ve.RetryAfter)
		}
	})
	t.Run("outage", func(t *testing.T) {
		if err := v.in.Admin.SetOutage(ctx, true); err != nil {
			t.Fatal(err)
		}
		defer v.in.Admin.SetOutage(ctx, false)
		check(t, unwrap(k), want{keys.ClassTransient, 503, "ServiceUnavailable", "", nil})
	})
	t.Run("token failure", func(t *testing.T) {
		// A principal the token endpoint does not know gets no token.
		err := unwrap(v.provider(t, kid, "00000000-0000-0000-0000-0000000000aa"))
		check(t, err, want{keys.ClassTransient, 0, "", "", nil})
	})
	t.Run("timeout", func(t *testing.T) {
		slow := v.provider(t, kid, des.ObjectID, func(o *keys.KeyVaultOptions) { o.CallTimeout = time.Nanosecond })
		check(t, unwrap(slow), want{keys.ClassTransient, 0, "", "", []error{context.DeadlineExceeded}})
	})
	t.Run("untrusted certificate", func(t *testing.T) {
		plain := v.provider(t, kid, des.ObjectID, func(o *keys.KeyVaultOptions) { o.ClientOptions = azcore.ClientOptions{Retry: fastRetry} })
		check(t, unwrap(plain), want{keys.ClassOther, 0, "", "", nil})
	})
	t.Run("non-Azure host not allowed", func(t *testing.T) {
		strict := v.provider(t, kid, des.ObjectID, func(o *keys.KeyVaultOptions) { o.AllowNonAzureHost = false })
		err := unwrap(strict)
		check(t, err, want{keys.ClassOther, 0, "", "", nil})
		if !strings.Contains(err.Error(), "configure it as an allowed non-Azure host") {
			t.Errorf("error %q lacks the hint to allow the host", err)
		}
	})
	t.Run("deleted key", func(t *testing.T) {
		if _, err := v.admin.DeleteKey(ctx, "kek", nil); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if _, err := v.admin.RecoverDeletedKey(ctx, "kek", nil); err != nil {
				t.Fatal(err)
			}
		}()
		check(t, unwrap(k), want{keys.ClassRevoked, 404, "KeyNotFound", "", []error{keys.ErrKeyNotFound}})
		_, err := k.Status(ctx, kid)
		check(t, err, want{keys.ClassRevoked, 404, "KeyNotFound", "", []error{keys.ErrKeyNotFound}})
	})
	t.Run("server stopped", func(t *testing.T) {
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if err := v.in.Server.Shutdown(sctx); err != nil {
			t.Fatal(err)
		}
		check(t, unwrap(k), want{keys.ClassTransient, 0, "", "", nil})
		v.in.Restart(t)
		if err := unwrap(k); err != nil {
			t.Errorf("unwrap after restart: %v", err)
		}
	})
}

// TestKeyVaultPanicGuard drives the SDK into its panic on a challenge whose
// authorization URL has too few parts, and checks it becomes an error.
func TestKeyVaultPanicGuard(t *testing.T) {
	t.Parallel()
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("WWW-Authenticate", `Bearer authorization="x" resource="https://vault.azure.net"`)
		w.WriteHeader(http.StatusUnauthorized)
	}))
	defer srv.Close()
	var mu sync.Mutex
	var observed []int
	k, err := keys.NewKeyVault(keys.KeyVaultOptions{
		KeyURL: srv.URL + "/keys/kek/0123456789abcdef0123456789abcdef", Credential: staticCredential{},
		ClientOptions: azcore.ClientOptions{Transport: srv.Client()}, AllowNonAzureHost: true,
		Observe: func(op string, status int, d time.Duration) {
			mu.Lock()
			defer mu.Unlock()
			observed = append(observed, status)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	_, _, _, err = k.Wrap(context.Background(), randBytes(32), nil)
	if err == nil {
		t.Fatal("Wrap succeeded against a malformed challenge")
	}
	if keys.Classify(err) != keys.ClassOther || !strings.Contains(err.Error(), "panicked") {
		t.Errorf("Wrap = %v (class %v), want a ClassOther panic error", err, keys.Classify(err))
	}
	mu.Lock()
	defer mu.Unlock()
	if len(observed) != 1 || observed[0] != 0 {
		t.Errorf("Observe saw statuses %v, want [0]", observed)
	}
}

func versionOf(kid string) string {
	id := azkeys.ID(kid)
	return id.Version()
}

func TestValidate(t *testing.T) {
	t.Parallel()
	v := startVault(t, true)
	des := v.in.NewPrincipal(t, "des", desPermissions...)
	noUnwrap := v.in.NewPrincipal(t, "no-unwrap", "get", "wrapKey")
	nothing := v.in.NewPrincipal(t, "nothing")
	kid := v.createKey(t, "kek", 2048)
	ctx := context.Background()
	keyURL := v.in.URL + "/keys/kek"

	got, err := v.provider(t, keyURL, des.ObjectID).Validate(ctx, des.ObjectID)
	if err != nil {
		t.Fatalf("Validate: %v", err)
	}
	want := keys.Validation{KeyID: kid, KeyType: "RSA", RecoveryLevel: "Recoverable", CanGet: true, CanWrap: true, CanUnwrap: true}
	if *got != want {
		t.Errorf("Validate = %+v, want %+v", *got, want)
	}
	if g, w, u := v.provider(t, keyURL, noUnwrap.ObjectID).AccessStatus(ctx); !g || !w || u {
		t.Errorf("AccessStatus without unwrapKey = %v %v %v, want true true false", g, w, u)
	}

	cmd := func(oid string) string {
		return "run cryptnbd keyvault set-policy --vault-url " + v.in.URL + " --object-id " + oid + " --key-permissions get wrapKey unwrapKey"
	}
	for _, tc := range []struct {
		name     string
		objectID string
		want     keys.Validation
		msg      string
	}{
		{"no unwrapKey", noUnwrap.ObjectID,
			keys.Validation{KeyID: kid, KeyType: "RSA", RecoveryLevel: "Recoverable", CanGet: true, CanWrap: true},
			"keys: key vault " + keyURL + ": identity " + noUnwrap.ObjectID + " lacks key permission unwrapKey: " + cmd(noUnwrap.ObjectID)},
		{"no permissions", nothing.ObjectID,
			keys.Validation{},
			"keys: key vault " + keyURL + ": identity " + nothing.ObjectID + " lacks key permission get, wrapKey: " + cmd(nothing.ObjectID)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := v.provider(t, keyURL, tc.objectID).Validate(ctx, tc.objectID)
			if err == nil || err.Error() != tc.msg {
				t.Errorf("Validate error\n got %v\nwant %s", err, tc.msg)
			}
			if *got != tc.want {
				t.Errorf("Validate = %+v, want %+v", *got, tc.want)
			}
		})
	}
	t.Run("unknown object id", func(t *testing.T) {
		_, err := v.provider(t, keyURL, nothing.ObjectID).Validate(ctx, "")
		if err == nil || !strings.Contains(err.Error(), cmd("<OBJECT_ID>")) {
			t.Errorf("Validate error %v lacks %q", err, cmd("<OBJECT_ID>"))
		}
	})
	t.Run("disabled key", func(t *testing.T) {
		v.setEnabled(t, kid, false)
		defer v.setEnabled(t, kid, true)
		_, err := v.provider(t, keyURL, des.ObjectID).Validate(ctx, des.ObjectID)
		msg := "keys: key vault " + keyURL + ": key version " + kid + " is disabled: enable it (az keyvault key set-attributes --id " + kid + " --enabled true)"
		if err == nil || err.Error() != msg {
			t.Errorf("Validate error\n got %v\nwant %s", err, msg)
		}
	})
	t.Run("missing key", func(t *testing.T) {
		_, err := v.provider(t, v.in.URL+"/keys/nope", des.ObjectID).Validate(ctx, des.ObjectID)
		msg := "keys: key vault " + v.in.URL + ": key " + v.in.URL + "/keys/nope does not exist: create it, recover it if it was deleted (az keyvault key recover), or fix the key URL"
		if err == nil || err.Error() != msg {
			t.Errorf("Validate error\n got %v\nwant %s", err, msg)
		}
	})
	t.Run("outage", func(t *testing.T) {
		if err := v.in.Admin.SetOutage(ctx, true); err != nil {
			t.Fatal(err)
		}
		defer v.in.Admin.SetOutage(ctx, false)
		_, err := v.provider(t, keyURL, des.ObjectID).Validate(ctx, des.ObjectID)
		if keys.Classify(err) != keys.ClassTransient {
			t.Errorf("Validate during outage = %v, want a transient error", err)
		}
	})
}

func TestValidateNoPurgeProtection(t *testing.T) {
	t.Parallel()
	v := startVault(t, false)
	des := v.in.NewPrincipal(t, "des", desPermissions...)
	kid := v.createKey(t, "kek", 2048)
	got, err := v.provider(t, kid, des.ObjectID).Validate(context.Background(), des.ObjectID)
	msg := "keys: key vault " + kid + ": vault " + v.in.URL + ` has no purge protection (recoveryLevel "Recoverable+Purgeable"): ` +
		"disk encryption needs purge protection enabled: az keyvault update --name <VAULT_NAME> --enable-purge-protection true, " +
		"or for the local server cryptnbd keyvault serve --purge-protection=true"
	if err == nil || err.Error() != msg {
		t.Errorf("Validate error\n got %v\nwant %s", err, msg)
	}
	if got.RecoveryLevel != "Recoverable+Purgeable" || !got.CanUnwrap {
		t.Errorf("Validate = %+v", *got)
	}
}

func TestKeyVaultObserve(t *testing.T) {
	t.Parallel()
	v := startVault(t, true)
	des := v.in.NewPrincipal(t, "des", desPermissions...)
	kid := v.createKey(t, "kek", 2048)
	type obs struct {
		op     string
		status int
	}
	var mu sync.Mutex
	var got []obs
	k := v.provider(t, v.in.URL+"/keys/kek", des.ObjectID, func(o *keys.KeyVaultOptions) {
		o.Observe = func(op string, status int, d time.Duration) {
			mu.Lock()
			defer mu.Unlock()
			got = append(got, obs{op, status})
		}
	})
	ctx := context.Background()
	_, alg, wrapped, err := k.Wrap(ctx, randBytes(32), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := k.Unwrap(ctx, kid, alg, wrapped, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := k.Status(ctx, kid); err != nil {
		t.Fatal(err)
	}
	if err := v.in.Admin.SetOutage(ctx, true); err != nil {
		t.Fatal(err)
	}
	k.Unwrap(ctx, kid, alg, wrapped, nil)
	if err := v.in.Admin.SetOutage(ctx, false); err != nil {
		t.Fatal(err)
	}
	// The DES identity may not list versions (403) and falls back to a
	// GET of the latest version.
	want := []obs{{"wrapKey", 200}, {"unwrapKey", 200}, {"get", 200}, {"versions", 403}, {"getLatest", 200}, {"unwrapKey", 503}}
	mu.Lock()
	defer mu.Unlock()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("Observe saw %v, want %v", got, want)
	}
}

// BenchmarkKeyVaultUnwrap measures one unwrapKey through azkeys over HTTPS
// to the local server (RSA-2048, RSA-OAEP-256), connection reused.
func BenchmarkKeyVaultUnwrap(b *testing.B) {
	in := kvservertest.Start(b, kvserver.Options{PurgeProtection: true})
	admin := in.KeysClient(b, in.Credential(b, ""), nil)
	r, err := admin.CreateKey(context.Background(), "kek", azkeys.CreateKeyParameters{Kty: to.Ptr(azkeys.KeyTypeRSA), KeySize: to.Ptr[int32](2048)}, nil)
	if err != nil {
		b.Fatal(err)
	}
	kid := string(*r.Key.KID)
	des := in.NewPrincipal(b, "des", desPermissions...)
	k, err := keys.NewKeyVault(keys.KeyVaultOptions{KeyURL: kid, Credential: in.Credential(b, des.ObjectID), ClientOptions: in.ClientOptions, AllowNonAzureHost: true})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	_, alg, wrapped, err := k.Wrap(ctx, randBytes(32), nil)
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := k.Unwrap(ctx, kid, alg, wrapped, nil); err != nil {
			b.Fatal(err)
		}
	}
}
