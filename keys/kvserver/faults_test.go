package kvserver_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/cryptnbd/cryptnbd/keys/kvserver"
	"github.com/cryptnbd/cryptnbd/keys/kvserver/kvservertest"
)

func httpClient(in *kvservertest.Instance) *http.Client {
	return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: in.CAPool}}}
}

func createKey(t *testing.T, c *azkeys.Client, name string, kty azkeys.KeyType, bits int32) azkeys.CreateKeyResponse {
	t.Helper()
	r, err := c.CreateKey(ctxT(t), name, azkeys.CreateKeyParameters{Kty: to.Ptr(kty), KeySize: to.Ptr(bits)}, nil)
	if err != nil {
		t.Fatalf("CreateKey %s: %v", name, err)
	}
	return r
}

// TestChallengeAndTLS checks the raw 401 challenge, bad tokens, and that
// plain HTTP is refused.
func TestChallengeAndTLS(t *testing.T) {
	t.Parallel()
	in := kvservertest.Start(t, kvserver.Options{})
	other := kvservertest.Start(t, kvserver.Options{})
	foreign, err := other.Credential(t, "").GetToken(ctxT(t), policy.TokenRequestOptions{Scopes: []string{kvserver.Resource + "/.default"}})
	if err != nil {
		t.Fatal(err)
	}
	hc := httpClient(in)
	for _, tc := range []struct{ name, auth string }{
		{"no token", ""},
		{"garbage token", "Bearer abc.def.ghi"},
		{"other vault's token", "Bearer " + foreign.Token},
		{"basic auth", "Basic dXNlcjpwYXNz"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(http.MethodGet, in.URL+"/keys/k/?api-version=2025-07-01", nil)
			if tc.auth != "" {
				req.Header.Set("Authorization", tc.auth)
			}
			resp, err := hc.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			want := `Bearer authorization="https://login.microsoftonline.com/` + in.Config.TenantID + `", resource="https://vault.azure.net"`
			if resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") != want {
				t.Errorf("got %d %q, want 401 %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"), want)
			}
			var body struct{ Error struct{ Code string } }
			if err := json.NewDecoder(resp.Body).Decode(&body); err != nil || body.Error.Code != "Unauthorized" {
				t.Errorf("body code %q, %v", body.Error.Code, err)
			}
		})
	}
	u, _ := url.Parse(in.URL)
	resp, err := http.Get("http://" + u.Host + "/keys/k/?api-version=2025-07-01")
	if err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusUnauthorized {
			t.Errorf("plain HTTP answered %d", resp.StatusCode)
		}
	}
}

// TestTokenEndpoint checks the App Service token protocol directly.
func TestTokenEndpoint(t *testing.T) {
	t.Parallel()
	in := kvservertest.Start(t, kvserver.Options{})
	p := in.NewPrincipal(t, "des", "get")
	hc := httpClient(in)
	get := func(header string, q url.Values) (*http.Response, map[string]any) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, in.Config.IdentityEndpoint+"?"+q.Encode(), nil)
		req.Header.Set("X-IDENTITY-HEADER", header)
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var body map[string]any
		json.NewDecoder(resp.Body).Decode(&body)
		return resp, body
	}
	q := func(kv ...string) url.Values {
		v := url.Values{"api-version": {"2019-08-01"}, "resource": {"https://vault.azure.net"}}
		for i := 0; i < len(kv); i += 2 {
			v.Set(kv[i], kv[i+1])
		}
		return v
	}
	h := in.Config.IdentityHeader
	for _, tc := range []struct {
		name       string
		header     string
		query      url.Values
		wantStatus int
		wantClient string
	}{
		{"admin by default", h, q(), 200, in.Config.AdminClientID},
		{"by client_id", h, q("client_id", p.ClientID), 200, p.ClientID},
		{"by object_id", h, q("object_id", p.ObjectID), 200, p.ClientID},
		{"by principal_id", h, q("principal_id", p.ObjectID), 200, p.ClientID},
		{"trailing slash resource", h, q("resource", "https://vault.azure.net/", "object_id", p.ObjectID), 200, p.ClientID},
		{"wrong header", "nope", q(), 401, ""},
		{"no header", "", q(), 401, ""},
		{"wrong api-version", h, q("api-version", "2018-02-01"), 400, ""},
		{"other resource", h, q("resource", "https://storage.azure.com"), 400, ""},
		{"unknown identity", h, q("object_id", "00000000-0000-0000-0000-000000000000"), 400, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := get(tc.header, tc.query)
			if resp.StatusCode != tc.wantStatus {
				t.Fatalf("status %d, want %d (%v)", resp.StatusCode, tc.wantStatus, body)
			}
			if tc.wantStatus != 200 {
				return
			}
			exp, err := strconv.ParseInt(body["expires_on"].(string), 10, 64)
			if err != nil || time.Until(time.Unix(exp, 0)) < time.Hour {
				t.Errorf("expires_on %v", body["expires_on"])
			}
			if body["token_type"] != "Bearer" || body["resource"] != "https://vault.azure.net" || body["client_id"] != tc.wantClient || body["access_token"] == "" {
				t.Errorf("body %v", body)
			}
		})
	}
}

// TestThrottleAndOutage drives the 429 and 503 switches through azkeys.
func TestThrottleAndOutage(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t)
	in := kvservertest.Start(t, kvserver.Options{})
	rec := &recorder{base: in.ClientOptions.Transport}
	o := azkeys.ClientOptions{}
	o.Transport = rec
	c := in.KeysClient(t, in.Credential(t, ""), &o)
	createKey(t, c, "k", azkeys.KeyTypeRSA, 2048)

	// Two 429s: the SDK honours x-ms-retry-after-ms and succeeds on the third try.
	if err := in.Admin.Throttle(ctx, 2, 1, 10); err != nil {
		t.Fatal(err)
	}
	rec.reset()
	if _, err := c.GetKey(ctx, "k", "", nil); err != nil {
		t.Errorf("GetKey after two 429s: %v", err)
	}
	if got := rec.statuses(); !slices.Equal(got, []int{429, 429, 200}) {
		t.Errorf("statuses %v, want [429 429 200]", got)
	}

	// More 429s than the SDK's three retries: the error reaches the caller.
	if err := in.Admin.Throttle(ctx, 10, 1, 10); err != nil {
		t.Fatal(err)
	}
	rec.reset()
	_, err := c.GetKey(ctx, "k", "", nil)
	if err == nil {
		t.Fatalf("GetKey while throttled succeeded")
	}
	if got := errorOf(t, err); got != (vaultError{429, "Throttled", ""}) {
		t.Errorf("got %+v", got)
	}
	if got := rec.statuses(); !slices.Equal(got, []int{429, 429, 429, 429}) {
		t.Errorf("statuses %v, want four 429s", got)
	}
	if err := in.Admin.Throttle(ctx, 0, 0, 0); err != nil {
		t.Fatal(err)
	}

	// Retry-After alone (seconds) is what Key Vault sends.
	hc := httpClient(in)
	if err := in.Admin.Throttle(ctx, 1, 2, 0); err != nil {
		t.Fatal(err)
	}
	tok, _ := in.Credential(t, "").GetToken(ctx, policy.TokenRequestOptions{Scopes: []string{kvserver.Resource + "/.default"}})
	req, _ := http.NewRequest(http.MethodGet, in.URL+"/keys/k/?api-version=2025-07-01", nil)
	req.Header.Set("Authorization", "Bearer "+tok.Token)
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 429 || resp.Header.Get("Retry-After") != "2" {
		t.Errorf("raw throttled response %d Retry-After %q", resp.StatusCode, resp.Header.Get("Retry-After"))
	}

	// Outage: 503 until switched off.
	noRetry := azkeys.ClientOptions{}
	noRetry.Retry.MaxRetries = -1
	nc := in.KeysClient(t, in.Credential(t, ""), &noRetry)
	if err := in.Admin.SetOutage(ctx, true); err != nil {
		t.Fatal(err)
	}
	if _, err := nc.GetKey(ctx, "k", "", nil); err == nil {
		t.Errorf("GetKey during outage succeeded")
	} else if got := errorOf(t, err); got != (vaultError{503, "ServiceUnavailable", ""}) {
		t.Errorf("outage: got %+v", got)
	}
	if err := in.Admin.SetOutage(ctx, false); err != nil {
		t.Fatal(err)
	}
	if _, err := nc.GetKey(ctx, "k", "", nil); err != nil {
		t.Errorf("GetKey after outage: %v", err)
	}
}

// TestAdminNeedsAdministrator checks that only the administrator may use
// the admin endpoints.
func TestAdminNeedsAdministrator(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t)
	in := kvservertest.Start(t, kvserver.Options{})
	p := in.NewPrincipal(t, "user", "all")
	ac, err := kvserver.NewAdminClient(in.URL, in.Credential(t, p.ObjectID), &in.ClientOptions)
	if err != nil {
		t.Fatal(err)
	}
	if err := ac.SetPolicy(ctx, p.ObjectID, []string{"all"}); err == nil {
		t.Errorf("non-admin SetPolicy succeeded")
	} else if got := errorOf(t, err); got != (vaultError{403, "Forbidden", "AccessDenied"}) {
		t.Errorf("non-admin SetPolicy: %+v", got)
	}
	if err := in.Admin.SetPolicy(ctx, p.ObjectID, []string{"get", "fly"}); err == nil {
		t.Errorf("unknown permission accepted")
	} else if got := errorOf(t, err); got.Status != 400 {
		t.Errorf("unknown permission: %+v", got)
	}
	ps, err := in.Admin.Principals(ctx)
	if err != nil || len(ps) != 2 {
		t.Errorf("Principals: %v %v", ps, err)
	}
}

// TestRecoveryLevelsAndPurge covers the vault settings and purge without
// purge protection, plus the larger key sizes and RSA-HSM.
func TestRecoveryLevelsAndPurge(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		pp        bool
		days      int
		wantLevel string
	}{
		{true, 30, "CustomizedRecoverable"},
		{false, 90, "Recoverable+Purgeable"},
		{false, 7, "CustomizedRecoverable+Purgeable"},
	} {
		t.Run(tc.wantLevel, func(t *testing.T) {
			t.Parallel()
			ctx := ctxT(t)
			in := kvservertest.Start(t, kvserver.Options{PurgeProtection: tc.pp, SoftDeleteRetentionDays: tc.days})
			c := in.KeysClient(t, in.Credential(t, ""), nil)
			k := createKey(t, c, "k", azkeys.KeyTypeRSA, 2048)
			if *k.Attributes.RecoveryLevel != tc.wantLevel || int(*k.Attributes.RecoverableDays) != tc.days {
				t.Errorf("got %s/%d, want %s/%d", *k.Attributes.RecoveryLevel, *k.Attributes.RecoverableDays, tc.wantLevel, tc.days)
			}
			del, err := c.DeleteKey(ctx, "k", nil)
			if err != nil {
				t.Fatal(err)
			}
			if got := del.ScheduledPurgeDate.Sub(*del.DeletedDate); got != time.Duration(tc.days)*24*time.Hour {
				t.Errorf("purge after %v", got)
			}
			_, err = c.PurgeDeletedKey(ctx, "k", nil)
			if tc.pp {
				if err == nil {
					t.Fatalf("purge under purge protection succeeded")
				}
				if got := errorOf(t, err); got.Status != 403 || got.Code != "Forbidden" {
					t.Errorf("purge: %+v", got)
				}
				return
			}
			if err != nil {
				t.Fatalf("PurgeDeletedKey: %v", err)
			}
			if _, err := c.GetDeletedKey(ctx, "k", nil); err == nil || errorOf(t, err).Status != 404 {
				t.Errorf("GetDeletedKey after purge: %v", err)
			}
			if _, err := c.PurgeDeletedKey(ctx, "k", nil); err == nil || errorOf(t, err).Status != 404 {
				t.Errorf("second purge: %v", err)
			}
		})
	}
	t.Run("sizes", func(t *testing.T) {
		t.Parallel()
		ctx := ctxT(t)
		in := kvservertest.Start(t, kvserver.Options{})
		c := in.KeysClient(t, in.Credential(t, ""), nil)
		for _, tc := range []struct {
			name string
			kty  azkeys.KeyType
			bits int32
		}{
			{"k3072", azkeys.KeyTypeRSAHSM, 3072},
			{"k4096", azkeys.KeyTypeRSA, 4096},
		} {
			k := createKey(t, c, tc.name, tc.kty, tc.bits)
			if *k.Key.Kty != tc.kty || publicKey(t, k.Key).N.BitLen() != int(tc.bits) {
				t.Errorf("%s: kty %s, %d bits", tc.name, *k.Key.Kty, publicKey(t, k.Key).N.BitLen())
			}
			dek := bytes.Repeat([]byte{7}, 64)
			alg := to.Ptr(azkeys.EncryptionAlgorithmRSAOAEP256)
			w, err := c.WrapKey(ctx, tc.name, "", azkeys.KeyOperationParameters{Algorithm: alg, Value: dek}, nil)
			if err != nil {
				t.Fatalf("%s WrapKey: %v", tc.name, err)
			}
			if len(w.Result) != int(tc.bits)/8 {
				t.Errorf("%s: wrapped %d bytes", tc.name, len(w.Result))
			}
			u, err := c.UnwrapKey(ctx, tc.name, "", azkeys.KeyOperationParameters{Algorithm: alg, Value: w.Result}, nil)
			if err != nil || !bytes.Equal(u.Result, dek) {
				t.Errorf("%s UnwrapKey: %v", tc.name, err)
			}
		}
	})
}

// TestCLIFlow is what "cryptnbd keyvault …" does: load admin.json, point
// the environment at the vault, use azidentity as the administrator.
func TestCLIFlow(t *testing.T) {
	ctx := ctxT(t)
	in := kvservertest.Start(t, kvserver.Options{})
	cfg, err := kvserver.LoadAdminConfig(in.Options.DataDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("IDENTITY_ENDPOINT", "") // restored after the test
	t.Setenv("IDENTITY_HEADER", "")
	if _, err := cfg.Credential(""); !errors.Is(err, kvserver.ErrIdentityEnv) {
		t.Errorf("Credential without env: %v, want ErrIdentityEnv", err)
	}
	if err := cfg.SetIdentityEnv(); err != nil {
		t.Fatal(err)
	}
	cred, err := cfg.Credential("")
	if err != nil {
		t.Fatal(err)
	}
	co, err := cfg.ClientOptions()
	if err != nil {
		t.Fatal(err)
	}
	des, err := kvserver.CreatePrincipal(ctx, cfg.VaultURL, cred, "des", &co)
	if err != nil {
		t.Fatalf("CreatePrincipal: %v", err)
	}
	if err := kvserver.SetPolicy(ctx, cfg.VaultURL, cred, des.ObjectID, []string{"get", "wrapKey", "unwrapKey"}, &co); err != nil {
		t.Fatalf("SetPolicy: %v", err)
	}
	pols, err := in.Admin.Policies(ctx)
	if err != nil || !slices.Equal(pols[des.ObjectID], []string{"get", "unwrapkey", "wrapkey"}) {
		t.Errorf("policies %v %v", pols, err)
	}
	kco, err := cfg.KeysClientOptions()
	if err != nil {
		t.Fatal(err)
	}
	desCred, err := cfg.Credential(des.ObjectID)
	if err != nil {
		t.Fatal(err)
	}
	c, err := azkeys.NewClient(cfg.VaultURL, desCred, kco)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetKey(ctx, "missing", "", nil); err == nil || errorOf(t, err) != (vaultError{404, "KeyNotFound", ""}) {
		t.Errorf("GetKey as DES: %v", err)
	}
	if err := kvserver.DeletePolicy(ctx, cfg.VaultURL, cred, des.ObjectID, &co); err != nil {
		t.Fatalf("DeletePolicy: %v", err)
	}
	if _, err := c.GetKey(ctx, "missing", "", nil); err == nil || errorOf(t, err) != (vaultError{403, "Forbidden", "AccessDenied"}) {
		t.Errorf("GetKey as DES after DeletePolicy: %v", err)
	}
}

// TestLifecycle covers options, certificates and context shutdown.
func TestLifecycle(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	for _, o := range []kvserver.Options{
		{},
		{DataDir: dir, SoftDeleteRetentionDays: 6},
		{DataDir: dir, SoftDeleteRetentionDays: 91},
	} {
		if _, err := kvserver.New(o); err == nil {
			t.Errorf("New(%+v) succeeded", o)
		}
	}
	leaf := func() *x509.Certificate {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(dir, "server.pem"))
		if err != nil {
			t.Fatal(err)
		}
		blk, _ := pem.Decode(b)
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	s, err := kvserver.New(kvserver.Options{DataDir: dir, Listen: "127.0.0.1:0", ExtraHosts: []string{"vault.local", "10.1.2.3"}})
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(s.CAPEM())
	c1 := leaf()
	for _, h := range []string{"127.0.0.1", "::1", "localhost", "vault.local", "10.1.2.3"} {
		if _, err := c1.Verify(x509.VerifyOptions{DNSName: h, Roots: pool}); err != nil {
			t.Errorf("certificate for %s: %v", h, err)
		}
	}
	if _, err := kvserver.New(kvserver.Options{DataDir: dir, ExtraHosts: []string{"vault.local"}}); err != nil {
		t.Fatal(err)
	}
	if !leaf().Equal(c1) {
		t.Errorf("certificate reissued although it covered every host")
	}
	if _, err := kvserver.New(kvserver.Options{DataDir: dir, ExtraHosts: []string{"other.local"}}); err != nil {
		t.Fatal(err)
	}
	if c2 := leaf(); c2.Equal(c1) || c2.VerifyHostname("other.local") != nil {
		t.Errorf("certificate not reissued for a new host")
	}

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.ListenAndServe(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for s.URL() == "" && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cfg, err := kvserver.LoadAdminConfig(dir)
	if err != nil || cfg.VaultURL != s.URL() || cfg.IdentityEndpoint != s.URL()+"/msi/token" {
		t.Errorf("admin.json %+v, %v; URL %s", cfg, err, s.URL())
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("ListenAndServe after cancel: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("ListenAndServe did not return after cancel")
	}
}
