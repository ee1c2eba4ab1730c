package daemon

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
)

// CreateSnapshot snapshots disk source as source@name.
func (c *Client) CreateSnapshot(ctx context.Context, source, name string) (SnapshotInfo, error) {
	var out SnapshotInfo
	return out, c.do(ctx, http.MethodPost, "/v1/snapshots", SnapshotRequest{Name: name, Source: source}, &out)
}

// ListSnapshots lists the snapshots of disk, or all if disk is empty.
func (c *Client) ListSnapshots(ctx context.Context, disk string) ([]SnapshotInfo, error) {
	var out []SnapshotInfo
	q := ""
	if disk != "" {
		q = "?disk=" + url.QueryEscape(disk)
	}
	return out, c.do(ctx, http.MethodGet, "/v1/snapshots"+q, nil, &out)
}

// ShowSnapshot returns the snapshot DISK@SNAP.
func (c *Client) ShowSnapshot(ctx context.Context, full string) (SnapshotInfo, error) {
	var out SnapshotInfo
	return out, c.do(ctx, http.MethodGet, "/v1/snapshots/"+url.PathEscape(full), nil, &out)
}

// DeleteSnapshot deletes the snapshot DISK@SNAP.
func (c *Client) DeleteSnapshot(ctx context.Context, full string, force bool) error {
	return c.do(ctx, http.MethodDelete, fmt.Sprintf("/v1/snapshots/%s?force=%t", url.PathEscape(full), force), nil, nil)
}

// streaming is c's HTTP client without the overall timeout: transfers of
// large disks take as long as they take, bounded by ctx.
func (c *Client) streaming() *http.Client {
	return &http.Client{Transport: c.hc.Transport}
}

// errorFrom turns a non-2xx response into a StatusError.
func errorFrom(resp *http.Response) error {
	var ae apiError
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if json.Unmarshal(raw, &ae) != nil || ae.Error == "" {
		ae.Error = fmt.Sprintf("daemon answered %s", resp.Status)
	}
	return &StatusError{Status: resp.StatusCode, Message: ae.Error}
}

// CreateDiskProgress creates a disk from a snapshot, calling progress as
// the daemon reports it.
func (c *Client) CreateDiskProgress(ctx context.Context, r CreateRequest, progress Progress) (DiskInfo, error) {
	b, err := json.Marshal(r)
	if err != nil {
		return DiskInfo{}, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://cryptnbd/v1/disks?progress=ndjson", bytes.NewReader(b))
	if err != nil {
		return DiskInfo{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.streaming().Do(req)
	if err != nil {
		return DiskInfo{}, fmt.Errorf("cannot reach the daemon: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return DiskInfo{}, errorFrom(resp)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var l ProgressLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			return DiskInfo{}, fmt.Errorf("daemon reply: %w", err)
		}
		switch {
		case l.Error != "":
			return DiskInfo{}, &StatusError{Status: l.Status, Message: l.Error}
		case l.Disk != nil:
			if progress != nil {
				progress(l.DoneBytes, l.TotalBytes)
			}
			return *l.Disk, nil
		case progress != nil:
			progress(l.DoneBytes, l.TotalBytes)
		}
	}
	if err := sc.Err(); err != nil {
		return DiskInfo{}, fmt.Errorf("daemon reply: %w", err)
	}
	return DiskInfo{}, fmt.Errorf("daemon reply: the progress stream ended without a result")
}

// ImportDisk creates disk r.Name from the raw image read from body, which
// must hold exactly r.SizeBytes bytes. If ctx ends or body fails, the
// daemon discards the partial disk.
func (c *Client) ImportDisk(ctx context.Context, r CreateRequest, body io.Reader) (DiskInfo, error) {
	q := url.Values{}
	q.Set("sizeBytes", strconv.FormatInt(r.SizeBytes, 10))
	if r.SectorSize != 0 {
		q.Set("sectorSize", strconv.Itoa(r.SectorSize))
	}
	if r.DES != "" {
		q.Set("des", r.DES)
	}
	if r.EncryptionType != "" {
		q.Set("encryptionType", r.EncryptionType)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, "http://cryptnbd/v1/disks/"+url.PathEscape(r.Name)+"/image?"+q.Encode(), io.NopCloser(body))
	if err != nil {
		return DiskInfo{}, err
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := c.streaming().Do(req)
	if err != nil {
		return DiskInfo{}, fmt.Errorf("import: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return DiskInfo{}, errorFrom(resp)
	}
	var out DiskInfo
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return DiskInfo{}, fmt.Errorf("daemon reply: %w", err)
	}
	return out, nil
}

// ExportDisk starts an export of a disk or snapshot's plaintext: the caller
// reads size bytes from body and closes it. A body that ends early means
// the export failed.
func (c *Client) ExportDisk(ctx context.Context, name string) (size int64, body io.ReadCloser, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://cryptnbd/v1/disks/"+url.PathEscape(name)+"/image", nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := c.streaming().Do(req)
	if err != nil {
		return 0, nil, fmt.Errorf("export: %w", err)
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		return 0, nil, errorFrom(resp)
	}
	size, err = strconv.ParseInt(resp.Header.Get("X-Cryptnbd-Size-Bytes"), 10, 64)
	if err != nil {
		resp.Body.Close()
		return 0, nil, fmt.Errorf("daemon reply: no size")
	}
	return size, resp.Body, nil
}
