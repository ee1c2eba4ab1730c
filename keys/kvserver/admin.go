package kvserver

import (
	"net/http"
	"regexp"
	"strings"
)

// Admin endpoints, served on the vault's listener and open only to the
// administrator principal's bearer token:
//
//	GET    /admin/principals            → [Principal]
//	POST   /admin/principals            {"name":…} → Principal
//	GET    /admin/policies              → {objectId: [perm]}
//	PUT    /admin/policies/{objectId}   {"keys":[perm…]} → {"objectId":…,"keys":[…]}
//	DELETE /admin/policies/{objectId}   → 204
//	POST   /admin/throttle              {"count":N,"retryAfter":s,"retryAfterMs":ms} → 204
//	POST   /admin/outage                {"enabled":bool} → 204
//
// Throttling answers the next count authenticated data-plane requests with
// 429 Throttled; an outage answers every one with 503 until disabled.

var objectIDRE = regexp.MustCompile(`^[0-9a-fA-F-]{1,64}$`)

type policyBody struct {
	ObjectID string   `json:"objectId,omitempty"`
	Keys     []string `json:"keys"`
}

type throttleBody struct {
	Count        int `json:"count"`
	RetryAfter   int `json:"retryAfter"`
	RetryAfterMS int `json:"retryAfterMs"`
}

type outageBody struct {
	Enabled bool `json:"enabled"`
}

type principalBody struct {
	Name string `json:"name"`
}

func (s *Server) serveAdmin(w http.ResponseWriter, r *http.Request) {
	p := s.authenticate(w, r)
	if p == nil {
		return
	}
	if p.ObjectID != s.AdminObjectID() {
		writeError(w, forbidden("AccessDenied", "The admin endpoints are open only to the administrator principal."))
		return
	}
	status, v, e := s.adminRoute(r)
	if e != nil {
		writeError(w, e)
		return
	}
	if v == nil {
		w.WriteHeader(status)
		return
	}
	writeJSON(w, status, v)
}

func (s *Server) adminRoute(r *http.Request) (int, any, *kvError) {
	segs := strings.Split(strings.TrimSuffix(strings.TrimPrefix(r.URL.Path, "/admin/"), "/"), "/")
	m := r.Method
	switch {
	case len(segs) == 1 && segs[0] == "principals" && m == http.MethodGet:
		s.mu.Lock()
		defer s.mu.Unlock()
		out := make([]Principal, 0, len(s.st.Principals))
		for _, p := range s.st.Principals {
			out = append(out, *p)
		}
		return http.StatusOK, out, nil
	case len(segs) == 1 && segs[0] == "principals" && m == http.MethodPost:
		var body principalBody
		if e := decodeBody(r, &body); e != nil {
			return 0, nil, e
		}
		p := &Principal{ObjectID: newUUID(), ClientID: newUUID(), Name: body.Name}
		s.mu.Lock()
		defer s.mu.Unlock()
		s.st.Principals[p.ObjectID] = p
		if e := s.saveLocked(); e != nil {
			return 0, nil, e
		}
		s.log.Info("principal created", "objectId", p.ObjectID, "clientId", p.ClientID, "name", p.Name)
		return http.StatusOK, *p, nil
	case len(segs) == 1 && segs[0] == "policies" && m == http.MethodGet:
		s.mu.Lock()
		defer s.mu.Unlock()
		out := map[string][]string{}
		for k, v := range s.st.Policies {
			out[k] = v
		}
		return http.StatusOK, out, nil
	case len(segs) == 2 && segs[0] == "policies" && m == http.MethodPut:
		oid := strings.ToLower(segs[1])
		if !objectIDRE.MatchString(oid) {
			return 0, nil, badParameter("invalid object id " + segs[1])
		}
		var body policyBody
		if e := decodeBody(r, &body); e != nil {
			return 0, nil, e
		}
		perms, err := normalizePermissions(body.Keys)
		if err != nil {
			return 0, nil, badParameter(err.Error())
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		s.st.Policies[oid] = perms
		if e := s.saveLocked(); e != nil {
			return 0, nil, e
		}
		s.log.Info("access policy set", "objectId", oid, "keys", perms)
		return http.StatusOK, policyBody{ObjectID: oid, Keys: perms}, nil
	case len(segs) == 2 && segs[0] == "policies" && m == http.MethodDelete:
		oid := strings.ToLower(segs[1])
		s.mu.Lock()
		defer s.mu.Unlock()
		delete(s.st.Policies, oid)
		if e := s.saveLocked(); e != nil {
			return 0, nil, e
		}
		s.log.Info("access policy deleted", "objectId", oid)
		return http.StatusNoContent, nil, nil
	case len(segs) == 1 && segs[0] == "throttle" && m == http.MethodPost:
		var body throttleBody
		if e := decodeBody(r, &body); e != nil {
			return 0, nil, e
		}
		if body.Count < 0 || body.RetryAfter < 0 || body.RetryAfterMS < 0 {
			return 0, nil, badParameter("count, retryAfter and retryAfterMs must not be negative")
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		s.throttleLeft, s.throttleSecs, s.throttleMS = body.Count, max(body.RetryAfter, 1), body.RetryAfterMS
		return http.StatusNoContent, nil, nil
	case len(segs) == 1 && segs[0] == "outage" && m == http.MethodPost:
		var body outageBody
		if e := decodeBody(r, &body); e != nil {
			return 0, nil, e
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		s.outage = body.Enabled
		return http.StatusNoContent, nil, nil
	}
	return 0, nil, &kvError{status: http.StatusNotFound, code: "NotFound", msg: "no such admin endpoint: " + m + " " + r.URL.Path}
}
