package kvserver

import (
	"encoding/json"
	"net/http"
	"strconv"
)

// kvError is a Key Vault error response.
type kvError struct {
	status       int
	code         string // outer error.code
	inner        string // error.innererror.code; empty for none
	msg          string
	retryAfter   int // seconds, for 429: Retry-After
	retryAfterMS int // for 429: x-ms-retry-after-ms, which azcore prefers
}

func (e *kvError) Error() string { return e.code + ": " + e.msg }

type errorBody struct {
	Error errorDetail `json:"error"`
}

type errorDetail struct {
	Code       string       `json:"code"`
	Message    string       `json:"message"`
	InnerError *innerDetail `json:"innererror,omitempty"`
}

type innerDetail struct {
	Code string `json:"code"`
}

func writeError(w http.ResponseWriter, e *kvError) {
	body := errorBody{Error: errorDetail{Code: e.code, Message: e.msg}}
	if e.inner != "" {
		body.Error.InnerError = &innerDetail{Code: e.inner}
	}
	if e.retryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(e.retryAfter))
	}
	if e.retryAfterMS > 0 {
		w.Header().Set("x-ms-retry-after-ms", strconv.Itoa(e.retryAfterMS))
	}
	writeJSON(w, e.status, body)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status, b = http.StatusInternalServerError, []byte(`{"error":{"code":"InternalError","message":"encode response"}}`)
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(status)
	w.Write(b)
}

func badParameter(msg string) *kvError {
	return &kvError{status: http.StatusBadRequest, code: "BadParameter", msg: msg}
}

func keyNotFound(name string) *kvError {
	return &kvError{status: http.StatusNotFound, code: "KeyNotFound",
		msg: "A key with (name/id) " + name + " was not found in this key vault. If you recently deleted this key you may be able to recover it using the correct recovery command."}
}

func deletedKeyNotFound(name string) *kvError {
	return &kvError{status: http.StatusNotFound, code: "KeyNotFound", msg: "Deleted Key not found: " + name}
}

func accessDenied(p *Principal, perm string) *kvError {
	return &kvError{status: http.StatusForbidden, code: "Forbidden", inner: "AccessDenied",
		msg: "The user, group or application 'appid=" + p.ClientID + ";oid=" + p.ObjectID +
			"' does not have keys " + perm + " permission on this key vault. Inner error: access policy denies it."}
}

func forbidden(inner, msg string) *kvError {
	return &kvError{status: http.StatusForbidden, code: "Forbidden", inner: inner, msg: msg}
}
