package keys_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"

	"github.com/cryptnbd/cryptnbd/keys"
)

// TestClassifyTable covers the classification rules for errors built by
// hand; TestClassifyVault gets the same answers from a real server.
func TestClassifyTable(t *testing.T) {
	ve := func(status int, code, inner string) error {
		return &keys.VaultError{Op: "unwrapKey", KeyID: "kid", Status: status, Code: code, InnerCode: inner}
	}
	for _, tc := range []struct {
		name   string
		err    error
		want   keys.Class
		reason string // VaultError.Reason, if a VaultError
	}{
		{"nil", nil, keys.ClassOK, ""},
		{"disabled", ve(403, "Forbidden", "KeyDisabled"), keys.ClassRevoked, "KeyDisabled"},
		{"access denied", ve(403, "Forbidden", "AccessDenied"), keys.ClassRevoked, "AccessDenied"},
		{"rbac", ve(403, "Forbidden", "ForbiddenByRbac"), keys.ClassRevoked, "ForbiddenByRbac"},
		{"firewall", ve(403, "Forbidden", "ForbiddenByFirewall"), keys.ClassRevoked, "ForbiddenByFirewall"},
		{"forbidden, no inner code", ve(403, "Forbidden", ""), keys.ClassRevoked, "AccessDenied"},
		{"key operation removed", ve(403, "Forbidden", "KeyOperationForbidden"), keys.ClassRevoked, "KeyOperationForbidden"},
		{"expired (wrap)", ve(403, "Forbidden", "KeyExpired"), keys.ClassOther, "KeyExpired"},
		{"key not found", ve(404, "KeyNotFound", ""), keys.ClassRevoked, "KeyNotFound"},
		{"no such endpoint", ve(404, "NotFound", ""), keys.ClassOther, "NotFound"},
		{"bad request", ve(400, "BadParameter", ""), keys.ClassOther, "BadParameter"},
		{"token refused", ve(401, "Unauthorized", ""), keys.ClassTransient, "Unauthorized"},
		{"request timeout", ve(408, "RequestTimeout", ""), keys.ClassTransient, "RequestTimeout"},
		{"throttled", ve(429, "Throttled", ""), keys.ClassTransient, "Throttled"},
		{"server error", ve(500, "InternalError", ""), keys.ClassTransient, "InternalError"},
		{"unavailable", ve(503, "ServiceUnavailable", ""), keys.ClassTransient, "ServiceUnavailable"},
		{"deadline", fmt.Errorf("x: %w", context.DeadlineExceeded), keys.ClassTransient, ""},
		{"canceled", context.Canceled, keys.ClassOther, ""},
		{"connection refused", &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}, keys.ClassTransient, ""},
		{"dns", &net.DNSError{Err: "no such host", Name: "v.vault.azure.net", IsNotFound: true}, keys.ClassTransient, ""},
		{"credential", &azidentity.AuthenticationFailedError{}, keys.ClassTransient, ""},
		{"vault error without response", &keys.VaultError{Op: "get", Err: syscall.ECONNRESET}, keys.ClassTransient, "KeyVaultUnreachable"},
		{"platform disabled", fmt.Errorf("keys: x: %w", keys.ErrKeyDisabled), keys.ClassRevoked, ""},
		{"unwrap failed", keys.ErrUnwrap, keys.ClassOther, ""},
		{"plain", errors.New("something"), keys.ClassOther, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := keys.Classify(tc.err); got != tc.want {
				t.Errorf("Classify(%v) = %v, want %v", tc.err, got, tc.want)
			}
			var v *keys.VaultError
			if errors.As(tc.err, &v) {
				// ErrRevoked matches the provider's own errors; the
				// platform's sentinels are only classified.
				if got := errors.Is(tc.err, keys.ErrRevoked); got != (tc.want == keys.ClassRevoked) {
					t.Errorf("errors.Is(%v, ErrRevoked) = %v", tc.err, got)
				}
				if got := v.Reason(); got != tc.reason {
					t.Errorf("Reason() = %q, want %q", got, tc.reason)
				}
			}
		})
	}
}

func TestVaultErrorString(t *testing.T) {
	for _, tc := range []struct {
		err  *keys.VaultError
		want string
	}{
		{&keys.VaultError{Op: "unwrapKey", KeyID: "https://v/keys/k/1", Status: 403, Code: "Forbidden", InnerCode: "KeyDisabled"},
			"keyvault: unwrapKey https://v/keys/k/1: 403 Forbidden/KeyDisabled"},
		{&keys.VaultError{Op: "get", KeyID: "https://v/keys/k/1", Status: 429, Code: "Throttled", RetryAfter: time.Second},
			"keyvault: get https://v/keys/k/1: 429 Throttled"},
		{&keys.VaultError{Op: "get", KeyID: "https://v/keys/k/1", Err: syscall.ECONNREFUSED},
			"keyvault: get https://v/keys/k/1: connection refused"},
	} {
		if got := tc.err.Error(); got != tc.want {
			t.Errorf("Error() = %q, want %q", got, tc.want)
		}
	}
	e := &keys.VaultError{Op: "get", Err: syscall.ECONNREFUSED}
	if !errors.Is(e, syscall.ECONNREFUSED) {
		t.Errorf("VaultError does not unwrap to its cause")
	}
}
