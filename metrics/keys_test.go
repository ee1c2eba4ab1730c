package metrics_test

import (
	"errors"
	"testing"
	"time"

	"github.com/cryptnbd/cryptnbd/metrics"
)

func TestKeyLabels(t *testing.T) {
	tests := []struct {
		kid, vault, key string
	}{
		{"https://myvault.vault.azure.net/keys/disk-key/0123456789abcdef0123456789abcdef", "myvault.vault.azure.net", "disk-key"},
		{"https://MyVault.Vault.Azure.NET/keys/disk-key", "myvault.vault.azure.net", "disk-key"},
		{"https://127.0.0.1:8443/keys/k1/abc/", "127.0.0.1:8443", "k1"},
		{"platform:keys/platform-master/3", "platform", "platform-master"},
		{"platform:keys/", "unknown", "unknown"},
		{"http://vault/keys/k", "unknown", "unknown"},
		{"https://vault/secrets/k", "unknown", "unknown"},
		{"https://vault/keys", "unknown", "unknown"},
		{"", "unknown", "unknown"},
		{"%zz", "unknown", "unknown"},
	}
	for _, tt := range tests {
		vault, key := metrics.KeyLabels(tt.kid)
		if vault != tt.vault || key != tt.key {
			t.Errorf("KeyLabels(%q) = %q, %q, want %q, %q", tt.kid, vault, key, tt.vault, tt.key)
		}
	}
}

// event is one KeyEvent call.
type event struct {
	kind, reason string
	grace        time.Duration
	err          error
}

var errVault = errors.New("vault said no")

func TestKeyStatus(t *testing.T) {
	tests := []struct {
		name   string
		events []event
		want   string // status with value 1; "" means no key_status series
	}{
		{"no events", nil, ""},
		{"check ok", []event{{kind: "check"}}, "ok"},
		{"failed check alone changes nothing", []event{{kind: "check", err: errVault}}, ""},
		{"transient", []event{{kind: "check"}, {kind: "check", err: errVault}, {kind: "transient", reason: "KeyVaultUnreachable", grace: time.Hour, err: errVault}}, "unreachable"},
		{"transient then ok", []event{{kind: "transient", reason: "KeyVaultUnreachable", grace: time.Hour}, {kind: "check"}}, "ok"},
		{"grace ran out", []event{{kind: "transient", reason: "KeyVaultUnreachable"}, {kind: "suspend", reason: "KeyVaultUnreachable", err: errVault}}, "unreachable"},
		{"revoked", []event{{kind: "check"}, {kind: "probe", err: errVault}, {kind: "suspend", reason: "AccessDenied", err: errVault}}, "revoked"},
		{"disabled: the check succeeds but the key is off", []event{{kind: "check"}, {kind: "suspend", reason: "KeyDisabled"}, {kind: "check"}, {kind: "probe"}}, "revoked"},
		{"transient while revoked", []event{{kind: "suspend", reason: "KeyNotFound"}, {kind: "transient", reason: "KeyVaultUnreachable"}}, "revoked"},
		{"resumed", []event{{kind: "suspend", reason: "ForbiddenByRbac"}, {kind: "check"}, {kind: "probe"}, {kind: "resume", reason: "ForbiddenByRbac"}}, "ok"},
		{"failed resume", []event{{kind: "suspend", reason: "ForbiddenByRbac"}, {kind: "resume", reason: "ForbiddenByRbac", err: errVault}}, "revoked"},
		{"expired", []event{{kind: "check"}, {kind: "expired", reason: "KeyExpired"}, {kind: "check"}}, "expired"},
		{"expired stays expired across checks", []event{{kind: "expired", reason: "KeyExpired"}, {kind: "check"}, {kind: "probe"}, {kind: "check"}}, "expired"},
		{"strict expiry suspends", []event{{kind: "check"}, {kind: "expired", reason: "KeyExpired"}, {kind: "suspend", reason: "KeyExpired"}}, "expired"},
		{"expired while revoked", []event{{kind: "suspend", reason: "AccessDenied"}, {kind: "expired", reason: "KeyExpired"}}, "revoked"},
		{"new version is informational", []event{{kind: "check"}, {kind: "new-version", reason: "https://v/keys/k/2"}}, "ok"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := metrics.New()
			for _, e := range tt.events {
				m.KeyEvent("v.vault.azure.net", "k", e.kind, e.reason, e.grace, e.err)
			}
			for _, s := range []string{"ok", "revoked", "unreachable", "expired"} {
				got, ok := value(t, m, "cryptnbd_key_status", map[string]string{"vault": "v.vault.azure.net", "key": "k", "status": s})
				switch {
				case tt.want == "" && ok:
					t.Errorf("key_status{status=%q} = %v, want no series", s, got)
				case tt.want != "" && !ok:
					t.Errorf("key_status{status=%q} missing", s)
				case tt.want != "" && (got == 1) != (s == tt.want):
					t.Errorf("key_status{status=%q} = %v, want status %s", s, got, tt.want)
				}
			}
		})
	}
}

func TestKeyLastSuccessAndGrace(t *testing.T) {
	m := metrics.New()
	l := map[string]string{"vault": "v", "key": "k"}
	before := float64(time.Now().Unix())
	m.KeyEvent("v", "k", "check", "", 0, nil)
	ts := mustValue(t, m, "cryptnbd_key_last_success_timestamp_seconds", l)
	if ts < before || ts > float64(time.Now().Unix()+1) {
		t.Errorf("last success %v, want about now (%v)", ts, before)
	}
	if _, ok := value(t, m, "cryptnbd_key_grace_remaining_seconds", l); ok {
		t.Errorf("grace exported for a healthy key before SetKeyGrace")
	}
	m.SetKeyGrace(time.Hour)
	if got := mustValue(t, m, "cryptnbd_key_grace_remaining_seconds", l); got != 3600 {
		t.Errorf("healthy grace = %v, want the full 3600", got)
	}

	m.KeyEvent("v", "k", "transient", "KeyVaultUnreachable", 20*time.Minute, errVault)
	g := mustValue(t, m, "cryptnbd_key_grace_remaining_seconds", l)
	if g > 1200 || g < 1190 {
		t.Errorf("grace after transient = %v, want just under 1200", g)
	}
	if got := mustValue(t, m, "cryptnbd_key_last_success_timestamp_seconds", l); got != ts {
		t.Errorf("last success moved on a failure: %v, was %v", got, ts)
	}
	m.KeyEvent("v", "k", "suspend", "KeyVaultUnreachable", 0, errVault)
	if got := mustValue(t, m, "cryptnbd_key_grace_remaining_seconds", l); got != 0 {
		t.Errorf("grace while suspended = %v, want 0", got)
	}
	m.KeyEvent("v", "k", "resume", "KeyVaultUnreachable", 0, nil)
	if got := mustValue(t, m, "cryptnbd_key_grace_remaining_seconds", l); got != 3600 {
		t.Errorf("grace after resume = %v, want 3600", got)
	}
}

func TestKeyExpiry(t *testing.T) {
	m := metrics.New()
	l := map[string]string{"vault": "v", "key": "k"}
	status := func() string {
		t.Helper()
		for _, s := range []string{"ok", "revoked", "unreachable", "expired"} {
			if v, _ := value(t, m, "cryptnbd_key_status", map[string]string{"vault": "v", "key": "k", "status": s}); v == 1 {
				return s
			}
		}
		return ""
	}
	m.KeyEvent("v", "k", "check", "", 0, nil)
	exp := time.Unix(1900000000, 0)
	m.KeyExpiry("v", "k", exp)
	if got := mustValue(t, m, "cryptnbd_key_expiry_timestamp_seconds", l); got != 1900000000 {
		t.Errorf("expiry = %v, want 1900000000", got)
	}
	if got := status(); got != "ok" {
		t.Errorf("status with a future expiry = %q, want ok", got)
	}
	m.KeyExpiry("v", "k", time.Now().Add(-time.Minute))
	if got := status(); got != "expired" {
		t.Errorf("status with a past expiry = %q, want expired", got)
	}
	m.KeyExpiry("v", "k", time.Time{}) // the expiry was removed
	if _, ok := value(t, m, "cryptnbd_key_expiry_timestamp_seconds", l); ok {
		t.Errorf("expiry still exported after it was cleared")
	}
	if got := status(); got != "ok" {
		t.Errorf("status after the expiry was cleared = %q, want ok", got)
	}
}

func TestVaultObserverAndUnwraps(t *testing.T) {
	m := metrics.New()
	obs := m.VaultObserver("v", "k")
	obs("get", 200, 30*time.Millisecond)
	obs("get", 200, 40*time.Millisecond)
	obs("unwrapKey", 403, 50*time.Millisecond)
	obs("get", 0, 10*time.Second)
	for _, c := range []struct {
		op, code string
		want     float64
	}{{"get", "200", 2}, {"unwrapKey", "403", 1}, {"get", "0", 1}} {
		if got := mustValue(t, m, "cryptnbd_keyvault_requests_total", map[string]string{"vault": "v", "key": "k", "op": c.op, "code": c.code}); got != c.want {
			t.Errorf("keyvault_requests_total{op=%s,code=%s} = %v, want %v", c.op, c.code, got, c.want)
		}
	}
	if got := mustValue(t, m, "cryptnbd_keyvault_request_duration_seconds", map[string]string{"vault": "v", "key": "k", "op": "get"}); got != 3 {
		t.Errorf("get duration observations = %v, want 3", got)
	}
	m.DEKUnwrapped("platform", "platform-master")
	m.DEKUnwrapped("platform", "platform-master")
	m.DEKUnwrapped("v", "k")
	if got := mustValue(t, m, "cryptnbd_dek_unwraps_total", map[string]string{"vault": "platform", "key": "platform-master"}); got != 2 {
		t.Errorf("platform unwraps = %v, want 2", got)
	}
}
