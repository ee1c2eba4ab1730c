package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/keys"
)

// On a shared store (--store azblob) every daemon lists every disk, and
// serves the ones it has attached: those it created, attached with `disk
// attach`, or took over. Attaching takes the disk's blob lease, which the
// store renews in the background; a daemon that loses it suspends the disk
// with reason LeaseLost. DATA_DIR/attached.json remembers what this daemon
// serves, so a restart attaches the same disks again.

// StateDetached is the state of a disk of a shared store that this daemon
// does not serve; StateReason names who does.
const StateDetached = "Detached"

// ReasonLeaseLost is the suspend reason of a disk whose lease was lost.
const ReasonLeaseLost = "LeaseLost"

// leaseLeased is the lease state of a disk this daemon holds.
const leaseLeased = "leased"

// refreshEvery is how often a daemon on a shared store re-reads the
// catalog in the background (and, with Takeover, looks for orphans).
const refreshEvery = 5 * time.Second

const attachedFile = "attached.json"

func (m *Manager) attachedPath() string { return filepath.Join(m.cfg.DataDir, attachedFile) }

// loadAttached reads the names this daemon served when it last ran.
func (m *Manager) loadAttached() (map[string]bool, error) {
	m.attached = map[string]bool{}
	raw, err := os.ReadFile(m.attachedPath())
	if errors.Is(err, os.ErrNotExist) {
		return m.attached, nil
	}
	if err != nil {
		return nil, fmt.Errorf("daemon: %w", err)
	}
	var names []string
	if err := json.Unmarshal(raw, &names); err != nil {
		return nil, fmt.Errorf("daemon: %s: %w", attachedFile, err)
	}
	for _, n := range names {
		m.attached[n] = true
	}
	return m.attached, nil
}

func (m *Manager) saveAttachedLocked() error {
	names := make([]string, 0, len(m.attached))
	for n := range m.attached {
		names = append(names, n)
	}
	slices.Sort(names)
	raw, _ := json.Marshal(names)
	return writeFileAtomic(m.attachedPath(), raw)
}

// setAttachedLocked records whether this daemon serves name.
func (m *Manager) setAttachedLocked(name string, on bool) error {
	if m.attached == nil {
		m.attached = map[string]bool{}
	}
	if m.attached[name] == on {
		return nil
	}
	if on {
		m.attached[name] = true
	} else {
		delete(m.attached, name)
	}
	return m.saveAttachedLocked()
}

// leaseOptions are how a disk of a shared store is opened: a lease this
// daemon's earlier run left behind (it crashed; the data directory lock
// says no other process is this daemon now) is broken rather than waited
// out, as is any lease when force is set.
func (m *Manager) leaseOptions(e *entry, ref ImageRef, force bool) OpenOptions {
	name := e.name
	return OpenOptions{
		BreakLease:  force || (ref.HeldBy != "" && ref.HeldBy == m.cfg.DaemonID),
		OnLeaseLost: func() { m.leaseLost(name) },
	}
}

func metaOf(d *cryptodisk.Disk) ImageMeta {
	p := d.Token().Properties
	return ImageMeta{EncryptionType: p["encryptionType"], DES: p["des"], SectorSize: d.SectorSize(), SizeBytes: d.Size()}
}

// leaseLost suspends a disk whose lease the store found lost: its writes
// already fail at the store; the suspension makes that visible (state
// Suspended, reason LeaseLost, in `disk show` and the metrics) and holds
// new I/O. The disk is no longer re-attached at restart.
func (m *Manager) leaseLost(name string) {
	m.mu.Lock()
	e, ok := m.disks[name]
	if !ok || e.disk == nil || e.remote || e.lost {
		m.mu.Unlock()
		return
	}
	if ll, ok := e.store.(interface{ LeaseLost() bool }); ok && !ll.LeaseLost() {
		m.mu.Unlock()
		return // an earlier store of this disk, since replaced
	}
	e.lost, e.leaseState = true, "lost"
	if err := m.setAttachedLocked(name, false); err != nil {
		m.log.Warn("attached-disk list not saved", "err", err)
	}
	d := e.disk
	m.mu.Unlock()
	d.Suspend(ReasonLeaseLost)
	m.cfg.Audit.Record(AuditEvent{Event: "suspend", Disk: name, KeyID: d.Token().KeyID,
		Detail: fmt.Sprintf("reason=%s writesCompleted=%d", ReasonLeaseLost, d.WritesCompleted())})
	m.log.Error("disk lease lost: suspended; no write of this daemon lands any more", "disk", name)
}

// Refresh re-reads a shared catalog: disks other daemons made appear
// (detached), disks they deleted go, and who serves each is updated. It
// does nothing on files.
func (m *Manager) Refresh(ctx context.Context) error {
	if !m.images.Shared() {
		return nil
	}
	refs, err := m.images.List(ctx)
	if err != nil {
		return fmt.Errorf("daemon: catalog: %w", err)
	}
	snaps, err := m.images.Snapshots(ctx)
	if err != nil {
		return fmt.Errorf("daemon: catalog: %w", err)
	}
	if err := m.refreshDES(ctx); err != nil {
		return err
	}
	m.mu.Lock()
	seen := map[string]bool{}
	for _, ref := range refs {
		seen[ref.Name] = true
		e, ok := m.disks[ref.Name]
		if !ok {
			e = &entry{name: ref.Name, path: m.images.Location(ref.Name), remote: true}
			if a, err := m.loadAccess(ref.Name); err == nil {
				e.access = a
			}
			m.disks[ref.Name] = e
		}
		if e.remote || e.lost {
			e.heldBy, e.leaseState, e.meta = ref.HeldBy, ref.LeaseState, ref.Meta
		}
	}
	for name, e := range m.disks {
		if e.remote && !seen[name] {
			delete(m.disks, name)
		}
	}
	var added []string
	gone := map[string]bool{}
	for full := range m.snaps {
		gone[full] = true
	}
	for _, full := range snaps {
		delete(gone, full)
		if _, ok := m.snaps[full]; !ok {
			if _, _, err := SplitSnapshotName(full); err == nil {
				added = append(added, full)
			}
		}
	}
	for full := range gone {
		if e := m.snaps[full]; e.disk != nil && e.conns.Load() == 0 {
			e.disk.Close()
			delete(m.snaps, full)
		}
	}
	m.mu.Unlock()
	for _, full := range added {
		d, info, err := m.openSnapshot(ctx, full)
		m.mu.Lock()
		if _, ok := m.snaps[full]; ok {
			m.mu.Unlock()
			if d != nil {
				d.Close()
			}
			continue
		}
		e := &entry{name: full, path: m.images.Location(full), disk: d, info: info, openErr: err}
		m.snaps[full] = e
		if d != nil && info.Token.Provider == keys.KeyVaultName {
			if de, ok := m.des[info.Token.Properties["des"]]; ok {
				m.watchLocked(e, de.rec.Name, de.kv)
			}
		}
		m.mu.Unlock()
	}
	return nil
}

// Attach makes this daemon serve a disk of a shared store. A disk another
// daemon serves is refused with ErrServedElsewhere naming it, unless that
// daemon stopped renewing its lease (it died): with wait, Attach waits up
// to one lease duration for the lease to expire. force breaks a live
// holder's lease: its next write fails and it suspends the disk. Attaching
// a disk whose lease this daemon lost replaces the suspended disk.
func (m *Manager) Attach(ctx context.Context, name string, force, wait bool) (DiskInfo, error) {
	if !m.images.Shared() {
		return DiskInfo{}, fmt.Errorf("%w: attach is for disks on a shared store (--store azblob); every disk in the data directory is served", ErrInvalid)
	}
	if err := m.Refresh(ctx); err != nil {
		return DiskInfo{}, err
	}
	m.mu.Lock()
	e, ok := m.disks[name]
	switch {
	case !ok:
		m.mu.Unlock()
		return DiskInfo{}, fmt.Errorf("%w: %s", ErrNotFound, name)
	case e.disk != nil && !e.lost:
		defer m.mu.Unlock()
		return m.infoLocked(e), nil
	case !e.remote && !e.lost:
		m.mu.Unlock()
		return DiskInfo{}, fmt.Errorf("%w: %s: %v", ErrUnavailable, name, e.openErr)
	}
	if e.attaching {
		m.mu.Unlock()
		return DiskInfo{}, fmt.Errorf("%w: %s is being attached", ErrInUse, name)
	}
	e.attaching = true
	ref := ImageRef{Name: name, HeldBy: e.heldBy, LeaseState: e.leaseState}
	old := e.disk
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		e.attaching = false
		m.mu.Unlock()
	}()
	if old != nil {
		old.Close() // suspended since its lease was lost; its store holds nothing
	}
	o := m.leaseOptions(e, ref, force)
	o.WaitForExpiry = wait && !o.BreakLease
	wctx := ctx
	if o.WaitForExpiry {
		var cancel context.CancelFunc
		wctx, cancel = context.WithTimeout(ctx, m.cfg.LeaseDuration+5*time.Second)
		defer cancel()
	}
	d, store, info, err := m.openDisk(wctx, name, o)
	if err != nil {
		if ctx.Err() == nil && wctx.Err() != nil {
			holder := ref.HeldBy
			if holder == "" {
				holder = "another daemon"
			}
			return DiskInfo{}, fmt.Errorf("%w: %s is served by %s, which kept renewing its lease for %v; use --force to break it",
				ErrServedElsewhere, name, holder, m.cfg.LeaseDuration)
		}
		if errors.Is(err, ErrServedElsewhere) {
			return DiskInfo{}, err
		}
		return DiskInfo{}, fmt.Errorf("daemon: attach %s: %w", name, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	e.disk, e.store, e.info, e.openErr = d, store, info, nil
	e.remote, e.lost = false, false
	e.heldBy, e.leaseState, e.meta = m.cfg.DaemonID, leaseLeased, metaOf(d)
	if err := m.setAttachedLocked(name, true); err != nil {
		m.log.Warn("attached-disk list not saved", "err", err)
	}
	if info.Token.Provider == keys.KeyVaultName {
		if de, ok := m.des[info.Token.Properties["des"]]; ok {
			m.watchLocked(e, de.rec.Name, de.kv)
		}
	}
	how := "attached"
	if force {
		how = "attached, breaking the previous holder's lease"
	} else if ref.HeldBy != "" && ref.HeldBy != m.cfg.DaemonID {
		how = "taken over from " + ref.HeldBy
	}
	m.cfg.Audit.Record(AuditEvent{Event: "attach", Disk: name, KeyID: info.Token.KeyID, Detail: how})
	m.log.Info("disk attached", "disk", name, "how", how, "previousHolder", ref.HeldBy)
	return m.infoLocked(e), nil
}

// Detach stops serving a disk of a shared store and releases its lease, so
// another daemon can attach it at once. Live connections are refused
// unless force.
func (m *Manager) Detach(ctx context.Context, name string, force bool) (DiskInfo, error) {
	if !m.images.Shared() {
		return DiskInfo{}, fmt.Errorf("%w: detach is for disks on a shared store (--store azblob)", ErrInvalid)
	}
	m.mu.Lock()
	e, ok := m.disks[name]
	switch {
	case !ok:
		m.mu.Unlock()
		return DiskInfo{}, fmt.Errorf("%w: %s", ErrNotFound, name)
	case e.remote:
		defer m.mu.Unlock()
		return m.infoLocked(e), nil
	case e.disk == nil || e.attaching:
		m.mu.Unlock()
		return DiskInfo{}, fmt.Errorf("%w: %s is being made or attached", ErrInUse, name)
	}
	if n := e.conns.Load(); n > 0 && !force {
		m.mu.Unlock()
		return DiskInfo{}, fmt.Errorf("%w: %s has %d; disconnect them or use --force", ErrInUse, name, n)
	}
	stop := e.takeStopWatch()
	d := e.disk
	e.disk, e.store, e.remote, e.lost = nil, nil, true, false
	e.heldBy, e.leaseState = "", "available"
	err := m.setAttachedLocked(name, false)
	m.mu.Unlock()
	stop() // before Close, as in Delete
	if err != nil {
		m.log.Warn("attached-disk list not saved", "err", err)
	}
	ferr := d.Flush(ctx)
	if cerr := d.Close(); ferr == nil {
		ferr = cerr
	}
	if mx := m.cfg.Metrics; mx != nil {
		mx.ForgetDisk(name)
	}
	m.cfg.Audit.Record(AuditEvent{Event: "detach", Disk: name})
	m.log.Info("disk detached", "disk", name)
	if ferr != nil {
		return DiskInfo{}, fmt.Errorf("daemon: detach %s: %w", name, ferr)
	}
	return m.Show(name)
}

// runShared refreshes the catalog until ctx is done and, with Takeover,
// attaches disks whose holder's lease expired or was broken.
func (m *Manager) runShared(ctx context.Context) {
	t := time.NewTicker(refreshEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := m.Refresh(ctx); err != nil {
			m.log.Warn("catalog refresh failed", "err", err)
			continue
		}
		if !m.cfg.Takeover {
			continue
		}
		m.mu.Lock()
		var orphans []string
		for name, e := range m.disks {
			if e.remote && (e.leaseState == "expired" || e.leaseState == "broken") {
				orphans = append(orphans, name)
			}
		}
		m.mu.Unlock()
		for _, name := range orphans {
			if _, err := m.Attach(ctx, name, false, false); err != nil {
				m.log.Warn("takeover failed", "disk", name, "err", err)
			}
		}
	}
}

// refreshDES adds the disk encryption sets other daemons created since this
// one read them. Changes to known sets (rotation) are made through the
// daemon serving their disks and reach the others when they restart.
func (m *Manager) refreshDES(ctx context.Context) error {
	recs, err := m.images.Records(ctx, desDir)
	if err != nil {
		return fmt.Errorf("daemon: disk encryption sets: %w", err)
	}
	for name, raw := range recs {
		m.mu.Lock()
		_, known := m.des[name]
		m.mu.Unlock()
		if known {
			continue
		}
		var rec DESRecord
		if err := json.Unmarshal(raw, &rec); err != nil {
			m.log.Warn("disk encryption set not loaded", "des", name, "err", err)
			continue
		}
		kv, err := m.newKeyVault(rec)
		if err != nil {
			m.log.Warn("disk encryption set not loaded", "des", name, "err", err)
			continue
		}
		m.mu.Lock()
		if _, ok := m.des[name]; !ok {
			m.des[name] = &desEntry{rec: rec, kv: kv}
		}
		m.mu.Unlock()
	}
	return nil
}
