package kvserver

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/json"
	"hash"
	"io"
	"math/big"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// JSON shapes of the keys data plane (api-version 2025-07-01). Byte fields
// are base64url without padding and times are integer Unix seconds.
type jsonKey struct {
	Kid    string   `json:"kid"`
	Kty    string   `json:"kty"`
	KeyOps []string `json:"key_ops"`
	N      string   `json:"n"`
	E      string   `json:"e"`
}

type jsonAttrs struct {
	Enabled         bool   `json:"enabled"`
	NBF             *int64 `json:"nbf,omitempty"`
	Exp             *int64 `json:"exp,omitempty"`
	Created         int64  `json:"created"`
	Updated         int64  `json:"updated"`
	RecoveryLevel   string `json:"recoveryLevel"`
	RecoverableDays int    `json:"recoverableDays"`
	Exportable      bool   `json:"exportable"`
}

// jsonBundle is a KeyBundle, a DeletedKey, or (with Kid instead of Key) a
// list item.
type jsonBundle struct {
	Key                *jsonKey          `json:"key,omitempty"`
	Kid                string            `json:"kid,omitempty"`
	Attributes         jsonAttrs         `json:"attributes"`
	Tags               map[string]string `json:"tags,omitempty"`
	RecoveryID         string            `json:"recoveryId,omitempty"`
	DeletedDate        int64             `json:"deletedDate,omitempty"`
	ScheduledPurgeDate int64             `json:"scheduledPurgeDate,omitempty"`
}

type jsonList struct {
	Value    []jsonBundle `json:"value"`
	NextLink *string      `json:"nextLink"`
}

type jsonRotationPolicy struct {
	ID              string           `json:"id"`
	LifetimeActions []lifetimeAction `json:"lifetimeActions"`
	Attributes      struct {
		ExpiryTime string `json:"expiryTime,omitempty"`
		Created    int64  `json:"created,omitempty"`
		Updated    int64  `json:"updated,omitempty"`
	} `json:"attributes"`
}

var (
	keyNameRE  = regexp.MustCompile(`^[0-9a-zA-Z-]{1,127}$`)
	allKeyOps  = []string{"encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"}
	knownKeyOp = append(slices.Clone(allKeyOps), "import", "export")
)

// route dispatches an authenticated data-plane request. It returns the
// status and body (nil body: no content) or a Key Vault error.
func (s *Server) route(r *http.Request, p *Principal) (int, any, *kvError) {
	s.sweep()
	segs := strings.Split(strings.TrimPrefix(r.URL.Path, "/"), "/")
	if len(segs) > 1 && segs[len(segs)-1] == "" {
		segs = segs[:len(segs)-1] // /keys/{name}/ is the latest version
	}
	m := r.Method
	notAllowed := &kvError{status: http.StatusMethodNotAllowed, code: "MethodNotAllowed", msg: m + " is not allowed on " + r.URL.Path}
	if segs[0] == "deletedkeys" {
		switch {
		case len(segs) == 1 && m == http.MethodGet:
			return s.listDeleted(r, p)
		case len(segs) == 2 && m == http.MethodGet:
			return s.getDeleted(r, p, segs[1])
		case len(segs) == 2 && m == http.MethodDelete:
			return s.purge(p, segs[1])
		case len(segs) == 3 && segs[2] == "recover" && m == http.MethodPost:
			return s.recover(r, p, segs[1])
		}
		return 0, nil, notAllowed
	}
	if len(segs) == 1 {
		if m == http.MethodGet {
			return s.listKeys(r, p)
		}
		return 0, nil, notAllowed
	}
	name, rest := segs[1], segs[2:]
	switch len(rest) {
	case 0:
		switch m {
		case http.MethodGet:
			return s.get(r, p, name, "")
		case http.MethodPatch:
			return s.update(r, p, name, "")
		case http.MethodDelete:
			return s.delete(r, p, name)
		case http.MethodPut:
			return 0, nil, notImplemented(m, r.URL.Path) // import
		}
		return 0, nil, notAllowed
	case 1:
		switch op := rest[0]; {
		case op == "create" && m == http.MethodPost:
			return s.create(r, p, name)
		case op == "versions" && m == http.MethodGet:
			return s.listVersions(r, p, name)
		case op == "rotate" && m == http.MethodPost:
			return s.rotate(r, p, name)
		case op == "rotationpolicy" && m == http.MethodGet:
			return s.getRotationPolicy(r, p, name)
		case op == "rotationpolicy" && m == http.MethodPut:
			return s.setRotationPolicy(r, p, name)
		case (op == "wrapkey" || op == "unwrapkey") && m == http.MethodPost:
			return s.keyOp(r, p, name, "", op)
		case slices.Contains([]string{"backup", "encrypt", "decrypt", "sign", "verify", "release"}, op) && m == http.MethodPost:
			return 0, nil, notImplemented(m, r.URL.Path)
		case slices.Contains([]string{"create", "versions", "rotate", "rotationpolicy", "backup", "wrapkey", "unwrapkey", "encrypt", "decrypt", "sign", "verify", "release"}, op):
			return 0, nil, notAllowed // a literal segment is never a version
		case m == http.MethodGet:
			return s.get(r, p, name, op)
		case m == http.MethodPatch:
			return s.update(r, p, name, op)
		}
		return 0, nil, notAllowed
	case 2:
		switch op := rest[1]; {
		case (op == "wrapkey" || op == "unwrapkey") && m == http.MethodPost:
			return s.keyOp(r, p, name, rest[0], op)
		case m == http.MethodPost:
			return 0, nil, notImplemented(m, r.URL.Path)
		}
	}
	return 0, nil, notAllowed
}

func notImplemented(method, path string) *kvError {
	return &kvError{status: http.StatusNotImplemented, code: "NotImplemented", msg: method + " " + path + " is not implemented by this local vault."}
}

// sweep purges soft-deleted keys whose retention has ended.
func (s *Server) sweep() {
	now := s.now().Unix()
	s.mu.Lock()
	defer s.mu.Unlock()
	changed := false
	for id, k := range s.st.Keys {
		if k.deleted() && now >= k.PurgeDate {
			s.dropLocked(id)
			changed = true
		}
	}
	if changed {
		if err := saveState(s.opts.DataDir, s.st); err != nil {
			s.log.Error("save after scheduled purge", "err", err)
		}
	}
}

func (s *Server) dropLocked(id string) {
	k := s.st.Keys[id]
	for _, v := range k.Versions {
		delete(s.priv, id+"/"+v.Version)
	}
	delete(s.st.Keys, id)
}

// saveLocked persists the state; a failure is reported to the client.
func (s *Server) saveLocked() *kvError {
	if err := saveState(s.opts.DataDir, s.st); err != nil {
		s.log.Error("save state", "err", err)
		return &kvError{status: http.StatusInternalServerError, code: "InternalError", msg: "could not persist vault state"}
	}
	return nil
}

// checkLocked returns AccessDenied unless p may perm (lower-case).
func (s *Server) checkLocked(p *Principal, perm string) *kvError {
	if !s.allowedLocked(p.ObjectID, perm) {
		return accessDenied(p, perm)
	}
	return nil
}

// liveLocked returns the non-deleted key name, or KeyNotFound.
func (s *Server) liveLocked(name string) (*vaultKey, *kvError) {
	k := s.st.Keys[strings.ToLower(name)]
	if k == nil || k.deleted() {
		return nil, keyNotFound(name)
	}
	return k, nil
}

func baseURL(r *http.Request) string { return "https://" + r.Host }

func kid(r *http.Request, name, version string) string {
	u := baseURL(r) + "/keys/" + name
	if version != "" {
		u += "/" + version
	}
	return u
}

func (s *Server) attrs(v *keyVersion) jsonAttrs {
	level, days := s.recoveryLevel()
	return jsonAttrs{Enabled: v.Enabled, NBF: v.NBF, Exp: v.Exp, Created: v.Created, Updated: v.Updated,
		RecoveryLevel: level, RecoverableDays: days}
}

func (s *Server) bundle(r *http.Request, k *vaultKey, v *keyVersion) jsonBundle {
	b := jsonBundle{
		Key: &jsonKey{Kid: kid(r, k.Name, v.Version), Kty: v.Kty, KeyOps: slices.Clone(v.KeyOps),
			N: b64.EncodeToString(v.N), E: b64.EncodeToString(v.E)},
		Attributes: s.attrs(v),
		Tags:       v.Tags,
	}
	if k.deleted() {
		b.RecoveryID = baseURL(r) + "/deletedkeys/" + k.Name
		b.DeletedDate, b.ScheduledPurgeDate = k.DeletedDate, k.PurgeDate
	}
	return b
}

func decodeBody(r *http.Request, v any) *kvError {
	b, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, 1<<20))
	if err != nil {
		return badParameter("could not read the request body")
	}
	if len(b) == 0 {
		return badParameter("The request body is required.")
	}
	if err := json.Unmarshal(b, v); err != nil {
		return badParameter("The request body is not valid JSON: " + err.Error())
	}
	return nil
}

func normalizeKeyOps(ops []string) ([]string, *kvError) {
	if ops == nil {
		return slices.Clone(allKeyOps), nil
	}
	out := []string{}
	for _, op := range ops {
		i := slices.IndexFunc(knownKeyOp, func(k string) bool { return strings.EqualFold(k, op) })
		if i < 0 {
			return nil, badParameter("Invalid key operation " + strconv.Quote(op) + ".")
		}
		if !slices.Contains(out, knownKeyOp[i]) {
			out = append(out, knownKeyOp[i])
		}
	}
	return out, nil
}

type createBody struct {
	Kty            string            `json:"kty"`
	KeySize        *int              `json:"key_size"`
	PublicExponent *int              `json:"public_exponent"`
	Crv            string            `json:"crv"`
	KeyOps         []string          `json:"key_ops"`
	Attributes     *createAttrs      `json:"attributes"`
	Tags           map[string]string `json:"tags"`
}

type createAttrs struct {
	Enabled    *bool  `json:"enabled"`
	NBF        *int64 `json:"nbf"`
	Exp        *int64 `json:"exp"`
	Exportable *bool  `json:"exportable"`
}

// create makes a new key, or a new version of an existing one.
func (s *Server) create(r *http.Request, p *Principal, name string) (int, any, *kvError) {
	s.mu.Lock()
	e := s.checkLocked(p, "create")
	s.mu.Unlock()
	if e != nil {
		return 0, nil, e
	}
	if !keyNameRE.MatchString(name) {
		return 0, nil, badParameter("The key name " + strconv.Quote(name) + " is invalid: use 1–127 letters, digits and dashes.")
	}
	var body createBody
	if e := decodeBody(r, &body); e != nil {
		return 0, nil, e
	}
	if body.Kty != "RSA" && body.Kty != "RSA-HSM" {
		return 0, nil, badParameter("Key type " + strconv.Quote(body.Kty) + " is not supported by this local vault; use RSA or RSA-HSM.")
	}
	bits := 2048
	if body.KeySize != nil {
		bits = *body.KeySize
	}
	if bits != 2048 && bits != 3072 && bits != 4096 {
		return 0, nil, badParameter("Invalid key size " + strconv.Itoa(bits) + ": use 2048, 3072 or 4096.")
	}
	if body.PublicExponent != nil && *body.PublicExponent != 65537 {
		return 0, nil, badParameter("Only the public exponent 65537 is supported.")
	}
	ops, e := normalizeKeyOps(body.KeyOps)
	if e != nil {
		return 0, nil, e
	}
	a := createAttrs{}
	if body.Attributes != nil {
		a = *body.Attributes
	}
	if a.Exportable != nil && *a.Exportable {
		return 0, nil, badParameter("Exportable keys need a release policy, which this local vault does not support.")
	}
	// A create over a soft-deleted name fails before the slow key generation.
	s.mu.Lock()
	if k := s.st.Keys[strings.ToLower(name)]; k != nil && k.deleted() {
		s.mu.Unlock()
		return 0, nil, conflictDeleted(name)
	}
	s.mu.Unlock()
	priv, err := rsa.GenerateKey(rand.Reader, bits)
	if err != nil {
		return 0, nil, &kvError{status: http.StatusInternalServerError, code: "InternalError", msg: "key generation failed"}
	}
	now := s.now().Unix()
	v := &keyVersion{
		Version: randHex(32), Kty: body.Kty, KeyOps: ops, Enabled: a.Enabled == nil || *a.Enabled,
		NBF: a.NBF, Exp: a.Exp, Created: now, Updated: now, Tags: body.Tags,
		N: priv.N.Bytes(), E: big.NewInt(int64(priv.E)).Bytes(),
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	id := strings.ToLower(name)
	k := s.st.Keys[id]
	if k != nil && k.deleted() {
		return 0, nil, conflictDeleted(name)
	}
	if k == nil {
		k = &vaultKey{Name: name}
		s.st.Keys[id] = k
	}
	v.Sealed = s.sealer.seal(priv, id, v.Version)
	k.Versions = append(k.Versions, v)
	s.priv[id+"/"+v.Version] = priv
	if e := s.saveLocked(); e != nil {
		return 0, nil, e
	}
	s.log.Debug("key created", "key", k.Name, "version", v.Version, "bits", bits)
	return http.StatusOK, s.bundle(r, k, v), nil
}

func conflictDeleted(name string) *kvError {
	return &kvError{status: http.StatusConflict, code: "Conflict", inner: "ObjectIsDeletedButRecoverable",
		msg: "Key " + name + " is currently in a deleted but recoverable state, and its name cannot be reused; in this state, the key can only be recovered or purged."}
}

func (s *Server) get(r *http.Request, p *Principal, name, version string) (int, any, *kvError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.checkLocked(p, "get"); e != nil {
		return 0, nil, e
	}
	k, e := s.liveLocked(name)
	if e != nil {
		return 0, nil, e
	}
	v := k.version(version)
	if v == nil {
		return 0, nil, keyNotFound(name + "/" + version)
	}
	return http.StatusOK, s.bundle(r, k, v), nil
}

// page cuts items into one page and builds the nextLink.
func (s *Server) page(r *http.Request, items []jsonBundle) *jsonList {
	q := r.URL.Query()
	size := s.opts.PageSize
	if n, err := strconv.Atoi(q.Get("maxresults")); err == nil && n > 0 && n < size {
		size = n
	}
	skip, _ := strconv.Atoi(q.Get("$skiptoken"))
	skip = max(0, min(skip, len(items)))
	end := min(skip+size, len(items))
	out := &jsonList{Value: slices.Clone(items[skip:end])}
	if out.Value == nil {
		out.Value = []jsonBundle{}
	}
	if end < len(items) {
		nq := url.Values{}
		nq.Set("api-version", q.Get("api-version"))
		nq.Set("$skiptoken", strconv.Itoa(end))
		if q.Get("maxresults") != "" {
			nq.Set("maxresults", q.Get("maxresults"))
		}
		link := baseURL(r) + r.URL.Path + "?" + nq.Encode()
		out.NextLink = &link
	}
	return out
}

func (s *Server) listVersions(r *http.Request, p *Principal, name string) (int, any, *kvError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.checkLocked(p, "list"); e != nil {
		return 0, nil, e
	}
	k, e := s.liveLocked(name)
	if e != nil {
		return 0, nil, e
	}
	items := make([]jsonBundle, 0, len(k.Versions))
	for _, v := range k.Versions {
		items = append(items, jsonBundle{Kid: kid(r, k.Name, v.Version), Attributes: s.attrs(v), Tags: v.Tags})
	}
	return http.StatusOK, s.page(r, items), nil
}

func (s *Server) sortedKeysLocked(deleted bool) []*vaultKey {
	var ks []*vaultKey
	for _, k := range s.st.Keys {
		if k.deleted() == deleted {
			ks = append(ks, k)
		}
	}
	slices.SortFunc(ks, func(a, b *vaultKey) int { return strings.Compare(strings.ToLower(a.Name), strings.ToLower(b.Name)) })
	return ks
}

func (s *Server) listKeys(r *http.Request, p *Principal) (int, any, *kvError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.checkLocked(p, "list"); e != nil {
		return 0, nil, e
	}
	var items []jsonBundle
	for _, k := range s.sortedKeysLocked(false) {
		v := k.latest()
		items = append(items, jsonBundle{Kid: kid(r, k.Name, ""), Attributes: s.attrs(v), Tags: v.Tags})
	}
	return http.StatusOK, s.page(r, items), nil
}

func (s *Server) listDeleted(r *http.Request, p *Principal) (int, any, *kvError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.checkLocked(p, "list"); e != nil {
		return 0, nil, e
	}
	var items []jsonBundle
	for _, k := range s.sortedKeysLocked(true) {
		v := k.latest()
		items = append(items, jsonBundle{Kid: kid(r, k.Name, ""), Attributes: s.attrs(v), Tags: v.Tags,
			RecoveryID: baseURL(r) + "/deletedkeys/" + k.Name, DeletedDate: k.DeletedDate, ScheduledPurgeDate: k.PurgeDate})
	}
	return http.StatusOK, s.page(r, items), nil
}

type updateBody struct {
	Attributes map[string]json.RawMessage `json:"attributes"`
	KeyOps     []string                   `json:"key_ops"`
	Tags       map[string]string          `json:"tags"`
}

// update changes enabled, nbf, exp (null clears), key_ops and tags.
func (s *Server) update(r *http.Request, p *Principal, name, version string) (int, any, *kvError) {
	s.mu.Lock()
	e := s.checkLocked(p, "update")
	s.mu.Unlock()
	if e != nil {
		return 0, nil, e
	}
	var body updateBody
	if e := decodeBody(r, &body); e != nil {
		return 0, nil, e
	}
	var enabled *bool
	var setNBF, setExp bool
	var nbf, exp *int64
	for field, raw := range body.Attributes {
		var err error
		switch field {
		case "enabled":
			err = json.Unmarshal(raw, &enabled)
		case "nbf":
			setNBF = true
			err = json.Unmarshal(raw, &nbf)
		case "exp":
			setExp = true
			err = json.Unmarshal(raw, &exp)
		}
		if err != nil {
			return 0, nil, badParameter("Invalid attribute " + field + ": " + err.Error())
		}
	}
	var ops []string
	if body.KeyOps != nil {
		if ops, e = normalizeKeyOps(body.KeyOps); e != nil {
			return 0, nil, e
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	k, e := s.liveLocked(name)
	if e != nil {
		return 0, nil, e
	}
	v := k.version(version)
	if v == nil {
		return 0, nil, keyNotFound(name + "/" + version)
	}
	if enabled != nil {
		v.Enabled = *enabled
	}
	if setNBF {
		v.NBF = nbf
	}
	if setExp {
		v.Exp = exp
	}
	if ops != nil {
		v.KeyOps = ops
	}
	if body.Tags != nil {
		v.Tags = body.Tags
	}
	v.Updated = s.now().Unix()
	if e := s.saveLocked(); e != nil {
		return 0, nil, e
	}
	return http.StatusOK, s.bundle(r, k, v), nil
}

// delete soft-deletes every version of the key.
func (s *Server) delete(r *http.Request, p *Principal, name string) (int, any, *kvError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.checkLocked(p, "delete"); e != nil {
		return 0, nil, e
	}
	k, e := s.liveLocked(name)
	if e != nil {
		return 0, nil, e
	}
	now := s.now()
	k.DeletedDate = now.Unix()
	k.PurgeDate = now.Add(time.Duration(s.opts.SoftDeleteRetentionDays) * 24 * time.Hour).Unix()
	if e := s.saveLocked(); e != nil {
		return 0, nil, e
	}
	return http.StatusOK, s.bundle(r, k, k.latest()), nil
}

func (s *Server) deletedLocked(name string) (*vaultKey, *kvError) {
	k := s.st.Keys[strings.ToLower(name)]
	if k == nil || !k.deleted() {
		return nil, deletedKeyNotFound(name)
	}
	return k, nil
}

func (s *Server) getDeleted(r *http.Request, p *Principal, name string) (int, any, *kvError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.checkLocked(p, "get"); e != nil {
		return 0, nil, e
	}
	k, e := s.deletedLocked(name)
	if e != nil {
		return 0, nil, e
	}
	return http.StatusOK, s.bundle(r, k, k.latest()), nil
}

func (s *Server) recover(r *http.Request, p *Principal, name string) (int, any, *kvError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.checkLocked(p, "recover"); e != nil {
		return 0, nil, e
	}
	k, e := s.deletedLocked(name)
	if e != nil {
		return 0, nil, e
	}
	k.DeletedDate, k.PurgeDate = 0, 0
	if e := s.saveLocked(); e != nil {
		return 0, nil, e
	}
	return http.StatusOK, s.bundle(r, k, k.latest()), nil
}

func (s *Server) purge(p *Principal, name string) (int, any, *kvError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.checkLocked(p, "purge"); e != nil {
		return 0, nil, e
	}
	if _, e := s.deletedLocked(name); e != nil {
		return 0, nil, e
	}
	if s.opts.PurgeProtection {
		return 0, nil, forbidden("", "Operation \"purge\" is not allowed because purge protection is enabled for this vault. Key Vault service will automatically purge it after the retention period has passed.")
	}
	s.dropLocked(strings.ToLower(name))
	if e := s.saveLocked(); e != nil {
		return 0, nil, e
	}
	return http.StatusNoContent, nil, nil
}

// rotate adds a version with the latest one's type, size, operations and
// tags; the rotation policy's expiryTime, if any, sets its exp.
func (s *Server) rotate(r *http.Request, p *Principal, name string) (int, any, *kvError) {
	s.mu.Lock()
	e := s.checkLocked(p, "rotate")
	var k *vaultKey
	if e == nil {
		k, e = s.liveLocked(name)
	}
	if e != nil {
		s.mu.Unlock()
		return 0, nil, e
	}
	last := k.latest()
	bits := len(last.N) * 8
	kty, ops, tags := last.Kty, slices.Clone(last.KeyOps), last.Tags
	var expiry string
	if k.RotationPolicy != nil {
		expiry = k.RotationPolicy.ExpiryTime
	}
	s.mu.Unlock()

	priv, err := rsa.GenerateKey(rand.Reader, bits)
	if err != nil {
		return 0, nil, &kvError{status: http.StatusInternalServerError, code: "InternalError", msg: "key generation failed"}
	}
	now := s.now()
	v := &keyVersion{Version: randHex(32), Kty: kty, KeyOps: ops, Enabled: true, Created: now.Unix(), Updated: now.Unix(),
		Tags: tags, N: priv.N.Bytes(), E: big.NewInt(int64(priv.E)).Bytes()}
	if t, ok := addISODuration(now, expiry); ok {
		exp := t.Unix()
		v.Exp = &exp
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if k, e = s.liveLocked(name); e != nil {
		return 0, nil, e
	}
	id := strings.ToLower(k.Name)
	v.Sealed = s.sealer.seal(priv, id, v.Version)
	k.Versions = append(k.Versions, v)
	s.priv[id+"/"+v.Version] = priv
	if e := s.saveLocked(); e != nil {
		return 0, nil, e
	}
	return http.StatusOK, s.bundle(r, k, v), nil
}

// addISODuration adds a simple ISO 8601 duration (PnY, PnM, PnD) to t.
func addISODuration(t time.Time, d string) (time.Time, bool) {
	if len(d) < 3 || d[0] != 'P' {
		return t, false
	}
	n, err := strconv.Atoi(d[1 : len(d)-1])
	if err != nil || n <= 0 {
		return t, false
	}
	switch d[len(d)-1] {
	case 'Y':
		return t.AddDate(n, 0, 0), true
	case 'M':
		return t.AddDate(0, n, 0), true
	case 'D':
		return t.AddDate(0, 0, n), true
	}
	return t, false
}

func (s *Server) rotationPolicyJSON(r *http.Request, k *vaultKey) jsonRotationPolicy {
	out := jsonRotationPolicy{ID: baseURL(r) + "/keys/" + k.Name + "/rotationpolicy"}
	rp := k.RotationPolicy
	if rp == nil {
		la := lifetimeAction{}
		la.Trigger.TimeBeforeExpiry = "P30D"
		la.Action.Type = "Notify"
		out.LifetimeActions = []lifetimeAction{la}
		return out
	}
	out.LifetimeActions = slices.Clone(rp.LifetimeActions)
	if out.LifetimeActions == nil {
		out.LifetimeActions = []lifetimeAction{}
	}
	out.Attributes.ExpiryTime, out.Attributes.Created, out.Attributes.Updated = rp.ExpiryTime, rp.Created, rp.Updated
	return out
}

func (s *Server) getRotationPolicy(r *http.Request, p *Principal, name string) (int, any, *kvError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.checkLocked(p, "getrotationpolicy"); e != nil {
		return 0, nil, e
	}
	k, e := s.liveLocked(name)
	if e != nil {
		return 0, nil, e
	}
	return http.StatusOK, s.rotationPolicyJSON(r, k), nil
}

func (s *Server) setRotationPolicy(r *http.Request, p *Principal, name string) (int, any, *kvError) {
	s.mu.Lock()
	e := s.checkLocked(p, "setrotationpolicy")
	s.mu.Unlock()
	if e != nil {
		return 0, nil, e
	}
	var body jsonRotationPolicy
	if e := decodeBody(r, &body); e != nil {
		return 0, nil, e
	}
	for i := range body.LifetimeActions {
		a := &body.LifetimeActions[i]
		switch strings.ToLower(a.Action.Type) {
		case "rotate":
			a.Action.Type = "Rotate"
		case "notify":
			a.Action.Type = "Notify"
		default:
			return 0, nil, badParameter("Invalid lifetime action type " + strconv.Quote(a.Action.Type) + ".")
		}
		if (a.Trigger.TimeAfterCreate == "") == (a.Trigger.TimeBeforeExpiry == "") {
			return 0, nil, badParameter("A lifetime action needs exactly one of timeAfterCreate and timeBeforeExpiry.")
		}
	}
	if x := body.Attributes.ExpiryTime; x != "" {
		if _, ok := addISODuration(time.Now(), x); !ok {
			return 0, nil, badParameter("Invalid expiryTime " + strconv.Quote(x) + ": use PnD, PnM or PnY.")
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	k, e := s.liveLocked(name)
	if e != nil {
		return 0, nil, e
	}
	now := s.now().Unix()
	rp := &rotationPolicy{LifetimeActions: body.LifetimeActions, ExpiryTime: body.Attributes.ExpiryTime, Created: now, Updated: now}
	if k.RotationPolicy != nil {
		rp.Created = k.RotationPolicy.Created
	}
	k.RotationPolicy = rp
	if e := s.saveLocked(); e != nil {
		return 0, nil, e
	}
	return http.StatusOK, s.rotationPolicyJSON(r, k), nil
}

type keyOpBody struct {
	Alg   string `json:"alg"`
	Value string `json:"value"`
}

type keyOpResult struct {
	Kid   string `json:"kid"`
	Value string `json:"value"`
}

// keyOp is wrapKey or unwrapKey (op is the lower-case path segment). Unwrap
// works on expired and not-yet-valid versions, as Key Vault's does; wrap
// does not. Both refuse a disabled version.
func (s *Server) keyOp(r *http.Request, p *Principal, name, version, op string) (int, any, *kvError) {
	wrap := op == "wrapkey"
	opName, perm := "unwrapKey", "unwrapkey"
	if wrap {
		opName, perm = "wrapKey", "wrapkey"
	}
	s.mu.Lock()
	e := s.checkLocked(p, perm)
	s.mu.Unlock()
	if e != nil {
		return 0, nil, e
	}
	var body keyOpBody
	if e := decodeBody(r, &body); e != nil {
		return 0, nil, e
	}
	var h hash.Hash
	switch body.Alg {
	case "RSA-OAEP-256":
		h = sha256.New()
	case "RSA-OAEP":
		h = sha1.New()
	case "RSA1_5":
	default:
		return 0, nil, badParameter("Invalid algorithm " + strconv.Quote(body.Alg) + " for " + opName + ": use RSA-OAEP-256, RSA-OAEP or RSA1_5.")
	}
	in, err := b64.DecodeString(strings.TrimRight(body.Value, "="))
	if err != nil || len(in) == 0 {
		return 0, nil, badParameter("The value must be non-empty base64url.")
	}

	s.mu.Lock()
	k, e := s.liveLocked(name)
	var v *keyVersion
	if e == nil {
		if v = k.version(version); v == nil {
			e = keyNotFound(name + "/" + version)
		}
	}
	now := s.now().Unix()
	switch {
	case e != nil:
	case !v.Enabled:
		e = forbidden("KeyDisabled", "Operation "+opName+" is not allowed on a disabled key.")
	case !slices.Contains(v.KeyOps, opName):
		e = forbidden("KeyOperationForbidden", "Operation "+opName+" is not permitted on this key.")
	case wrap && v.Exp != nil && now >= *v.Exp:
		e = forbidden("KeyExpired", "Operation "+opName+" is not allowed on an expired key.")
	case wrap && v.NBF != nil && now < *v.NBF:
		e = forbidden("KeyNotYetValid", "Operation "+opName+" is not allowed on a not yet valid key.")
	}
	var priv *rsa.PrivateKey
	var kidV string
	if e == nil {
		kidV = kid(r, k.Name, v.Version)
		priv, e = s.privateLocked(k, v)
	}
	s.mu.Unlock()
	if e != nil {
		return 0, nil, e
	}

	var out []byte
	switch {
	case wrap && h != nil:
		out, err = rsa.EncryptOAEP(h, rand.Reader, &priv.PublicKey, in, nil)
	case wrap:
		out, err = rsa.EncryptPKCS1v15(rand.Reader, &priv.PublicKey, in)
	case h != nil:
		out, err = rsa.DecryptOAEP(h, nil, priv, in, nil)
	default:
		out, err = rsa.DecryptPKCS1v15(nil, priv, in)
	}
	if err != nil {
		return 0, nil, badParameter("The parameter is incorrect: " + opName + " with " + body.Alg + " failed.")
	}
	return http.StatusOK, keyOpResult{Kid: kidV, Value: b64.EncodeToString(out)}, nil
}

// privateLocked returns the unsealed private key of v, caching it.
func (s *Server) privateLocked(k *vaultKey, v *keyVersion) (*rsa.PrivateKey, *kvError) {
	id := strings.ToLower(k.Name) + "/" + v.Version
	if priv := s.priv[id]; priv != nil {
		return priv, nil
	}
	priv, err := s.sealer.open(v.Sealed, strings.ToLower(k.Name), v.Version)
	if err != nil {
		s.log.Error("unseal key", "key", k.Name, "version", v.Version, "err", err)
		return nil, &kvError{status: http.StatusInternalServerError, code: "InternalError", msg: "stored key is unreadable"}
	}
	s.priv[id] = priv
	return priv, nil
}
