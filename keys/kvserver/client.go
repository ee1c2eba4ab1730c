package kvserver

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/runtime"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"
)

// ErrIdentityEnv means the process environment does not point azidentity's
// managed-identity credential at this vault's token endpoint.
var ErrIdentityEnv = errors.New("kvserver: IDENTITY_ENDPOINT and IDENTITY_HEADER do not point at this vault (call AdminConfig.SetIdentityEnv)")

// AdminConfig is DIR/admin.json: what a local client needs to reach the
// vault as any principal. The server writes it (mode 0600) when it starts
// listening.
type AdminConfig struct {
	VaultURL         string `json:"vaultUrl"`
	IdentityEndpoint string `json:"identityEndpoint"` // value for IDENTITY_ENDPOINT
	IdentityHeader   string `json:"identityHeader"`   // value for IDENTITY_HEADER (a secret)
	TenantID         string `json:"tenantId"`
	AdminObjectID    string `json:"adminObjectId"`
	AdminClientID    string `json:"adminClientId"`
	CAFile           string `json:"caFile"` // PEM of the CA to trust
	Resource         string `json:"resource"`
}

// LoadAdminConfig reads dataDir/admin.json.
func LoadAdminConfig(dataDir string) (*AdminConfig, error) {
	b, err := os.ReadFile(filepath.Join(dataDir, adminFile))
	if err != nil {
		return nil, fmt.Errorf("kvserver: %w", err)
	}
	var c AdminConfig
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("kvserver: parse admin config: %w", err)
	}
	return &c, nil
}

func (c *AdminConfig) write(path string) error {
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return fmt.Errorf("kvserver: encode admin config: %w", err)
	}
	if err := writeFileAtomic(path, b, 0o600); err != nil {
		return fmt.Errorf("kvserver: write admin config: %w", err)
	}
	return nil
}

// CertPool returns a pool holding only the vault's CA.
func (c *AdminConfig) CertPool() (*x509.CertPool, error) {
	pem, err := os.ReadFile(c.CAFile)
	if err != nil {
		return nil, fmt.Errorf("kvserver: read CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("kvserver: no certificate in %s", c.CAFile)
	}
	return pool, nil
}

// ClientOptions returns azcore options whose transport trusts the vault's CA.
func (c *AdminConfig) ClientOptions() (azcore.ClientOptions, error) {
	pool, err := c.CertPool()
	if err != nil {
		return azcore.ClientOptions{}, err
	}
	return ClientOptionsFor(pool), nil
}

// ClientOptionsFor returns azcore options whose transport trusts pool.
func ClientOptionsFor(pool *x509.CertPool) azcore.ClientOptions {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	return azcore.ClientOptions{Transport: &http.Client{Transport: tr}}
}

// KeysClientOptions returns azkeys options for this vault: the CA trusted
// and the challenge-resource check off, since the vault's host is not
// *.vault.azure.net.
func (c *AdminConfig) KeysClientOptions() (*azkeys.ClientOptions, error) {
	co, err := c.ClientOptions()
	if err != nil {
		return nil, err
	}
	return &azkeys.ClientOptions{ClientOptions: co, DisableChallengeResourceVerification: true}, nil
}

// SetIdentityEnv points the process's managed-identity environment
// (IDENTITY_ENDPOINT, IDENTITY_HEADER) at this vault, as App Service does.
// It changes process-wide state: call it once, early, from main.
func (c *AdminConfig) SetIdentityEnv() error {
	if err := os.Setenv("IDENTITY_ENDPOINT", c.IdentityEndpoint); err != nil {
		return fmt.Errorf("kvserver: %w", err)
	}
	if err := os.Setenv("IDENTITY_HEADER", c.IdentityHeader); err != nil {
		return fmt.Errorf("kvserver: %w", err)
	}
	return nil
}

// Credential returns azidentity's ManagedIdentityCredential for the
// principal objectID (the administrator if empty), trusting the vault's CA.
// This is the production credential path: azidentity reads IDENTITY_ENDPOINT
// and IDENTITY_HEADER at every token request, so they must point at this
// vault (SetIdentityEnv, or t.Setenv in tests); otherwise it returns
// ErrIdentityEnv. MSAL caches tokens process-wide by identity, which is
// harmless because object ids are random per vault.
func (c *AdminConfig) Credential(objectID string) (azcore.TokenCredential, error) {
	if os.Getenv("IDENTITY_ENDPOINT") != c.IdentityEndpoint || os.Getenv("IDENTITY_HEADER") != c.IdentityHeader ||
		os.Getenv("IDENTITY_SERVER_THUMBPRINT") != "" {
		return nil, ErrIdentityEnv
	}
	if objectID == "" {
		objectID = c.AdminObjectID
	}
	co, err := c.ClientOptions()
	if err != nil {
		return nil, err
	}
	cred, err := azidentity.NewManagedIdentityCredential(&azidentity.ManagedIdentityCredentialOptions{
		ClientOptions: co,
		ID:            azidentity.ObjectID(objectID),
	})
	if err != nil {
		return nil, fmt.Errorf("kvserver: managed identity credential: %w", err)
	}
	return cred, nil
}

// DirectCredential returns a credential for the principal objectID (the
// administrator if empty) that speaks the same App Service token protocol
// as azidentity but takes the endpoint from c instead of the environment,
// so parallel tests can use several vaults at once.
func (c *AdminConfig) DirectCredential(objectID string) (azcore.TokenCredential, error) {
	if objectID == "" {
		objectID = c.AdminObjectID
	}
	co, err := c.ClientOptions()
	if err != nil {
		return nil, err
	}
	return &directCredential{endpoint: c.IdentityEndpoint, header: c.IdentityHeader, objectID: objectID,
		client: co.Transport.(*http.Client)}, nil
}

// directCredential is safe for concurrent use; it does not cache tokens
// (azcore's bearer policies do).
type directCredential struct {
	endpoint, header, objectID string
	client                     *http.Client
}

func (d *directCredential) GetToken(ctx context.Context, opts policy.TokenRequestOptions) (azcore.AccessToken, error) {
	if len(opts.Scopes) != 1 {
		return azcore.AccessToken{}, errors.New("kvserver: GetToken needs exactly one scope")
	}
	q := url.Values{}
	q.Set("api-version", IdentityAPIVersion)
	q.Set("resource", strings.TrimSuffix(opts.Scopes[0], "/.default"))
	q.Set("object_id", d.objectID)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, d.endpoint+"?"+q.Encode(), nil)
	if err != nil {
		return azcore.AccessToken{}, fmt.Errorf("kvserver: token request: %w", err)
	}
	req.Header.Set("X-IDENTITY-HEADER", d.header)
	resp, err := d.client.Do(req)
	if err != nil {
		return azcore.AccessToken{}, fmt.Errorf("kvserver: token request: %w", err)
	}
	defer resp.Body.Close()
	var body struct {
		AccessToken string `json:"access_token"`
		ExpiresOn   string `json:"expires_on"`
		Message     string `json:"message"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return azcore.AccessToken{}, fmt.Errorf("kvserver: token response (status %d): %w", resp.StatusCode, err)
	}
	if resp.StatusCode != http.StatusOK {
		return azcore.AccessToken{}, fmt.Errorf("kvserver: token request: status %d: %s", resp.StatusCode, body.Message)
	}
	exp, err := strconv.ParseInt(body.ExpiresOn, 10, 64)
	if err != nil {
		return azcore.AccessToken{}, fmt.Errorf("kvserver: token expires_on: %w", err)
	}
	return azcore.AccessToken{Token: body.AccessToken, ExpiresOn: time.Unix(exp, 0)}, nil
}

// AdminClient calls the admin endpoints as the administrator. It is safe
// for concurrent use.
type AdminClient struct {
	vaultURL string
	pl       runtime.Pipeline
}

// NewAdminClient returns a client for the vault at vaultURL. cred must
// yield the administrator's tokens; opts must trust the vault's CA (see
// AdminConfig.ClientOptions) and may be nil if the system pool does.
func NewAdminClient(vaultURL string, cred azcore.TokenCredential, opts *azcore.ClientOptions) (*AdminClient, error) {
	if _, err := url.Parse(vaultURL); err != nil {
		return nil, fmt.Errorf("kvserver: vault URL: %w", err)
	}
	pl := runtime.NewPipeline("kvserver", "v1", runtime.PipelineOptions{
		PerRetry: []policy.Policy{runtime.NewBearerTokenPolicy(cred, []string{Resource + "/.default"}, nil)},
	}, opts)
	return &AdminClient{vaultURL: strings.TrimSuffix(vaultURL, "/"), pl: pl}, nil
}

// do sends body (if non-nil) and decodes a 2xx reply into out (if non-nil).
// A non-2xx reply is returned as *azcore.ResponseError.
func (c *AdminClient) do(ctx context.Context, method, path string, body, out any) error {
	req, err := runtime.NewRequest(ctx, method, c.vaultURL+path)
	if err != nil {
		return fmt.Errorf("kvserver: %w", err)
	}
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return fmt.Errorf("kvserver: encode request: %w", err)
		}
		if err := req.SetBody(streaming.NopCloser(bytes.NewReader(b)), "application/json"); err != nil {
			return fmt.Errorf("kvserver: %w", err)
		}
	}
	resp, err := c.pl.Do(req)
	if err != nil {
		return fmt.Errorf("kvserver: %s %s: %w", method, path, err)
	}
	if !runtime.HasStatusCode(resp, http.StatusOK, http.StatusNoContent) {
		return runtime.NewResponseError(resp)
	}
	if out == nil {
		resp.Body.Close()
		return nil
	}
	if err := runtime.UnmarshalAsJSON(resp, out); err != nil {
		return fmt.Errorf("kvserver: %s %s: %w", method, path, err)
	}
	return nil
}

// SetPolicy replaces objectID's key permissions (Key Vault names such as
// get, wrapKey, unwrapKey; case-insensitive; "all" for every one).
func (c *AdminClient) SetPolicy(ctx context.Context, objectID string, keyPerms []string) error {
	if keyPerms == nil {
		keyPerms = []string{}
	}
	return c.do(ctx, http.MethodPut, "/admin/policies/"+url.PathEscape(objectID), policyBody{Keys: keyPerms}, nil)
}

// DeletePolicy removes objectID's access policy; removing none is no error.
func (c *AdminClient) DeletePolicy(ctx context.Context, objectID string) error {
	return c.do(ctx, http.MethodDelete, "/admin/policies/"+url.PathEscape(objectID), nil, nil)
}

// Policies returns every access policy, by object id.
func (c *AdminClient) Policies(ctx context.Context) (map[string][]string, error) {
	var out map[string][]string
	err := c.do(ctx, http.MethodGet, "/admin/policies", nil, &out)
	return out, err
}

// CreatePrincipal makes a new identity (e.g. a Disk Encryption Set's) with
// fresh client and object ids and no permissions.
func (c *AdminClient) CreatePrincipal(ctx context.Context, name string) (Principal, error) {
	var p Principal
	err := c.do(ctx, http.MethodPost, "/admin/principals", principalBody{Name: name}, &p)
	return p, err
}

// Principals lists every identity, the administrator included.
func (c *AdminClient) Principals(ctx context.Context) ([]Principal, error) {
	var out []Principal
	err := c.do(ctx, http.MethodGet, "/admin/principals", nil, &out)
	return out, err
}

// Throttle makes the next count data-plane requests fail with 429
// Throttled, Retry-After retryAfterSeconds (at least 1) and, if retryAfterMS
// is positive, x-ms-retry-after-ms, which azcore prefers. Count 0 stops it.
func (c *AdminClient) Throttle(ctx context.Context, count, retryAfterSeconds, retryAfterMS int) error {
	return c.do(ctx, http.MethodPost, "/admin/throttle", throttleBody{Count: count, RetryAfter: retryAfterSeconds, RetryAfterMS: retryAfterMS}, nil)
}

// SetOutage makes every data-plane request fail with 503 while on.
func (c *AdminClient) SetOutage(ctx context.Context, on bool) error {
	return c.do(ctx, http.MethodPost, "/admin/outage", outageBody{Enabled: on}, nil)
}

// SetPolicy is AdminClient.SetPolicy for one call, as the CLI's
// "keyvault set-policy" uses it.
func SetPolicy(ctx context.Context, vaultURL string, cred azcore.TokenCredential, objectID string, keyPerms []string, opts *azcore.ClientOptions) error {
	c, err := NewAdminClient(vaultURL, cred, opts)
	if err != nil {
		return err
	}
	return c.SetPolicy(ctx, objectID, keyPerms)
}

// DeletePolicy is AdminClient.DeletePolicy for one call.
func DeletePolicy(ctx context.Context, vaultURL string, cred azcore.TokenCredential, objectID string, opts *azcore.ClientOptions) error {
	c, err := NewAdminClient(vaultURL, cred, opts)
	if err != nil {
		return err
	}
	return c.DeletePolicy(ctx, objectID)
}

// CreatePrincipal is AdminClient.CreatePrincipal for one call.
func CreatePrincipal(ctx context.Context, vaultURL string, cred azcore.TokenCredential, name string, opts *azcore.ClientOptions) (Principal, error) {
	c, err := NewAdminClient(vaultURL, cred, opts)
	if err != nil {
		return Principal{}, err
	}
	return c.CreatePrincipal(ctx, name)
}
