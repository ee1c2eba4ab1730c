package daemon

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/cryptnbd/cryptnbd/nbd"
)

// API serves the management endpoints over HTTP/JSON.
type API struct {
	m         *Manager
	auditPath string
	mux       *http.ServeMux
}

// NewAPI builds the handler for m; auditPath is read by GET /v1/audit.
func NewAPI(m *Manager, auditPath string) *API {
	a := &API{m: m, auditPath: auditPath, mux: http.NewServeMux()}
	a.mux.HandleFunc("GET /v1/disks", a.listDisks)
	a.mux.HandleFunc("POST /v1/disks", a.createDisk)
	a.mux.HandleFunc("GET /v1/disks/{name}", a.showDisk)
	a.mux.HandleFunc("DELETE /v1/disks/{name}", a.deleteDisk)
	a.mux.HandleFunc("POST /v1/disks/{name}/resize", a.resizeDisk)
	a.mux.HandleFunc("POST /v1/disks/{name}/recovery-secret", a.recoverySecret)
	a.mux.HandleFunc("POST /v1/disks/{name}/attach", a.attachDisk)
	a.mux.HandleFunc("POST /v1/disks/{name}/detach", a.detachDisk)
	a.mux.HandleFunc("GET /v1/audit", a.audit)
	a.mux.HandleFunc("POST /v1/disks/{name}/access", a.setAccess)
	a.mux.HandleFunc("GET /v1/des", a.listDES)
	a.mux.HandleFunc("POST /v1/des", a.createDES)
	a.mux.HandleFunc("GET /v1/des/{name}", a.showDES)
	a.mux.HandleFunc("DELETE /v1/des/{name}", a.deleteDES)
	a.mux.HandleFunc("POST /v1/des/{name}/update", a.updateDES)
	a.mux.HandleFunc("POST /v1/des/{name}/rotate", a.rotateDES)
	a.routeLifecycle()
	return a
}

func (a *API) ServeHTTP(w http.ResponseWriter, r *http.Request) { a.mux.ServeHTTP(w, r) }

// apiError is the body of every error response.
type apiError struct {
	Error string `json:"error"`
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, err error) {
	status := http.StatusInternalServerError
	switch {
	case errors.Is(err, ErrNotFound), errors.Is(err, nbd.ErrUnknownExport):
		status = http.StatusNotFound
	case errors.Is(err, ErrExists), errors.Is(err, ErrInUse), errors.Is(err, ErrUnavailable), errors.Is(err, ErrHasSnapshots),
		errors.Is(err, ErrServedElsewhere):
		status = http.StatusConflict
	case errors.Is(err, ErrInvalid):
		status = http.StatusBadRequest
	}
	writeJSON(w, status, apiError{Error: err.Error()})
}

func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: body: %w", ErrInvalid, err)
	}
	return nil
}

func (a *API) listDisks(w http.ResponseWriter, r *http.Request) {
	a.refresh(r)
	writeJSON(w, http.StatusOK, a.m.List())
}

// refresh re-reads a shared catalog before an answer about disks; if the
// store cannot be reached the last known catalog is shown.
func (a *API) refresh(r *http.Request) {
	if err := a.m.Refresh(r.Context()); err != nil {
		a.m.log.Warn("catalog refresh failed; showing the last known disks", "err", err)
	}
}

func (a *API) attachDisk(w http.ResponseWriter, r *http.Request) {
	force, _ := strconv.ParseBool(r.URL.Query().Get("force"))
	wait := r.URL.Query().Get("wait") != "false"
	di, err := a.m.Attach(r.Context(), r.PathValue("name"), force, wait)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, di)
}

func (a *API) detachDisk(w http.ResponseWriter, r *http.Request) {
	force, _ := strconv.ParseBool(r.URL.Query().Get("force"))
	di, err := a.m.Detach(r.Context(), r.PathValue("name"), force)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, di)
}

func (a *API) createDisk(w http.ResponseWriter, r *http.Request) {
	var req CreateRequest
	if err := decode(r, &req); err != nil {
		writeErr(w, err)
		return
	}
	if r.URL.Query().Get("progress") == "ndjson" && (req.Source != "" || req.Reencrypt) {
		a.createWithProgress(w, r, req)
		return
	}
	di, err := a.m.Create(r.Context(), req)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, di)
}

func (a *API) showDisk(w http.ResponseWriter, r *http.Request) {
	a.refresh(r)
	di, err := a.m.Show(r.PathValue("name"))
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, di)
}

func (a *API) deleteDisk(w http.ResponseWriter, r *http.Request) {
	force, _ := strconv.ParseBool(r.URL.Query().Get("force"))
	if err := a.m.Delete(r.Context(), r.PathValue("name"), force); err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// ResizeRequest is the body of POST /v1/disks/{name}/resize.
type ResizeRequest struct {
	SizeBytes int64 `json:"sizeBytes"`
}

func (a *API) resizeDisk(w http.ResponseWriter, r *http.Request) {
	var req ResizeRequest
	if err := decode(r, &req); err != nil {
		writeErr(w, err)
		return
	}
	di, err := a.m.Resize(r.Context(), r.PathValue("name"), req.SizeBytes)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, di)
}

// RecoverySecretResponse carries the keyslot secret, base64.
type RecoverySecretResponse struct {
	Secret string `json:"secret"`
}

func (a *API) recoverySecret(w http.ResponseWriter, r *http.Request) {
	sec, err := a.m.RecoverySecret(r.Context(), r.PathValue("name"))
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, RecoverySecretResponse{Secret: base64.StdEncoding.EncodeToString(sec)})
	clear(sec)
}

func (a *API) audit(w http.ResponseWriter, r *http.Request) {
	var since time.Time
	if s := r.URL.Query().Get("since"); s != "" {
		t, err := time.Parse(time.RFC3339, s)
		if err != nil {
			writeErr(w, fmt.Errorf("%w: since %q: want RFC 3339, like 2026-01-02T15:04:05Z", ErrInvalid, s))
			return
		}
		since = t
	}
	f, err := os.Open(a.auditPath)
	if err != nil {
		writeErr(w, err)
		return
	}
	defer f.Close()
	evs, err := ReadAudit(r.Context(), f, r.URL.Query().Get("disk"), since)
	if err != nil {
		writeErr(w, err)
		return
	}
	if evs == nil {
		evs = []AuditEvent{}
	}
	writeJSON(w, http.StatusOK, evs)
}

func (a *API) listDES(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, a.m.ListDES())
}

func (a *API) createDES(w http.ResponseWriter, r *http.Request) {
	var req DESRequest
	if err := decode(r, &req); err != nil {
		writeErr(w, err)
		return
	}
	info, err := a.m.CreateDES(r.Context(), req)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, info)
}

func (a *API) showDES(w http.ResponseWriter, r *http.Request) {
	info, err := a.m.ShowDES(r.Context(), r.PathValue("name"))
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, info)
}

func (a *API) deleteDES(w http.ResponseWriter, r *http.Request) {
	if err := a.m.DeleteDES(r.PathValue("name")); err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (a *API) updateDES(w http.ResponseWriter, r *http.Request) {
	var req DESRequest
	if err := decode(r, &req); err != nil {
		writeErr(w, err)
		return
	}
	info, err := a.m.UpdateDES(r.Context(), r.PathValue("name"), req.KeyURL)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, info)
}

func (a *API) rotateDES(w http.ResponseWriter, r *http.Request) {
	info, err := a.m.RotateDES(r.Context(), r.PathValue("name"))
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, info)
}

func (a *API) setAccess(w http.ResponseWriter, r *http.Request) {
	var req Access
	if err := decode(r, &req); err != nil {
		writeErr(w, err)
		return
	}
	di, err := a.m.SetAccess(r.PathValue("name"), req)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, di)
}
