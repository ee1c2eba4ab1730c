package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/cryptnbd/cryptnbd/keys/kvserver"
)

// VaultConfig says how to reach Key Vault: Azure with the azidentity chain,
// optionally trusting a private CA, or a local `cryptnbd keyvault serve`.
type VaultConfig struct {
	// LocalVaultDir is the data directory of a local cryptnbd Key Vault: its
	// CA is trusted, its host is allowed, and its managed-identity endpoint
	// is exported as IDENTITY_ENDPOINT/IDENTITY_HEADER for azidentity.
	LocalVaultDir string
	// CAFile is an extra PEM bundle to trust (private endpoints).
	CAFile string
	// AllowHosts are non-Azure vault hosts (host:port) for which azkeys'
	// challenge-resource verification is turned off. Azure hosts never are.
	AllowHosts []string

	local *kvserver.AdminConfig
	co    azcore.ClientOptions
	ready bool
}

// Init loads the local vault's configuration and the CA bundle. For a local
// vault it sets the process's IDENTITY_ENDPOINT and IDENTITY_HEADER, which
// is why it runs once, from main, before anything else uses azidentity.
func (v *VaultConfig) Init() error {
	pool, err := x509.SystemCertPool()
	if err != nil || pool == nil {
		pool = x509.NewCertPool()
	}
	addPEM := func(path string) error {
		pem, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("vault CA: %w", err)
		}
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("vault CA: no certificate in %s", path)
		}
		return nil
	}
	custom := false
	if v.LocalVaultDir != "" {
		ac, err := kvserver.LoadAdminConfig(v.LocalVaultDir)
		if err != nil {
			return fmt.Errorf("local vault %s (is `cryptnbd keyvault serve --data-dir %s` running or has it run once?): %w", v.LocalVaultDir, v.LocalVaultDir, err)
		}
		v.local = ac
		if err := addPEM(ac.CAFile); err != nil {
			return err
		}
		custom = true
		if err := ac.SetIdentityEnv(); err != nil {
			return err
		}
		if u, err := url.Parse(ac.VaultURL); err == nil {
			v.AllowHosts = append(v.AllowHosts, u.Host)
		}
	}
	if v.CAFile != "" {
		if err := addPEM(v.CAFile); err != nil {
			return err
		}
		custom = true
	}
	if custom {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
		v.co = azcore.ClientOptions{Transport: &http.Client{Transport: tr, Timeout: 2 * time.Minute}}
	}
	v.ready = true
	return nil
}

// Local is the local vault's configuration, or nil against Azure.
func (v *VaultConfig) Local() *kvserver.AdminConfig { return v.local }

// ClientOptions are the azcore options for every vault and identity call.
func (v *VaultConfig) ClientOptions() azcore.ClientOptions { return v.co }

// azureVaultSuffixes are the Key Vault and Managed HSM DNS suffixes of the
// Azure clouds; challenge-resource verification always stays on for them.
var azureVaultSuffixes = []string{
	".vault.azure.net", ".vault.azure.cn", ".vault.usgovcloudapi.net", ".vault.microsoftazure.de",
	".managedhsm.azure.net", ".managedhsm.azure.cn", ".managedhsm.usgovcloudapi.net",
}

// AllowNonAzure reports whether vaultURL's host was explicitly configured as
// a non-Azure host.
func (v *VaultConfig) AllowNonAzure(vaultURL string) bool {
	u, err := url.Parse(vaultURL)
	if err != nil {
		return false
	}
	host := strings.ToLower(u.Hostname())
	for _, s := range azureVaultSuffixes {
		if strings.HasSuffix(host, s) {
			return false
		}
	}
	return slices.Contains(v.AllowHosts, u.Host)
}

// Credential is the azidentity chain users of the Azure SDK expect
// (environment service principal, workload identity, managed identity,
// Azure CLI), acting as the managed identity clientID when one is given.
func (v *VaultConfig) Credential(clientID string) (azcore.TokenCredential, error) {
	if !v.ready {
		return nil, errors.New("vault config not initialised")
	}
	// DefaultAzureCredential takes its managed identity only from
	// AZURE_CLIENT_ID, and each disk encryption set has its own, so the same
	// chain is built here with the identity given.
	var chain []azcore.TokenCredential
	if c, err := azidentity.NewEnvironmentCredential(&azidentity.EnvironmentCredentialOptions{ClientOptions: v.co}); err == nil {
		chain = append(chain, c)
	}
	if c, err := azidentity.NewWorkloadIdentityCredential(&azidentity.WorkloadIdentityCredentialOptions{ClientOptions: v.co, ClientID: clientID}); err == nil {
		chain = append(chain, c)
	}
	mio := &azidentity.ManagedIdentityCredentialOptions{ClientOptions: v.co}
	if clientID != "" {
		mio.ID = azidentity.ClientID(clientID)
	}
	if c, err := azidentity.NewManagedIdentityCredential(mio); err == nil {
		chain = append(chain, c)
	}
	if c, err := azidentity.NewAzureCLICredential(nil); err == nil {
		chain = append(chain, c)
	}
	cred, err := azidentity.NewChainedTokenCredential(chain, nil)
	if err != nil {
		return nil, fmt.Errorf("azure credential: %w", err)
	}
	return cred, nil
}

// AdminCredential is the credential for key and policy administration: the
// local vault's administrator, or the user's own azidentity chain on Azure.
func (v *VaultConfig) AdminCredential() (azcore.TokenCredential, error) {
	if v.local != nil {
		return v.Credential(v.local.AdminClientID)
	}
	return v.Credential("")
}

// KeysClient is an azkeys client for vaultURL as cred.
func (v *VaultConfig) KeysClient(vaultURL string, cred azcore.TokenCredential) (*azkeys.Client, error) {
	c, err := azkeys.NewClient(vaultURL, cred, &azkeys.ClientOptions{
		ClientOptions:                        v.co,
		DisableChallengeResourceVerification: v.AllowNonAzure(vaultURL),
	})
	if err != nil {
		return nil, fmt.Errorf("key vault client: %w", err)
	}
	return c, nil
}

// CreateIdentity makes a new identity for a disk encryption set on the
// local vault. On Azure identities are user-assigned managed identities
// created by the user (az identity create), so this refuses.
func (v *VaultConfig) CreateIdentity(ctx context.Context, name string) (kvserver.Principal, error) {
	if v.local == nil {
		return kvserver.Principal{}, errors.New("give the user-assigned managed identity with --identity-client-id and --identity-principal-id (az identity create; az identity show --query '{clientId:clientId,principalId:principalId}')")
	}
	cred, err := v.AdminCredential()
	if err != nil {
		return kvserver.Principal{}, err
	}
	co := v.co
	return kvserver.CreatePrincipal(ctx, v.local.VaultURL, cred, name, &co)
}
