package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// Endpoints of the disk lifecycle:
//
//	POST   /v1/snapshots                  {"name","source"}: take a snapshot
//	GET    /v1/snapshots[?disk=D]         list snapshots
//	GET    /v1/snapshots/{DISK@SNAP}      show one
//	DELETE /v1/snapshots/{DISK@SNAP}      crypto-shred and remove one
//	POST   /v1/disks?progress=ndjson      create, streaming progress lines
//	PUT    /v1/disks/{name}/image?sizeBytes=N[&sectorSize=][&des=][&encryptionType=]
//	                                      import: the body is the raw image
//	GET    /v1/disks/{name}/image         export: the body is the plaintext
//	                                      ({name} may be DISK@SNAP)
func (a *API) routeLifecycle() {
	a.mux.HandleFunc("POST /v1/snapshots", a.createSnapshot)
	a.mux.HandleFunc("GET /v1/snapshots", a.listSnapshots)
	a.mux.HandleFunc("GET /v1/snapshots/{name}", a.showSnapshot)
	a.mux.HandleFunc("DELETE /v1/snapshots/{name}", a.deleteSnapshot)
	a.mux.HandleFunc("PUT /v1/disks/{name}/image", a.importImage)
	a.mux.HandleFunc("GET /v1/disks/{name}/image", a.exportImage)
}

func (a *API) createSnapshot(w http.ResponseWriter, r *http.Request) {
	var req SnapshotRequest
	if err := decode(r, &req); err != nil {
		writeErr(w, err)
		return
	}
	si, err := a.m.CreateSnapshot(r.Context(), req)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, si)
}

func (a *API) listSnapshots(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, a.m.ListSnapshots(r.URL.Query().Get("disk")))
}

func (a *API) showSnapshot(w http.ResponseWriter, r *http.Request) {
	si, err := a.m.ShowSnapshot(r.PathValue("name"))
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, si)
}

func (a *API) deleteSnapshot(w http.ResponseWriter, r *http.Request) {
	force, _ := strconv.ParseBool(r.URL.Query().Get("force"))
	if err := a.m.DeleteSnapshot(r.Context(), r.PathValue("name"), force); err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// ProgressLine is one line of an application/x-ndjson progress stream. The
// last line has Disk or Error set.
type ProgressLine struct {
	DoneBytes  int64     `json:"doneBytes"`
	TotalBytes int64     `json:"totalBytes"`
	Disk       *DiskInfo `json:"disk,omitempty"`
	Error      string    `json:"error,omitempty"`
	Status     int       `json:"status,omitempty"`
}

// createWithProgress runs a creation from a snapshot, streaming progress
// lines at most every 200 ms and then the result.
func (a *API) createWithProgress(w http.ResponseWriter, r *http.Request, req CreateRequest) {
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	enc := json.NewEncoder(w)
	var mu sync.Mutex
	var last time.Time
	send := func(l ProgressLine) {
		mu.Lock()
		defer mu.Unlock()
		enc.Encode(l)
		rc.Flush()
	}
	di, err := a.m.createFromSnapshot(r.Context(), req, func(done, total int64) {
		if time.Since(last) < 200*time.Millisecond && done < total {
			return
		}
		last = time.Now()
		send(ProgressLine{DoneBytes: done, TotalBytes: total})
	})
	if err != nil {
		send(ProgressLine{Error: err.Error(), Status: statusOf(err)})
		return
	}
	send(ProgressLine{DoneBytes: di.SizeBytes, TotalBytes: di.SizeBytes, Disk: &di})
}

// statusOf is the HTTP status writeErr gives err.
func statusOf(err error) int {
	switch {
	case errors.Is(err, ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, ErrExists), errors.Is(err, ErrInUse), errors.Is(err, ErrUnavailable), errors.Is(err, ErrHasSnapshots):
		return http.StatusConflict
	case errors.Is(err, ErrInvalid):
		return http.StatusBadRequest
	}
	return http.StatusInternalServerError
}

func (a *API) importImage(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	req := CreateRequest{Name: r.PathValue("name"), DES: q.Get("des"), EncryptionType: q.Get("encryptionType")}
	var err error
	if req.SizeBytes, err = strconv.ParseInt(q.Get("sizeBytes"), 10, 64); err != nil {
		writeErr(w, fmt.Errorf("%w: sizeBytes %q: want the image size in bytes", ErrInvalid, q.Get("sizeBytes")))
		return
	}
	if s := q.Get("sectorSize"); s != "" {
		if req.SectorSize, err = strconv.Atoi(s); err != nil {
			writeErr(w, fmt.Errorf("%w: sectorSize %q", ErrInvalid, s))
			return
		}
	}
	di, err := a.m.ImportImage(r.Context(), req, r.Body)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, di)
}

func (a *API) exportImage(w http.ResponseWriter, r *http.Request) {
	started := false
	err := a.m.ExportImage(r.Context(), r.PathValue("name"), w, func(size int64) {
		started = true
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
		w.Header().Set("X-Cryptnbd-Size-Bytes", strconv.FormatInt(size, 10))
		w.WriteHeader(http.StatusOK)
	})
	if err == nil {
		return
	}
	if !started {
		writeErr(w, err)
		return
	}
	// Mid-stream: the only honest signal left is a truncated body.
	a.m.log.Warn("export aborted", "disk", r.PathValue("name"), "err", err)
	panic(http.ErrAbortHandler)
}
