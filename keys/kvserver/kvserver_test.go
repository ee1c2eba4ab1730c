package kvserver_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"errors"
	"hash"
	"math/big"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/runtime"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/cryptnbd/cryptnbd/keys/kvserver"
	"github.com/cryptnbd/cryptnbd/keys/kvserver/kvservertest"
)

// recorder is a transport that records every response status.
type recorder struct {
	base policy.Transporter
	mu   sync.Mutex
	got  []int
}

func (r *recorder) Do(req *http.Request) (*http.Response, error) {
	resp, err := r.base.Do(req)
	if err == nil {
		r.mu.Lock()
		r.got = append(r.got, resp.StatusCode)
		r.mu.Unlock()
	}
	return resp, err
}

func (r *recorder) statuses() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]int(nil), r.got...)
}

func (r *recorder) reset() {
	r.mu.Lock()
	r.got = nil
	r.mu.Unlock()
}

// vaultError is what a test sees of a Key Vault error.
type vaultError struct {
	Status int
	Code   string
	Inner  string
}

// errorOf extracts status, outer code and innererror.code from err, which
// must be an *azcore.ResponseError.
func errorOf(t *testing.T, err error) vaultError {
	t.Helper()
	var re *azcore.ResponseError
	if !errors.As(err, &re) {
		t.Fatalf("error %v is not an *azcore.ResponseError", err)
	}
	body, perr := runtime.Payload(re.RawResponse)
	if perr != nil {
		t.Fatalf("read error body: %v", perr)
	}
	var eb struct {
		Error struct {
			Code       string `json:"code"`
			InnerError struct {
				Code string `json:"code"`
			} `json:"innererror"`
		} `json:"error"`
	}
	if err := json.Unmarshal(body, &eb); err != nil {
		t.Fatalf("error body %q: %v", body, err)
	}
	if eb.Error.Code != re.ErrorCode {
		t.Errorf("body code %q, ResponseError.ErrorCode %q", eb.Error.Code, re.ErrorCode)
	}
	return vaultError{re.StatusCode, re.ErrorCode, eb.Error.InnerError.Code}
}

var kidRE = regexp.MustCompile(`^https://127\.0\.0\.1:[0-9]+/keys/([0-9A-Za-z-]+)/([0-9a-f]{32})$`)

func publicKey(t *testing.T, k *azkeys.JSONWebKey) *rsa.PublicKey {
	t.Helper()
	if len(k.N) == 0 || len(k.E) == 0 {
		t.Fatalf("key has no n or e")
	}
	return &rsa.PublicKey{N: new(big.Int).SetBytes(k.N), E: int(new(big.Int).SetBytes(k.E).Int64())}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestVault drives every operation and error through azkeys v1.5.0 with
// azidentity's ManagedIdentityCredential against the server's token
// endpoint, then restarts the server and checks that everything persisted.
func TestVault(t *testing.T) {
	ctx := ctxT(t)
	in := kvservertest.Start(t, kvserver.Options{PurgeProtection: true, PageSize: 2})
	rec := &recorder{base: in.ClientOptions.Transport}
	adminCred := in.ManagedIdentityCredential(t, "")
	co := azkeys.ClientOptions{}
	co.Transport = rec
	c := in.KeysClient(t, adminCred, &co)

	// The first request is answered 401 with the challenge, then retried
	// with a token.
	exp := time.Now().Add(24 * time.Hour).Truncate(time.Second)
	created, err := c.CreateKey(ctx, "disk-kek", azkeys.CreateKeyParameters{
		Kty:     to.Ptr(azkeys.KeyTypeRSA),
		KeySize: to.Ptr[int32](2048),
		KeyOps:  []*azkeys.KeyOperation{to.Ptr(azkeys.KeyOperationWrapKey), to.Ptr(azkeys.KeyOperationUnwrapKey)},
		KeyAttributes: &azkeys.KeyAttributes{
			Enabled: to.Ptr(true),
			Expires: &exp,
		},
		Tags: map[string]*string{"purpose": to.Ptr("test")},
	}, nil)
	if err != nil {
		t.Fatalf("CreateKey: %v", err)
	}
	if got, want := rec.statuses(), []int{401, 200}; !slices.Equal(got, want) {
		t.Errorf("statuses of first request: got %v, want %v", got, want)
	}
	kid := string(*created.Key.KID)
	m := kidRE.FindStringSubmatch(kid)
	if m == nil || m[1] != "disk-kek" {
		t.Fatalf("kid %q does not match %v", kid, kidRE)
	}
	v1 := created.Key.KID.Version()
	if created.Key.KID.Name() != "disk-kek" || v1 != m[2] {
		t.Errorf("KID.Name() %q, Version() %q", created.Key.KID.Name(), v1)
	}
	a := created.Attributes
	switch {
	case *a.RecoveryLevel != "Recoverable" || *a.RecoverableDays != 90:
		t.Errorf("recovery %s/%d, want Recoverable/90", *a.RecoveryLevel, *a.RecoverableDays)
	case !a.Expires.Equal(exp):
		t.Errorf("exp %v, want %v", a.Expires, exp)
	case a.Created == nil || time.Since(*a.Created) > time.Minute:
		t.Errorf("created %v", a.Created)
	case *created.Tags["purpose"] != "test":
		t.Errorf("tags %v", created.Tags)
	case len(created.Key.KeyOps) != 2 || *created.Key.KeyOps[0] != azkeys.KeyOperationWrapKey:
		t.Errorf("key_ops %v", created.Key.KeyOps)
	case *created.Key.Kty != azkeys.KeyTypeRSA:
		t.Errorf("kty %v", *created.Key.Kty)
	}
	pub := publicKey(t, created.Key)
	if pub.N.BitLen() != 2048 || pub.E != 65537 {
		t.Errorf("public key %d bits, e=%d", pub.N.BitLen(), pub.E)
	}

	// Every wrap algorithm round-trips, and a DEK wrapped locally with the
	// returned public key unwraps on the server.
	dek := bytes.Repeat([]byte{0x5a}, 64)
	algs := []struct {
		alg azkeys.EncryptionAlgorithm
		h   hash.Hash
	}{
		{azkeys.EncryptionAlgorithmRSAOAEP256, sha256.New()},
		{azkeys.EncryptionAlgorithmRSAOAEP, sha1.New()},
		{azkeys.EncryptionAlgorithmRSA15, nil},
	}
	for _, tc := range algs {
		t.Run(string(tc.alg), func(t *testing.T) {
			w, err := c.WrapKey(ctx, "disk-kek", "", azkeys.KeyOperationParameters{Algorithm: to.Ptr(tc.alg), Value: dek}, nil)
			if err != nil {
				t.Fatalf("WrapKey: %v", err)
			}
			if string(*w.KID) != kid || len(w.Result) != 256 {
				t.Errorf("wrap kid %q, %d bytes", *w.KID, len(w.Result))
			}
			u, err := c.UnwrapKey(ctx, "disk-kek", v1, azkeys.KeyOperationParameters{Algorithm: to.Ptr(tc.alg), Value: w.Result}, nil)
			if err != nil {
				t.Fatalf("UnwrapKey: %v", err)
			}
			if !bytes.Equal(u.Result, dek) {
				t.Errorf("unwrap of server wrap: got %x, want %x", u.Result, dek)
			}
			var local []byte
			if tc.h != nil {
				local, err = rsa.EncryptOAEP(tc.h, rand.Reader, pub, dek, nil)
			} else {
				local, err = rsa.EncryptPKCS1v15(rand.Reader, pub, dek)
			}
			if err != nil {
				t.Fatal(err)
			}
			u, err = c.UnwrapKey(ctx, "disk-kek", "", azkeys.KeyOperationParameters{Algorithm: to.Ptr(tc.alg), Value: local}, nil)
			if err != nil {
				t.Fatalf("UnwrapKey of local wrap: %v", err)
			}
			if !bytes.Equal(u.Result, dek) {
				t.Errorf("unwrap of local wrap: got %x, want %x", u.Result, dek)
			}
		})
	}

	// More versions; the latest is the newest; versions page by two.
	second, err := c.CreateKey(ctx, "disk-kek", azkeys.CreateKeyParameters{Kty: to.Ptr(azkeys.KeyTypeRSA)}, nil)
	if err != nil {
		t.Fatalf("CreateKey second version: %v", err)
	}
	v2 := second.Key.KID.Version()
	latest, err := c.GetKey(ctx, "disk-kek", "", nil)
	if err != nil {
		t.Fatalf("GetKey latest: %v", err)
	}
	if latest.Key.KID.Version() != v2 {
		t.Errorf("latest version %s, want %s", latest.Key.KID.Version(), v2)
	}
	got1, err := c.GetKey(ctx, "disk-kek", v1, nil)
	if err != nil {
		t.Fatalf("GetKey v1: %v", err)
	}
	if got1.Key.KID.Version() != v1 || publicKey(t, got1.Key).N.Cmp(pub.N) != 0 {
		t.Errorf("GetKey v1 returned another key")
	}

	// Rotation policy: default, then set, then rotate applies expiryTime.
	rp, err := c.GetKeyRotationPolicy(ctx, "disk-kek", nil)
	if err != nil {
		t.Fatalf("GetKeyRotationPolicy: %v", err)
	}
	if len(rp.LifetimeActions) != 1 || *rp.LifetimeActions[0].Action.Type != azkeys.KeyRotationPolicyActionNotify {
		t.Errorf("default rotation policy %+v", rp.KeyRotationPolicy)
	}
	_, err = c.UpdateKeyRotationPolicy(ctx, "disk-kek", azkeys.KeyRotationPolicy{
		LifetimeActions: []*azkeys.LifetimeAction{{
			Action:  &azkeys.LifetimeActionType{Type: to.Ptr(azkeys.KeyRotationPolicyActionRotate)},
			Trigger: &azkeys.LifetimeActionTrigger{TimeAfterCreate: to.Ptr("P30D")},
		}},
		Attributes: &azkeys.KeyRotationPolicyAttributes{ExpiryTime: to.Ptr("P90D")},
	}, nil)
	if err != nil {
		t.Fatalf("UpdateKeyRotationPolicy: %v", err)
	}
	rp, err = c.GetKeyRotationPolicy(ctx, "disk-kek", nil)
	if err != nil {
		t.Fatalf("GetKeyRotationPolicy: %v", err)
	}
	if *rp.Attributes.ExpiryTime != "P90D" || *rp.LifetimeActions[0].Action.Type != azkeys.KeyRotationPolicyActionRotate ||
		*rp.LifetimeActions[0].Trigger.TimeAfterCreate != "P30D" || rp.Attributes.Created == nil {
		t.Errorf("rotation policy after PUT: %+v", rp.KeyRotationPolicy)
	}
	rotated, err := c.RotateKey(ctx, "disk-kek", nil)
	if err != nil {
		t.Fatalf("RotateKey: %v", err)
	}
	v3 := rotated.Key.KID.Version()
	if v3 == v2 || rotated.Attributes.Expires == nil ||
		rotated.Attributes.Expires.Sub(time.Now().AddDate(0, 0, 90)).Abs() > time.Hour {
		t.Errorf("rotated version %s exp %v", v3, rotated.Attributes.Expires)
	}
	if publicKey(t, rotated.Key).N.BitLen() != 2048 || len(rotated.Key.KeyOps) != 6 {
		t.Errorf("rotated key: %d bits, ops %d", publicKey(t, rotated.Key).N.BitLen(), len(rotated.Key.KeyOps))
	}

	rec.reset()
	var versions []string
	pager := c.NewListKeyPropertiesVersionsPager("disk-kek", nil)
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			t.Fatalf("versions page: %v", err)
		}
		for _, it := range page.Value {
			versions = append(versions, it.KID.Version())
		}
	}
	if want := []string{v1, v2, v3}; !slices.Equal(versions, want) {
		t.Errorf("versions %v, want %v", versions, want)
	}
	if n := len(rec.statuses()); n != 2 {
		t.Errorf("versions took %d requests, want 2 pages", n)
	}
	var names []string
	for kp := c.NewListKeyPropertiesPager(nil); kp.More(); {
		page, err := kp.NextPage(ctx)
		if err != nil {
			t.Fatalf("keys page: %v", err)
		}
		for _, it := range page.Value {
			names = append(names, it.KID.Name())
		}
	}
	if !slices.Equal(names, []string{"disk-kek"}) {
		t.Errorf("keys %v", names)
	}

	// Expired and not-yet-valid versions: wrap refused, unwrap works.
	wrapped1, err := c.WrapKey(ctx, "disk-kek", v1, azkeys.KeyOperationParameters{Algorithm: to.Ptr(azkeys.EncryptionAlgorithmRSAOAEP256), Value: dek}, nil)
	if err != nil {
		t.Fatalf("WrapKey v1: %v", err)
	}
	wrapOp := func(version string) error {
		_, err := c.WrapKey(ctx, "disk-kek", version, azkeys.KeyOperationParameters{Algorithm: to.Ptr(azkeys.EncryptionAlgorithmRSAOAEP256), Value: dek}, nil)
		return err
	}
	unwrapOp := func(version string) error {
		u, err := c.UnwrapKey(ctx, "disk-kek", version, azkeys.KeyOperationParameters{Algorithm: to.Ptr(azkeys.EncryptionAlgorithmRSAOAEP256), Value: wrapped1.Result}, nil)
		if err == nil && !bytes.Equal(u.Result, dek) {
			t.Errorf("unwrap %s: wrong DEK", version)
		}
		return err
	}
	update := func(attrs azkeys.KeyAttributes, ops ...azkeys.KeyOperation) {
		t.Helper()
		p := azkeys.UpdateKeyParameters{KeyAttributes: &attrs}
		for _, op := range ops {
			p.KeyOps = append(p.KeyOps, to.Ptr(op))
		}
		if _, err := c.UpdateKey(ctx, "disk-kek", v1, p, nil); err != nil {
			t.Fatalf("UpdateKey: %v", err)
		}
	}
	past, future := time.Now().Add(-time.Hour), time.Now().Add(time.Hour)
	update(azkeys.KeyAttributes{Expires: &past})
	if err := unwrapOp(v1); err != nil {
		t.Errorf("unwrap with an expired version: %v", err)
	}
	if err := wrapOp(v1); err == nil {
		t.Errorf("wrap with an expired version succeeded")
	} else if got, want := errorOf(t, err), (vaultError{403, "Forbidden", "KeyExpired"}); got != want {
		t.Errorf("wrap with an expired version: got %+v, want %+v", got, want)
	}
	update(azkeys.KeyAttributes{Expires: &future, NotBefore: &future})
	if err := unwrapOp(v1); err != nil {
		t.Errorf("unwrap with a not-yet-valid version: %v", err)
	}
	if err := wrapOp(v1); err == nil {
		t.Errorf("wrap with a not-yet-valid version succeeded")
	} else if got, want := errorOf(t, err), (vaultError{403, "Forbidden", "KeyNotYetValid"}); got != want {
		t.Errorf("wrap with a not-yet-valid version: got %+v, want %+v", got, want)
	}
	got1, err = c.GetKey(ctx, "disk-kek", v1, nil)
	if err != nil || !got1.Attributes.NotBefore.Equal(future.Truncate(time.Second)) || got1.Attributes.Updated.Before(*got1.Attributes.Created) {
		t.Errorf("GetKey after update: %v %+v", err, got1.Attributes)
	}

	// Errors, each read through innererror.code.
	adm := in.Admin
	des := in.NewPrincipal(t, "des-identity")
	desClient := in.KeysClient(t, in.ManagedIdentityCredential(t, des.ObjectID), nil)
	errCases := []struct {
		name  string
		setup func()
		op    func() error
		want  vaultError
	}{
		{"disabled version unwrap", func() { update(azkeys.KeyAttributes{Enabled: to.Ptr(false), NotBefore: &past}) },
			func() error { return unwrapOp(v1) }, vaultError{403, "Forbidden", "KeyDisabled"}},
		{"disabled version wrap", nil,
			func() error { return wrapOp(v1) }, vaultError{403, "Forbidden", "KeyDisabled"}},
		{"operation not in key_ops", func() { update(azkeys.KeyAttributes{Enabled: to.Ptr(true)}, azkeys.KeyOperationWrapKey) },
			func() error { return unwrapOp(v1) }, vaultError{403, "Forbidden", "KeyOperationForbidden"}},
		{"unknown key", nil,
			func() error { _, err := c.GetKey(ctx, "no-such-key", "", nil); return err }, vaultError{404, "KeyNotFound", ""}},
		{"unknown version", nil,
			func() error { _, err := c.GetKey(ctx, "disk-kek", "00000000000000000000000000000000", nil); return err }, vaultError{404, "KeyNotFound", ""}},
		{"unwrap with unknown key", nil,
			func() error {
				_, err := c.UnwrapKey(ctx, "nope", "", azkeys.KeyOperationParameters{Algorithm: to.Ptr(azkeys.EncryptionAlgorithmRSAOAEP256), Value: wrapped1.Result}, nil)
				return err
			}, vaultError{404, "KeyNotFound", ""}},
		{"bad key size", nil,
			func() error {
				_, err := c.CreateKey(ctx, "small", azkeys.CreateKeyParameters{Kty: to.Ptr(azkeys.KeyTypeRSA), KeySize: to.Ptr[int32](1024)}, nil)
				return err
			}, vaultError{400, "BadParameter", ""}},
		{"EC key type", nil,
			func() error {
				_, err := c.CreateKey(ctx, "ec", azkeys.CreateKeyParameters{Kty: to.Ptr(azkeys.KeyTypeEC)}, nil)
				return err
			}, vaultError{400, "BadParameter", ""}},
		{"no policy: get", nil,
			func() error { _, err := desClient.GetKey(ctx, "disk-kek", "", nil); return err }, vaultError{403, "Forbidden", "AccessDenied"}},
		{"policy lacks create", func() {
			if err := adm.SetPolicy(ctx, des.ObjectID, []string{"GET", "wrapkey", "UnwrapKey"}); err != nil {
				t.Fatalf("SetPolicy: %v", err)
			}
		}, func() error {
			_, err := desClient.CreateKey(ctx, "des-key", azkeys.CreateKeyParameters{Kty: to.Ptr(azkeys.KeyTypeRSA)}, nil)
			return err
		}, vaultError{403, "Forbidden", "AccessDenied"}},
		{"policy lacks list", nil,
			func() error {
				_, err := desClient.NewListKeyPropertiesVersionsPager("disk-kek", nil).NextPage(ctx)
				return err
			},
			vaultError{403, "Forbidden", "AccessDenied"}},
	}
	for _, tc := range errCases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.setup != nil {
				tc.setup()
			}
			err := tc.op()
			if err == nil {
				t.Fatalf("succeeded, want %+v", tc.want)
			}
			if got := errorOf(t, err); got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
	update(azkeys.KeyAttributes{Enabled: to.Ptr(true)}, azkeys.KeyOperationWrapKey, azkeys.KeyOperationUnwrapKey)

	// The DES identity with get/wrapKey/unwrapKey works, then loses access.
	if _, err := desClient.GetKey(ctx, "disk-kek", "", nil); err != nil {
		t.Errorf("DES GetKey with policy: %v", err)
	}
	desWrapped, err := desClient.WrapKey(ctx, "disk-kek", v3, azkeys.KeyOperationParameters{Algorithm: to.Ptr(azkeys.EncryptionAlgorithmRSAOAEP256), Value: dek}, nil)
	if err != nil {
		t.Fatalf("DES WrapKey: %v", err)
	}
	if u, err := desClient.UnwrapKey(ctx, "disk-kek", v3, azkeys.KeyOperationParameters{Algorithm: to.Ptr(azkeys.EncryptionAlgorithmRSAOAEP256), Value: desWrapped.Result}, nil); err != nil || !bytes.Equal(u.Result, dek) {
		t.Errorf("DES UnwrapKey: %v", err)
	}
	pols, err := adm.Policies(ctx)
	if err != nil || !slices.Equal(pols[des.ObjectID], []string{"get", "unwrapkey", "wrapkey"}) {
		t.Errorf("Policies: %v %v", pols, err)
	}
	if err := adm.DeletePolicy(ctx, des.ObjectID); err != nil {
		t.Fatalf("DeletePolicy: %v", err)
	}
	if _, err := desClient.UnwrapKey(ctx, "disk-kek", v3, azkeys.KeyOperationParameters{Algorithm: to.Ptr(azkeys.EncryptionAlgorithmRSAOAEP256), Value: desWrapped.Result}, nil); err == nil {
		t.Errorf("DES UnwrapKey after DeletePolicy succeeded")
	} else if got := errorOf(t, err); got != (vaultError{403, "Forbidden", "AccessDenied"}) {
		t.Errorf("DES UnwrapKey after DeletePolicy: %+v", got)
	}
	if err := adm.SetPolicy(ctx, des.ObjectID, []string{"unwrapKey"}); err != nil {
		t.Fatalf("SetPolicy: %v", err)
	}

	// Soft delete, refused purge, 409 on create, recover.
	del, err := c.DeleteKey(ctx, "disk-kek", nil)
	if err != nil {
		t.Fatalf("DeleteKey: %v", err)
	}
	if *del.RecoveryID != in.URL+"/deletedkeys/disk-kek" || del.ScheduledPurgeDate.Sub(*del.DeletedDate) != 90*24*time.Hour ||
		del.Key.KID.Version() != v3 {
		t.Errorf("DeletedKey: recoveryId %s, deleted %v, purge %v, kid %s", *del.RecoveryID, del.DeletedDate, del.ScheduledPurgeDate, *del.Key.KID)
	}
	for _, tc := range []struct {
		name string
		op   func() error
		want vaultError
	}{
		{"get deleted key", func() error { _, err := c.GetKey(ctx, "disk-kek", "", nil); return err }, vaultError{404, "KeyNotFound", ""}},
		{"unwrap with deleted key", func() error { return unwrapOp(v1) }, vaultError{404, "KeyNotFound", ""}},
		{"create over deleted", func() error {
			_, err := c.CreateKey(ctx, "disk-kek", azkeys.CreateKeyParameters{Kty: to.Ptr(azkeys.KeyTypeRSA)}, nil)
			return err
		}, vaultError{409, "Conflict", "ObjectIsDeletedButRecoverable"}},
		{"purge under purge protection", func() error { _, err := c.PurgeDeletedKey(ctx, "disk-kek", nil); return err }, vaultError{403, "Forbidden", ""}},
		{"get deleted of a live name", func() error { _, err := c.GetDeletedKey(ctx, "no-such-key", nil); return err }, vaultError{404, "KeyNotFound", ""}},
		{"recover without permission", func() error { _, err := desClient.RecoverDeletedKey(ctx, "disk-kek", nil); return err }, vaultError{403, "Forbidden", "AccessDenied"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.op()
			if err == nil {
				t.Fatalf("succeeded, want %+v", tc.want)
			}
			if got := errorOf(t, err); got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
	gd, err := c.GetDeletedKey(ctx, "disk-kek", nil)
	if err != nil || gd.Key.KID.Version() != v3 || !gd.DeletedDate.Equal(*del.DeletedDate) {
		t.Errorf("GetDeletedKey: %v", err)
	}
	dp, err := c.NewListDeletedKeyPropertiesPager(nil).NextPage(ctx)
	if err != nil || len(dp.Value) != 1 || dp.Value[0].KID.Name() != "disk-kek" {
		t.Errorf("deleted keys: %v", err)
	}
	rcv, err := c.RecoverDeletedKey(ctx, "disk-kek", nil)
	if err != nil {
		t.Fatalf("RecoverDeletedKey: %v", err)
	}
	if rcv.Key.KID.Version() != v3 {
		t.Errorf("recovered latest %s, want %s", rcv.Key.KID.Version(), v3)
	}
	if err := unwrapOp(v1); err != nil {
		t.Errorf("unwrap after recover: %v", err)
	}

	// Restart: keys, versions, attributes, policies and identities survive,
	// and old tokens stay valid (MSAL caches them process-wide).
	in.Restart(t)
	if in.Server.AdminObjectID() != in.Config.AdminObjectID {
		t.Errorf("admin changed across restart")
	}
	if err := unwrapOp(v1); err != nil {
		t.Errorf("unwrap after restart: %v", err)
	}
	if u, err := desClient.UnwrapKey(ctx, "disk-kek", v3, azkeys.KeyOperationParameters{Algorithm: to.Ptr(azkeys.EncryptionAlgorithmRSAOAEP256), Value: desWrapped.Result}, nil); err != nil || !bytes.Equal(u.Result, dek) {
		t.Errorf("DES unwrap after restart: %v", err)
	}
	got1, err = c.GetKey(ctx, "disk-kek", v1, nil)
	if err != nil || !got1.Attributes.NotBefore.Equal(past.Truncate(time.Second)) || *got1.Tags["purpose"] != "test" {
		t.Errorf("GetKey v1 after restart: %v", err)
	}
	rp, err = c.GetKeyRotationPolicy(ctx, "disk-kek", nil)
	if err != nil || *rp.Attributes.ExpiryTime != "P90D" {
		t.Errorf("rotation policy after restart: %v", err)
	}
	checkDataDir(t, in.Options.DataDir)
}

// checkDataDir checks file modes and that state.json holds no usable
// private key.
func checkDataDir(t *testing.T, dir string) {
	t.Helper()
	for name, want := range map[string]os.FileMode{
		"state.json": 0o600, "secrets.json": 0o600, "admin.json": 0o600, "ca-key.pem": 0o600, "server-key.pem": 0o600, "ca.pem": 0o644,
	} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Errorf("%v", err)
			continue
		}
		if got := fi.Mode().Perm(); got != want {
			t.Errorf("%s mode %o, want %o", name, got, want)
		}
	}
	b, err := os.ReadFile(filepath.Join(dir, "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Keys map[string]struct {
			Versions []struct {
				Sealed []byte `json:"sealed"`
			} `json:"versions"`
		} `json:"keys"`
	}
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, k := range st.Keys {
		for _, v := range k.Versions {
			n++
			if len(v.Sealed) < 1000 {
				t.Errorf("sealed key only %d bytes", len(v.Sealed))
			}
			for off := 0; off < 40 && off < len(v.Sealed); off++ {
				if _, err := x509.ParsePKCS1PrivateKey(v.Sealed[off:]); err == nil {
					t.Errorf("state.json holds a plaintext private key")
				}
			}
		}
	}
	if n != 3 {
		t.Errorf("state.json has %d key versions, want 3", n)
	}
}
