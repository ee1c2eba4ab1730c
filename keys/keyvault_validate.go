package keys

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"
)

// Validation is what Validate found out about the key and the identity.
type Validation struct {
	KeyID         string // versioned kid of the current version ("" if GET was refused)
	KeyType       string // RSA or RSA-HSM when valid
	RecoveryLevel string // Recoverable or CustomizedRecoverable when valid
	CanGet        bool
	CanWrap       bool
	CanUnwrap     bool
}

// errNotTested stands for an unwrapKey that could not be attempted because
// nothing was wrapped to unwrap.
var errNotTested = errors.New("keys: unwrapKey not tested: nothing to unwrap")

// access is the outcome of trying get, wrapKey and unwrapKey.
type access struct {
	info                       keyInfo
	getErr, wrapErr, unwrapErr error
}

// tryAccess GETs the current version, wraps 32 random bytes and unwraps
// them. When wrapKey is refused but GET gave the public key, it encrypts
// locally so unwrapKey is still tested.
func (k *KeyVault) tryAccess(ctx context.Context) access {
	var a access
	cur := k.wrapKeyURL()
	r, err := k.ref(cur, false)
	if err != nil {
		a.getErr, a.wrapErr, a.unwrapErr = err, err, err
		return a
	}
	a.info, a.getErr = k.get(ctx, "get", r)
	secret := make([]byte, 32)
	rand.Read(secret)
	kid, alg, wrapped, err := k.Wrap(ctx, secret, nil)
	a.wrapErr = err
	switch {
	case err == nil:
	case a.getErr == nil && a.info.pub != nil && a.info.enabled:
		kid, alg = a.info.kid, "RSA-OAEP-256"
		if wrapped, err = rsa.EncryptOAEP(sha256.New(), rand.Reader, a.info.pub, secret, nil); err != nil {
			a.unwrapErr = fmt.Errorf("keys: encrypt locally: %w", err)
			return a
		}
	default:
		a.unwrapErr = errNotTested
		return a
	}
	got, err := k.Unwrap(ctx, kid, alg, wrapped, nil)
	switch {
	case err != nil:
		a.unwrapErr = err
	case !bytes.Equal(got, secret):
		a.unwrapErr = &VaultError{Op: "unwrapKey", KeyID: kid, Err: fmt.Errorf("vault returned other bytes: %w", ErrUnwrap)}
	}
	return a
}

// AccessStatus reports whether the identity can get, wrapKey and unwrapKey
// with the current version right now, by doing each once (for "des show").
func (k *KeyVault) AccessStatus(ctx context.Context) (canGet, canWrap, canUnwrap bool) {
	a := k.tryAccess(ctx)
	return a.getErr == nil, a.wrapErr == nil, a.unwrapErr == nil
}

// denial returns the inner code when err is the vault refusing the
// identity (403 AccessDenied, ForbiddenByRbac, ForbiddenByFirewall, or
// Forbidden without an inner code), else "".
func denial(err error) string {
	var ve *VaultError
	if !errors.As(err, &ve) || ve.Status != http.StatusForbidden {
		return ""
	}
	switch ve.InnerCode {
	case "":
		return "AccessDenied"
	case "AccessDenied", "ForbiddenByRbac", "ForbiddenByFirewall", "ForbiddenByPolicy":
		return ve.InnerCode
	}
	return ""
}

func vaultCode(err error) string {
	var ve *VaultError
	if errors.As(err, &ve) {
		if ve.InnerCode != "" {
			return ve.InnerCode
		}
		return ve.Code
	}
	return ""
}

// Validate checks what the first disk created against a disk encryption set
// needs: the key exists, is enabled and not expired, is RSA or RSA-HSM, the
// vault has purge protection (recoveryLevel Recoverable or
// CustomizedRecoverable), and the identity principalID (its object id, used
// in the suggested command) can get, wrapKey and unwrapKey, proven by a
// test wrap and unwrap of random bytes. On failure the error names exactly
// what to fix; a transient failure (see Classify) is returned as is,
// wrapped. The Validation is filled as far as the checks got.
func (k *KeyVault) Validate(ctx context.Context, principalID string) (*Validation, error) {
	a := k.tryAccess(ctx)
	v := &Validation{KeyID: a.info.kid, KeyType: a.info.kty, RecoveryLevel: a.info.recoveryLevel,
		CanGet: a.getErr == nil, CanWrap: a.wrapErr == nil, CanUnwrap: a.unwrapErr == nil}
	for _, err := range []error{a.getErr, a.wrapErr, a.unwrapErr} {
		if Classify(err) == ClassTransient {
			return v, fmt.Errorf("keys: key vault validate %s: %w", k.keyURL, err)
		}
	}
	for _, err := range []error{a.getErr, a.wrapErr} {
		if errors.Is(err, ErrKeyNotFound) {
			return v, fmt.Errorf("keys: key vault %s: key %s does not exist: create it, recover it if it was deleted (az keyvault key recover), or fix the key URL", k.vaultURL, k.keyURL)
		}
	}

	var problems []string
	kid := a.info.kid
	if kid == "" {
		kid = k.wrapKeyURL()
	}
	disabled := false
	if a.getErr == nil {
		if a.info.kty != "RSA" && a.info.kty != "RSA-HSM" {
			problems = append(problems, fmt.Sprintf("key %s has type %s: disk encryption needs an RSA or RSA-HSM key", kid, a.info.kty))
		}
		if !a.info.enabled {
			disabled = true
		}
		if !a.info.expires.IsZero() && !time.Now().Before(a.info.expires) {
			problems = append(problems, fmt.Sprintf("key version %s expired at %s: extend it (az keyvault key set-attributes --id %s --expires ...) or rotate the key",
				kid, a.info.expires.UTC().Format(time.RFC3339), kid))
		}
		if a.info.recoveryLevel != "Recoverable" && a.info.recoveryLevel != "CustomizedRecoverable" {
			name := "<VAULT_NAME>"
			if isAzureVaultHost(k.host) {
				name, _, _ = strings.Cut(k.host, ".")
			}
			problems = append(problems, fmt.Sprintf("vault %s has no purge protection (recoveryLevel %q): disk encryption needs purge protection enabled: az keyvault update --name %s --enable-purge-protection true, or for the local server cryptnbd keyvault serve --purge-protection=true",
				k.vaultURL, a.info.recoveryLevel, name))
		}
	}
	if vaultCode(a.wrapErr) == codeKeyDisabled {
		disabled = true
	}
	if disabled {
		problems = append(problems, fmt.Sprintf("key version %s is disabled: enable it (az keyvault key set-attributes --id %s --enabled true)", kid, kid))
	}

	var missing []string
	rbac, firewall := false, false
	for _, op := range []struct {
		perm string
		err  error
	}{{"get", a.getErr}, {"wrapKey", a.wrapErr}, {"unwrapKey", a.unwrapErr}} {
		switch d := denial(op.err); {
		case op.err == nil:
		case d == "ForbiddenByFirewall":
			firewall = true
		case d != "":
			missing = append(missing, op.perm)
			rbac = rbac || d == "ForbiddenByRbac"
		case op.err == errNotTested, errors.Is(op.err, ErrKeyDisabled):
			// explained by another problem
		case vaultCode(op.err) == "KeyExpired" || vaultCode(op.err) == "KeyNotYetValid":
			if a.getErr != nil {
				problems = append(problems, fmt.Sprintf("key version %s is expired or not yet valid (%s): fix its dates or rotate the key", kid, vaultCode(op.err)))
			}
		case vaultCode(op.err) == "KeyOperationForbidden":
			problems = append(problems, fmt.Sprintf("key %s does not allow the operation %s: add it to the key's operations (az keyvault key set-attributes --id %s --ops wrapKey unwrapKey)", kid, op.perm, kid))
		default:
			problems = append(problems, fmt.Sprintf("%s failed: %v", op.perm, op.err))
		}
	}
	if firewall {
		problems = append(problems, fmt.Sprintf("the firewall of vault %s refuses this host: allow its address, or trusted Azure services, in the vault's network rules", k.vaultURL))
	}
	if len(missing) > 0 {
		oid := principalID
		if oid == "" {
			oid = "<OBJECT_ID>"
		}
		s := fmt.Sprintf("identity %s lacks key permission %s: run cryptnbd keyvault set-policy --vault-url %s --object-id %s --key-permissions get wrapKey unwrapKey",
			oid, strings.Join(missing, ", "), k.vaultURL, oid)
		if rbac {
			s += ` (on a vault using Azure RBAC, assign it the role "Key Vault Crypto Service Encryption User" instead)`
		}
		problems = append(problems, s)
	}
	if len(problems) > 0 {
		return v, fmt.Errorf("keys: key vault %s: %s", k.keyURL, strings.Join(problems, "; "))
	}
	return v, nil
}
