package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/keys"
	"github.com/cryptnbd/cryptnbd/nbd"
)

// Snapshots live in DATA_DIR/snapshots as DISK@SNAP.luks: a copy of the
// disk's image taken under its write barrier, so the same LUKS2 header
// (UUID, keyslot, wrapped token) and the same volume key. They are opened
// read-only and served as read-only NBD exports named DISK@SNAP.
const snapDir = "snapshots"

// SnapshotInfo is a snapshot as the API and `snapshot show -o json` present it.
type SnapshotInfo struct {
	// Name is the full name, DISK@SNAP, which is also the NBD export name.
	Name           string    `json:"name"`
	Snapshot       string    `json:"snapshot"`
	Source         string    `json:"source"`
	SizeBytes      int64     `json:"sizeBytes"`
	AllocatedBytes int64     `json:"allocatedBytes"`
	SectorSize     int       `json:"sectorSize"`
	EncryptionType string    `json:"encryptionType"`
	DES            string    `json:"des,omitempty"`
	KeyProvider    string    `json:"keyProvider"`
	KeyID          string    `json:"keyId"`
	UUID           string    `json:"uuid"`
	State          string    `json:"state"`
	StateReason    string    `json:"stateReason,omitempty"`
	ReadOnly       bool      `json:"readOnly"`
	Connections    int64     `json:"connections"`
	Created        time.Time `json:"created"`
	// CloneMethod is how the image was copied: reflink or sparse-copy.
	CloneMethod string `json:"cloneMethod,omitempty"`
	Path        string `json:"path"`
	ExportName  string `json:"exportName"`
}

// SnapshotRequest is the body of POST /v1/snapshots.
type SnapshotRequest struct {
	Name   string `json:"name"`
	Source string `json:"source"`
}

// SplitSnapshotName splits DISK@SNAP, checking both halves like disk names.
func SplitSnapshotName(full string) (disk, snap string, err error) {
	disk, snap, ok := strings.Cut(full, "@")
	if !ok {
		return "", "", fmt.Errorf("snapshot %q: want DISK@SNAPSHOT", full)
	}
	if err := ValidateName(disk); err != nil {
		return "", "", err
	}
	if err := ValidateName(snap); err != nil {
		return "", "", fmt.Errorf("snapshot name: %w", err)
	}
	return disk, snap, nil
}

// loadSnapshots opens every snapshot read-only; like disks, one that cannot
// be opened is listed with its error.
func (m *Manager) loadSnapshots(ctx context.Context) error {
	m.snaps = map[string]*entry{}
	names, err := m.images.Snapshots(ctx)
	if err != nil {
		return fmt.Errorf("daemon: %w", err)
	}
	for _, full := range names {
		if _, _, err := SplitSnapshotName(full); err != nil {
			continue
		}
		m.addSnapshotLocked(ctx, full)
	}
	return nil
}

// addSnapshotLocked opens snapshot full and adds it to the table.
func (m *Manager) addSnapshotLocked(ctx context.Context, full string) *entry {
	e := &entry{name: full, path: m.images.Location(full)}
	e.disk, e.info, e.openErr = m.openSnapshot(ctx, full)
	if e.openErr != nil {
		m.log.Error("snapshot not opened", "snapshot", full, "err", e.openErr)
	}
	m.snaps[full] = e
	if e.disk != nil && e.info.Token.Provider == keys.KeyVaultName {
		if de, ok := m.des[e.info.Token.Properties["des"]]; ok {
			m.watchLocked(e, de.rec.Name, de.kv)
		}
	}
	return e
}

// openSnapshot opens a snapshot read-only through the provider its token
// names, with the unwrap audited under its name.
func (m *Manager) openSnapshot(ctx context.Context, full string) (*cryptodisk.Disk, *cryptodisk.Info, error) {
	store, err := m.images.OpenSnapshot(ctx, full)
	if err != nil {
		return nil, nil, err
	}
	return m.unlock(ctx, full, store, false)
}

// CreateSnapshot takes a crash-consistent snapshot of a disk: the image is
// cloned under the disk's write barrier, so it holds every write
// acknowledged before the call, while reads go on. Writes wait for the
// clone: an instant with a reflink, the time to copy the allocated data
// without one.
func (m *Manager) CreateSnapshot(ctx context.Context, r SnapshotRequest) (SnapshotInfo, error) {
	if err := ValidateName(r.Source); err != nil {
		return SnapshotInfo{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if err := ValidateName(r.Name); err != nil {
		return SnapshotInfo{}, fmt.Errorf("%w: snapshot name: %w", ErrInvalid, err)
	}
	full := r.Source + "@" + r.Name
	src, err := m.open(r.Source)
	if err != nil {
		return SnapshotInfo{}, err
	}
	m.mu.Lock()
	if _, ok := m.snaps[full]; ok {
		m.mu.Unlock()
		return SnapshotInfo{}, fmt.Errorf("%w: snapshot %s", ErrExists, full)
	}
	e := &entry{name: full, path: m.images.Location(full), openErr: errors.New("being created")}
	m.snaps[full] = e
	m.mu.Unlock()
	fail := func(err error) (SnapshotInfo, error) {
		m.mu.Lock()
		delete(m.snaps, full)
		m.mu.Unlock()
		return SnapshotInfo{}, fmt.Errorf("daemon: snapshot %s: %w", full, err)
	}

	var method string
	start := time.Now()
	err = src.disk.Barrier(func() error {
		var err error
		method, err = m.images.Snapshot(ctx, src.store, r.Source, full)
		return err
	})
	if err != nil {
		return fail(err)
	}
	paused := time.Since(start)
	d, info, err := m.openSnapshot(ctx, full)
	if err != nil {
		m.images.RemoveSnapshot(context.WithoutCancel(ctx), full)
		return fail(err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	e.disk, e.info, e.openErr = d, info, nil
	if info.Token.Provider == keys.KeyVaultName {
		if de, ok := m.des[info.Token.Properties["des"]]; ok {
			m.watchLocked(e, de.rec.Name, de.kv)
		}
	}
	m.cfg.Audit.Record(AuditEvent{Event: "snapshot", Disk: r.Source, KeyID: info.Token.KeyID, Detail: full + " (" + method + ")"})
	m.log.Info("snapshot created", "disk", r.Source, "snapshot", full, "method", method, "writesPaused", paused)
	si := m.snapInfoLocked(e)
	si.CloneMethod = method
	return si, nil
}

// publishFile syncs tmp, sets its mode, renames it to path and syncs the
// directory, so the name appears only for a complete, durable file.
func publishFile(tmp, path string, mode os.FileMode) error {
	if err := syncFile(tmp); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Chmod(tmp, mode); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return syncDir(filepath.Dir(path))
}

// ListSnapshots returns the snapshots of disk, or all if disk is empty.
func (m *Manager) ListSnapshots(disk string) []SnapshotInfo {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := []SnapshotInfo{}
	for full, e := range m.snaps {
		if disk == "" || strings.HasPrefix(full, disk+"@") {
			out = append(out, m.snapInfoLocked(e))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// ShowSnapshot returns one snapshot by its full name.
func (m *Manager) ShowSnapshot(full string) (SnapshotInfo, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.snaps[full]
	if !ok {
		return SnapshotInfo{}, fmt.Errorf("%w: snapshot %s", ErrNotFound, full)
	}
	return m.snapInfoLocked(e), nil
}

func (m *Manager) snapInfoLocked(e *entry) SnapshotInfo {
	disk, snap, _ := strings.Cut(e.name, "@")
	si := SnapshotInfo{Name: e.name, Snapshot: snap, Source: disk, Path: e.path, ExportName: e.name,
		ReadOnly: true, Connections: e.conns.Load()}
	si.Created, si.AllocatedBytes = m.images.SnapshotStat(e.name)
	if e.info != nil {
		tok := e.info.Token
		si.KeyProvider, si.KeyID, si.UUID, si.SectorSize = tok.Provider, tok.KeyID, e.info.UUID, e.info.SectorSize
		si.EncryptionType, si.DES = tok.Properties["encryptionType"], tok.Properties["des"]
		si.SizeBytes = e.info.SizeBytes
	}
	if e.disk == nil {
		si.State = "Unavailable"
		if e.openErr != nil {
			si.StateReason = e.openErr.Error()
		}
		return si
	}
	si.SizeBytes = e.disk.Size()
	st, reason, _ := e.disk.State()
	si.State, si.StateReason = string(st), reason
	return si
}

// DeleteSnapshot crypto-shreds the snapshot's own header copy and removes
// it. The source disk and anything else sharing its volume key are untouched.
func (m *Manager) DeleteSnapshot(ctx context.Context, full string, force bool) error {
	m.mu.Lock()
	e, ok := m.snaps[full]
	if !ok {
		m.mu.Unlock()
		return fmt.Errorf("%w: snapshot %s", ErrNotFound, full)
	}
	if e.disk == nil && e.info == nil && e.openErr != nil && e.openErr.Error() == "being created" {
		m.mu.Unlock()
		return fmt.Errorf("%w: snapshot %s is being created", ErrInUse, full)
	}
	if n := e.conns.Load(); n > 0 && !force {
		m.mu.Unlock()
		return fmt.Errorf("%w: snapshot %s has %d; disconnect them or use --force", ErrInUse, full, n)
	}
	delete(m.snaps, full)
	stop := e.takeStopWatch()
	m.mu.Unlock()
	stop() // before Close, as in Delete
	if e.disk != nil {
		e.disk.Close()
	}
	if err := m.images.RemoveSnapshot(ctx, full); err != nil {
		return fmt.Errorf("daemon: delete snapshot %s: %w", full, err)
	}
	m.cfg.Audit.Record(AuditEvent{Event: "delete-snapshot", Disk: e.name[:strings.IndexByte(e.name, '@')], Detail: full})
	m.log.Info("snapshot deleted", "snapshot", full)
	return nil
}

// snapshotsOfLocked names the snapshots of disk.
func (m *Manager) snapshotsOfLocked(disk string) []string {
	var out []string
	for full := range m.snaps {
		if strings.HasPrefix(full, disk+"@") {
			out = append(out, full)
		}
	}
	sort.Strings(out)
	return out
}

// sharersLocked names the other disks and snapshots whose image carries the
// same LUKS2 header (same UUID), hence the same volume key.
func (m *Manager) sharersLocked(e *entry) []string {
	if e.info == nil || e.info.UUID == "" {
		return nil
	}
	var out []string
	for _, set := range []map[string]*entry{m.disks, m.snaps} {
		for name, o := range set {
			if o != e && o.info != nil && o.info.UUID == e.info.UUID {
				out = append(out, name)
			}
		}
	}
	sort.Strings(out)
	return out
}

// exportSnapshotLocked opens a snapshot as a read-only NBD export.
func (m *Manager) exportSnapshotLocked(name string) (*nbd.Export, error) {
	e, ok := m.snaps[name]
	if !ok || e.disk == nil {
		return nil, fmt.Errorf("%w: %q", nbd.ErrUnknownExport, name)
	}
	e.conns.Add(1)
	var once sync.Once
	return &nbd.Export{
		ExportInfo: m.snapExportInfoLocked(e),
		Backend:    e.disk,
		Release:    func() { once.Do(func() { e.conns.Add(-1) }) },
	}, nil
}

func (m *Manager) snapExportInfoLocked(e *entry) nbd.ExportInfo {
	si := m.snapInfoLocked(e)
	return nbd.ExportInfo{
		Name:        e.name,
		Description: fmt.Sprintf("snapshot of %s, %s, read-only, %s", si.Source, HumanBytes(si.SizeBytes), si.State),
		ReadOnly:    true,
		MinBlock:    512, PreferredBlock: uint32(si.SectorSize), MaxBlock: maxBlock,
	}
}

// snapshotExportsLocked lists the open snapshots for NBD_OPT_LIST.
func (m *Manager) snapshotExportsLocked() []nbd.ExportInfo {
	var out []nbd.ExportInfo
	for _, e := range m.snaps {
		if e.disk != nil {
			out = append(out, m.snapExportInfoLocked(e))
		}
	}
	return out
}

// closeSnapshots closes every snapshot; they are read-only, so there is
// nothing to flush.
func (m *Manager) closeSnapshotsLocked() error {
	var errs []error
	for _, e := range m.snaps {
		if e.disk != nil {
			if err := e.disk.Close(); err != nil {
				errs = append(errs, fmt.Errorf("close %s: %w", e.name, err))
			}
		}
	}
	return errors.Join(errs...)
}
