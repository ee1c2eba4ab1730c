package keys

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"syscall"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/runtime"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
)

// ErrRevoked matches (errors.Is) every *VaultError that Classify puts in
// ClassRevoked: the customer took the key, or our access to it, away.
// Classify also counts the platform provider's ErrKeyDisabled and
// ErrKeyNotFound as revoked.
var ErrRevoked = errors.New("keys: key access revoked")

// errSDKPanic marks an SDK call that panicked (a malformed challenge header
// makes azkeys index out of range).
var errSDKPanic = errors.New("keys: key vault client panicked")

// Class is what an error means for a disk whose key lives in Key Vault.
type Class int

const (
	// ClassOK is a nil error.
	ClassOK Class = iota
	// ClassRevoked is a definite answer from the vault that the key version
	// may not be used: disabled, deleted, or access denied. Disks suspend at
	// once.
	ClassRevoked
	// ClassTransient is a failure that may heal by itself: throttling,
	// server errors, timeouts, network and token failures. Disks keep
	// serving for a grace period.
	ClassTransient
	// ClassOther is anything else: bad configuration, a malformed request or
	// response, a wrapped secret that does not open.
	ClassOther
)

func (c Class) String() string {
	switch c {
	case ClassOK:
		return "OK"
	case ClassRevoked:
		return "Revoked"
	case ClassTransient:
		return "Transient"
	}
	return "Other"
}

// Key Vault error codes (error.code / error.innererror.code) that mean
// access to the key version was taken away. KeyOperationForbidden is the
// key's key_ops no longer allowing the operation, which cuts a disk off as
// surely as a removed permission does.
var revokedInner = map[string]bool{
	"KeyDisabled":           true,
	"AccessDenied":          true,
	"ForbiddenByRbac":       true,
	"ForbiddenByFirewall":   true,
	"ForbiddenByPolicy":     true,
	"KeyOperationForbidden": true,
}

// codeKeyDisabled is the code VaultError carries when a GET showed the
// version with enabled: false.
const codeKeyDisabled = "KeyDisabled"

// VaultError is a failed Key Vault operation. Status is the HTTP status of
// the final response (0 when there was none); Code and InnerCode are
// error.code and error.innererror.code from its body. Err is the underlying
// SDK, network or credential error.
type VaultError struct {
	Op         string // get, wrapKey, unwrapKey, versions, getLatest
	KeyID      string
	Status     int
	Code       string
	InnerCode  string
	RetryAfter time.Duration // from Retry-After / x-ms-retry-after-ms, if any
	Err        error
}

func (e *VaultError) Error() string {
	s := "keyvault: " + e.Op + " " + e.KeyID + ": "
	if e.Status == 0 {
		if e.Err == nil {
			return s + e.Code
		}
		return s + e.Err.Error()
	}
	s += strconv.Itoa(e.Status) + " " + e.Code
	if e.InnerCode != "" {
		s += "/" + e.InnerCode
	}
	return s
}

func (e *VaultError) Unwrap() error { return e.Err }

// Is makes errors.Is report ErrRevoked for revoked-class errors,
// ErrKeyDisabled and ErrKeyNotFound for those conditions, and ErrUnwrap for
// an unwrapKey the vault refused as malformed (400: the wrapped secret is not
// from this key version).
func (e *VaultError) Is(target error) bool {
	switch target {
	case ErrRevoked:
		return e.class() == ClassRevoked
	case ErrKeyDisabled:
		return e.InnerCode == codeKeyDisabled || e.Code == codeKeyDisabled
	case ErrKeyNotFound:
		return e.Status == http.StatusNotFound && e.Code == "KeyNotFound"
	case ErrUnwrap:
		return e.Op == "unwrapKey" && e.Status == http.StatusBadRequest
	}
	return false
}

// Reason is the short cause recorded when a disk is suspended: the inner
// code if any, else the outer code, else "KeyVaultUnreachable" for errors
// without a response.
func (e *VaultError) Reason() string {
	switch {
	case e.InnerCode != "":
		return e.InnerCode
	case e.Status == http.StatusForbidden:
		return "AccessDenied" // 403 Forbidden without an inner code
	case e.Code != "":
		return e.Code
	}
	return "KeyVaultUnreachable"
}

func (e *VaultError) class() Class {
	switch s := e.Status; {
	case s == 0:
		if e.Code == codeKeyDisabled {
			return ClassRevoked
		}
		return classifyPlain(e.Err)
	case s == http.StatusForbidden:
		if e.InnerCode == "" || revokedInner[e.InnerCode] {
			return ClassRevoked
		}
		return ClassOther // KeyExpired, KeyNotYetValid (wrap only), purge protection...
	case s == http.StatusNotFound:
		if e.Code == "KeyNotFound" || e.InnerCode == "KeyNotFound" {
			return ClassRevoked
		}
		return ClassOther
	case s == http.StatusUnauthorized, s == http.StatusRequestTimeout, s == http.StatusTooManyRequests, s >= 500:
		// 401 after the challenge round means the token was refused:
		// treated like a token failure.
		return ClassTransient
	}
	return ClassOther
}

// Classify says what err means for a disk: see Class. It looks only at
// types, HTTP statuses and error codes, never at message text.
func Classify(err error) Class {
	if err == nil {
		return ClassOK
	}
	var ve *VaultError
	if errors.As(err, &ve) {
		return ve.class()
	}
	var re *azcore.ResponseError
	if errors.As(err, &re) {
		return newVaultError("", "", err).class()
	}
	return classifyPlain(err)
}

// tokenError marks a failure of the credential, so it is recognised by type
// wherever the SDK's wrapping puts it.
type tokenError struct{ err error }

func (e *tokenError) Error() string { return "keyvault: token: " + e.err.Error() }
func (e *tokenError) Unwrap() error { return e.err }

// classifyPlain classifies an error that carries no vault response.
func classifyPlain(err error) Class {
	if err == nil {
		return ClassOK
	}
	if errors.Is(err, ErrKeyDisabled) || errors.Is(err, ErrKeyNotFound) || errors.Is(err, ErrRevoked) {
		return ClassRevoked
	}
	if errors.Is(err, errSDKPanic) {
		return ClassOther
	}
	// Certificate problems are configuration, though url.Error makes them
	// look like network errors.
	var (
		unknownCA  x509.UnknownAuthorityError
		hostErr    x509.HostnameError
		invalidErr x509.CertificateInvalidError
		verifyErr  *tls.CertificateVerificationError
	)
	if errors.As(err, &unknownCA) || errors.As(err, &hostErr) || errors.As(err, &invalidErr) || errors.As(err, &verifyErr) {
		return ClassOther
	}
	var te *tokenError
	var afe *azidentity.AuthenticationFailedError
	var are *azidentity.AuthenticationRequiredError
	if errors.As(err, &te) || errors.As(err, &afe) || errors.As(err, &are) {
		return ClassTransient
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, syscall.EHOSTUNREACH) || errors.Is(err, syscall.ENETUNREACH) || errors.Is(err, syscall.ETIMEDOUT) {
		return ClassTransient
	}
	var opErr *net.OpError
	var dnsErr *net.DNSError
	if errors.As(err, &opErr) || errors.As(err, &dnsErr) {
		return ClassTransient
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return ClassTransient
	}
	return ClassOther
}

// errorBody is Key Vault's error response.
type errorBody struct {
	Error struct {
		Code       string `json:"code"`
		InnerError *struct {
			Code string `json:"code"`
		} `json:"innererror"`
	} `json:"error"`
}

// newVaultError turns an SDK error into a *VaultError, reading the status,
// codes and Retry-After from the response if there is one.
func newVaultError(op, kid string, err error) *VaultError {
	ve := &VaultError{Op: op, KeyID: kid, Err: err}
	var re *azcore.ResponseError
	if !errors.As(err, &re) {
		return ve
	}
	ve.Status, ve.Code = re.StatusCode, re.ErrorCode
	if re.RawResponse == nil {
		return ve
	}
	if body, perr := runtime.Payload(re.RawResponse); perr == nil && len(body) > 0 {
		var b errorBody
		if json.Unmarshal(body, &b) == nil {
			if b.Error.Code != "" {
				ve.Code = b.Error.Code
			}
			if b.Error.InnerError != nil {
				ve.InnerCode = b.Error.InnerError.Code
			}
		}
	}
	ve.RetryAfter = retryAfter(re.RawResponse.Header, time.Now())
	return ve
}

// retryAfter reads x-ms-retry-after-ms, retry-after-ms or Retry-After
// (seconds or an HTTP date).
func retryAfter(h http.Header, now time.Time) time.Duration {
	for _, name := range []string{"x-ms-retry-after-ms", "retry-after-ms"} {
		if v := h.Get(name); v != "" {
			if ms, err := strconv.ParseInt(v, 10, 64); err == nil && ms > 0 {
				return time.Duration(ms) * time.Millisecond
			}
		}
	}
	v := h.Get("Retry-After")
	if v == "" {
		return 0
	}
	if s, err := strconv.ParseInt(v, 10, 64); err == nil && s > 0 {
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

// panicError is the error an SDK panic becomes.
func panicError(v any) error { return fmt.Errorf("%w: %v", errSDKPanic, v) }
