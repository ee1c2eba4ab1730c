package kvserver

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Resource is the token audience Key Vault announces in its challenge and
// that the token endpoint accepts.
const Resource = "https://vault.azure.net"

// IdentityAPIVersion is the App Service managed-identity API version that
// azidentity sends to IDENTITY_ENDPOINT.
const IdentityAPIVersion = "2019-08-01"

// identityPath is the token endpoint's path on the server's own listener.
const identityPath = "/msi/token"

// tokenLifetime is long enough that MSAL schedules a refresh at half-life.
const tokenLifetime = 24 * time.Hour

// Principal is an identity known to the vault: the administrator or one made
// with AdminClient.CreatePrincipal. Tokens are bound to its ObjectID.
type Principal struct {
	ObjectID string `json:"objectId"`
	ClientID string `json:"clientId"`
	Name     string `json:"name"`
}

// KeyPermissions are the access-policy key permissions the server knows
// (Key Vault's names, compared case-insensitively). "all" grants every one.
var KeyPermissions = []string{
	"get", "list", "create", "update", "delete", "recover", "purge",
	"wrapKey", "unwrapKey", "encrypt", "decrypt", "sign", "verify",
	"import", "backup", "restore", "rotate", "getrotationpolicy", "setrotationpolicy", "release",
}

// normalizePermissions lower-cases and checks perms; it reports the first
// unknown one.
func normalizePermissions(perms []string) ([]string, error) {
	out := make([]string, 0, len(perms))
	for _, p := range perms {
		lp := strings.ToLower(strings.TrimSpace(p))
		if lp != "all" && !slices.ContainsFunc(KeyPermissions, func(k string) bool { return strings.ToLower(k) == lp }) {
			return nil, errors.New("unknown key permission " + strconv.Quote(p))
		}
		if !slices.Contains(out, lp) {
			out = append(out, lp)
		}
	}
	slices.Sort(out)
	return out, nil
}

type tokenClaims struct {
	Aud   string `json:"aud"`
	Iss   string `json:"iss"`
	Tid   string `json:"tid"`
	Oid   string `json:"oid"`
	AppID string `json:"appid"`
	Iat   int64  `json:"iat"`
	Nbf   int64  `json:"nbf"`
	Exp   int64  `json:"exp"`
}

var b64 = base64.RawURLEncoding

const tokenHeader = `{"alg":"HS256","typ":"JWT"}`

// signToken returns a JWT-shaped HS256 token for claims.
func signToken(key []byte, c tokenClaims) string {
	body, _ := json.Marshal(c) // plain struct: cannot fail
	msg := b64.EncodeToString([]byte(tokenHeader)) + "." + b64.EncodeToString(body)
	m := hmac.New(sha256.New, key)
	m.Write([]byte(msg))
	return msg + "." + b64.EncodeToString(m.Sum(nil))
}

// verifyToken checks the signature, audience and lifetime of tok.
func verifyToken(key []byte, tok string, now time.Time) (tokenClaims, error) {
	var c tokenClaims
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		return c, errors.New("malformed token")
	}
	sig, err := b64.DecodeString(parts[2])
	if err != nil {
		return c, errors.New("malformed token signature")
	}
	m := hmac.New(sha256.New, key)
	m.Write([]byte(parts[0] + "." + parts[1]))
	if !hmac.Equal(sig, m.Sum(nil)) {
		return c, errors.New("bad token signature")
	}
	body, err := b64.DecodeString(parts[1])
	if err != nil {
		return c, errors.New("malformed token claims")
	}
	if err := json.Unmarshal(body, &c); err != nil {
		return c, errors.New("malformed token claims")
	}
	switch {
	case strings.TrimSuffix(c.Aud, "/") != Resource:
		return c, errors.New("token audience is not " + Resource)
	case now.Unix() >= c.Exp:
		return c, errors.New("token expired")
	case now.Unix() < c.Nbf-300:
		return c, errors.New("token not yet valid")
	}
	return c, nil
}

// challenge is the WWW-Authenticate value Key Vault sends with a 401.
func (s *Server) challenge() string {
	return `Bearer authorization="https://login.microsoftonline.com/` + s.tenantID + `", resource="` + Resource + `"`
}

// authenticate returns the principal behind r's bearer token, or writes a 401
// and returns nil.
func (s *Server) authenticate(w http.ResponseWriter, r *http.Request) *Principal {
	h := r.Header.Get("Authorization")
	tok, ok := strings.CutPrefix(h, "Bearer ")
	if !ok || tok == "" {
		s.unauthorized(w, "AKV10000: Request is missing a Bearer or PoP token.")
		return nil
	}
	c, err := verifyToken(s.secrets.TokenKey, strings.TrimSpace(tok), s.now())
	if err != nil {
		s.unauthorized(w, "AKV10032: Invalid token: "+err.Error()+".")
		return nil
	}
	s.mu.Lock()
	p := s.st.Principals[c.Oid]
	s.mu.Unlock()
	if p == nil || c.Tid != s.tenantID {
		s.unauthorized(w, "AKV10032: Invalid issuer or unknown principal.")
		return nil
	}
	return p
}

func (s *Server) unauthorized(w http.ResponseWriter, msg string) {
	w.Header().Set("WWW-Authenticate", s.challenge())
	writeError(w, &kvError{status: http.StatusUnauthorized, code: "Unauthorized", msg: msg})
}

// allowed reports whether oid's access policy grants perm (lower-case).
// The caller holds s.mu.
func (s *Server) allowedLocked(oid, perm string) bool {
	if oid == s.st.AdminObjectID {
		return true
	}
	ps := s.st.Policies[oid]
	return slices.Contains(ps, perm) || slices.Contains(ps, "all")
}

// serveToken is the App Service style managed-identity token endpoint:
// GET /msi/token?api-version=2019-08-01&resource=…[&client_id=…|object_id=…|principal_id=…]
// with the X-IDENTITY-HEADER secret. No identity parameter means the
// administrator (the "system-assigned" identity of the host running the vault).
func (s *Server) serveToken(w http.ResponseWriter, r *http.Request) {
	fail := func(status int, msg string) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		json.NewEncoder(w).Encode(map[string]any{"statusCode": status, "message": msg})
	}
	if r.Method != http.MethodGet {
		fail(http.StatusMethodNotAllowed, "use GET")
		return
	}
	if subtle.ConstantTimeCompare([]byte(r.Header.Get("X-IDENTITY-HEADER")), []byte(s.secrets.IdentityHeader)) != 1 {
		fail(http.StatusUnauthorized, "missing or wrong X-IDENTITY-HEADER")
		return
	}
	q := r.URL.Query()
	if q.Get("api-version") != IdentityAPIVersion {
		fail(http.StatusBadRequest, "api-version must be "+IdentityAPIVersion)
		return
	}
	if res := strings.TrimSuffix(q.Get("resource"), "/"); res != Resource {
		fail(http.StatusBadRequest, "unknown resource "+strconv.Quote(q.Get("resource")))
		return
	}
	if q.Get("mi_res_id") != "" {
		fail(http.StatusBadRequest, "selection by resource id is not supported; use client_id or object_id")
		return
	}
	s.mu.Lock()
	var p *Principal
	switch {
	case q.Get("client_id") != "":
		for _, c := range s.st.Principals {
			if strings.EqualFold(c.ClientID, q.Get("client_id")) {
				p = c
			}
		}
	case q.Get("object_id") != "":
		p = s.st.Principals[strings.ToLower(q.Get("object_id"))]
	case q.Get("principal_id") != "":
		p = s.st.Principals[strings.ToLower(q.Get("principal_id"))]
	default:
		p = s.st.Principals[s.st.AdminObjectID]
	}
	var cp Principal
	if p != nil {
		cp = *p
	}
	s.mu.Unlock()
	if p == nil {
		fail(http.StatusBadRequest, "no managed identity matches the request")
		return
	}
	now := s.now()
	exp := now.Add(tokenLifetime).Unix()
	tok := signToken(s.secrets.TokenKey, tokenClaims{
		Aud: Resource, Iss: "https://sts.windows.net/" + s.tenantID + "/", Tid: s.tenantID,
		Oid: cp.ObjectID, AppID: cp.ClientID, Iat: now.Unix(), Nbf: now.Unix(), Exp: exp,
	})
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]string{
		"access_token": tok,
		"expires_on":   strconv.FormatInt(exp, 10),
		"resource":     Resource,
		"token_type":   "Bearer",
		"client_id":    cp.ClientID,
	})
}
