package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/keys"
)

// diskTarget is what the revocation watcher suspends and resumes: a disk,
// with the provider that re-unwraps its key and the audit trail of both.
type diskTarget struct {
	m         *Manager
	name      string
	disk      *cryptodisk.Disk
	kv        *keys.KeyVault
	principal string
}

func (t diskTarget) Suspend(reason string) {
	t.disk.Suspend(reason)
	t.m.cfg.Audit.Record(AuditEvent{Event: "suspend", Disk: t.name, KeyID: t.disk.Token().KeyID, Principal: t.principal,
		Detail: fmt.Sprintf("reason=%s writesCompleted=%d", reason, t.disk.WritesCompleted())})
}

func (t diskTarget) Resume(ctx context.Context) error {
	before := t.disk.WritesCompleted()
	start := time.Now()
	err := t.disk.Resume(ctx, t.kv)
	kid := t.disk.Token().KeyID
	t.m.cfg.Audit.timed("unwrap", t.name, kid, t.principal, start, err)
	if err == nil {
		t.m.dekUnwrapped(kid)
		// The count is read before the gate opens again, so it is the
		// count at the end of the suspension.
		t.m.cfg.Audit.Record(AuditEvent{Event: "resume", Disk: t.name, KeyID: kid, Principal: t.principal,
			Detail: fmt.Sprintf("writesCompleted=%d", before)})
	}
	return err
}

// watch registers a customer-key disk with the watcher under its current
// kid, replacing any earlier registration. The earlier one is stopped
// outside m.mu (see takeStopWatch); if the disk went away meanwhile, it is
// not registered again.
func (m *Manager) watch(e *entry, des string, kv *keys.KeyVault) {
	m.mu.Lock()
	stop := e.takeStopWatch()
	m.mu.Unlock()
	stop()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.disks[e.name] != e || e.disk == nil {
		return
	}
	m.watchLocked(e, des, kv)
}

// takeStopWatch detaches the entry's watch and returns the function that
// ends it; the caller holds m.mu and calls the result after releasing it.
// Ending a watch waits for a Suspend or Resume of the disk in flight, and
// a Resume waits on Key Vault for as long as an unwrap may take: under
// m.mu that would stall every other disk operation meanwhile.
func (e *entry) takeStopWatch() (stop func()) {
	stop = e.stopWatch
	e.stopWatch = nil
	if stop == nil {
		return func() {}
	}
	return stop
}

// watchLocked registers the watch of a disk just opened. An entry that is
// already watched goes through watch instead, which stops the old watch
// outside m.mu; the stop here is only a guard against a double watch.
func (m *Manager) watchLocked(e *entry, des string, kv *keys.KeyVault) {
	if e.stopWatch != nil {
		e.stopWatch()
	}
	principal := ""
	if d, ok := m.des[des]; ok {
		principal = d.rec.Identity.PrincipalID
	}
	t := diskTarget{m: m, name: e.name, disk: e.disk, kv: kv, principal: principal}
	e.stopWatch = m.watcher.Watch(e.disk.Token().KeyID, expiryChecker{kv, m.cfg.Metrics}, t)
}

// desProvider validates a set before a disk is created against it: the key
// exists, is enabled and is RSA, the vault has purge protection, and the
// identity can get, wrap and unwrap. Every failure names what to fix.
func (m *Manager) desProvider(ctx context.Context, des string) (keys.Provider, string, error) {
	e, err := m.desEntry(des)
	if err != nil {
		return nil, "", fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	v, err := e.kv.Validate(cctx, e.rec.Identity.PrincipalID)
	if err != nil {
		return nil, "", fmt.Errorf("%w: disk encryption set %s: %w", ErrInvalid, des, err)
	}
	if e.kv.Current() == "" {
		e.kv.SetCurrent(v.KeyID)
	}
	if e.rec.ActiveKeyID == "" {
		m.mu.Lock()
		e.rec.ActiveKeyID = e.kv.Current()
		err := m.saveDES(e.rec)
		m.mu.Unlock()
		if err != nil {
			return nil, "", err
		}
	}
	return e.kv, e.rec.Identity.PrincipalID, nil
}

// onNewVersion follows automatic rotation: every set with
// rotationToLatestKeyVersionEnabled whose disks are under kid re-wraps
// them under latest. It runs off the watcher's goroutine.
func (m *Manager) onNewVersion(kid, latest string) {
	m.mu.Lock()
	var sets []string
	for name, e := range m.des {
		if !e.rec.RotationToLatestKeyVersionEnabled {
			continue
		}
		for _, d := range m.disks {
			if d.disk != nil && d.info != nil && d.info.Token.Properties["des"] == name && d.info.Token.KeyID == kid {
				sets = append(sets, name)
				break
			}
		}
	}
	m.mu.Unlock()
	for _, name := range sets {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			if _, err := m.RotateDES(ctx, name); err != nil {
				m.log.Error("automatic key rotation failed", "des", name, "kid", latest, "err", err)
				return
			}
			m.log.Info("automatic key rotation", "des", name, "from", kid, "kid", latest)
		}()
	}
}

// Run runs the revocation watcher and retries disks that could not be
// opened (their key was unavailable at start) until ctx is done.
func (m *Manager) Run(ctx context.Context) error {
	interval := m.cfg.Watch.Interval
	if interval <= 0 {
		interval = 30 * time.Second
	}
	if m.images.Shared() {
		go m.runShared(ctx)
	}
	go func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				m.retryUnavailable(ctx)
			}
		}
	}()
	err := m.watcher.Run(ctx)
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

func (m *Manager) retryUnavailable(ctx context.Context) {
	m.mu.Lock()
	var retry []*entry
	for _, e := range m.disks {
		if e.disk == nil && e.info != nil && !e.remote {
			retry = append(retry, e)
		}
	}
	m.mu.Unlock()
	for _, e := range retry {
		o := OpenOptions{}
		if m.images.Shared() {
			o = m.leaseOptions(e, ImageRef{Name: e.name}, false)
		}
		d, store, info, err := m.openDisk(ctx, e.name, o)
		m.mu.Lock()
		if cur, ok := m.disks[e.name]; !ok || cur != e || e.disk != nil || e.remote {
			m.mu.Unlock()
			if d != nil {
				d.Close()
			}
			continue
		}
		if err != nil {
			e.openErr = err
			m.mu.Unlock()
			continue
		}
		e.disk, e.store, e.info, e.openErr = d, store, info, nil
		if info.Token.Provider == keys.KeyVaultName {
			if de, ok := m.des[info.Token.Properties["des"]]; ok {
				m.watchLocked(e, de.rec.Name, de.kv)
			}
		}
		m.mu.Unlock()
		m.log.Info("disk opened after its key became available", "disk", e.name)
	}
}

// writeFileAtomic replaces path via a synced temporary file and a rename.
func writeFileAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err == nil {
		err = syncDir(filepath.Dir(path))
	}
	return err
}
