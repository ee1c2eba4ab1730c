package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/blobstore"
	"github.com/cryptnbd/cryptnbd/keys"
	"github.com/cryptnbd/cryptnbd/metrics"
	"github.com/cryptnbd/cryptnbd/nbd"
)

// Encryption types, named as Azure names them.
const (
	EncryptionPlatformKey = "EncryptionAtRestWithPlatformKey"
	EncryptionCustomerKey = "EncryptionAtRestWithCustomerKey"
)

const (
	diskDir     = "disks"
	diskExt     = ".luks"
	creatingExt = ".creating"
	// maxBlock is the NBD payload cap advertised to clients.
	maxBlock = 32 << 20
)

var (
	// ErrNotFound: no disk of that name.
	ErrNotFound = errors.New("disk not found")
	// ErrExists: a disk of that name exists already.
	ErrExists = errors.New("disk already exists")
	// ErrInUse: the disk has live connections.
	ErrInUse = errors.New("disk has live connections")
	// ErrInvalid: the request is malformed.
	ErrInvalid = errors.New("invalid request")
)

// Config is what a Manager needs.
type Config struct {
	DataDir string
	Logger  *slog.Logger
	// Providers by name; "platform" must be present.
	Providers map[string]keys.Provider
	Audit     *Audit
	Disk      cryptodisk.Options
	// PBKDFIterations for new disks' keyslots (tests lower it).
	PBKDFIterations int
	// Vault reaches Key Vault for disk encryption sets; nil allows none.
	Vault *VaultConfig
	// Watch configures the revocation watcher of customer-managed keys.
	Watch keys.WatcherOptions
	// Metrics receives I/O, connection, key and state figures; nil for none.
	Metrics *metrics.Metrics
	// Images is where disk images live; nil means files in DataDir.
	Images Images
	// DaemonID names this daemon to others sharing Images (the lease
	// holder); empty for files.
	DaemonID string
	// Takeover makes the daemon attach, on its own, shared disks whose
	// holder stopped renewing its lease (see Manager.Run).
	Takeover bool
	// LeaseDuration is the shared store's lease duration: how long Attach
	// waits for a dead holder's lease to expire. Zero means 30 s.
	LeaseDuration time.Duration
}

// Manager owns the disks in a data directory. Safe for concurrent use.
type Manager struct {
	cfg    Config
	log    *slog.Logger
	images Images

	mu      sync.Mutex
	disks   map[string]*entry
	snaps   map[string]*entry // snapshots by DISK@SNAP; see snapshot.go
	des     map[string]*desEntry
	watcher *keys.Watcher
	// attached is what this daemon serves of a shared store; see attach.go.
	attached map[string]bool
}

type entry struct {
	name string
	path string
	disk *cryptodisk.Disk
	// store is disk's storage (the disk owns it), kept for snapshots.
	store cryptodisk.Storage
	// remote marks a disk of a shared store that this daemon does not
	// serve; heldBy and leaseState say who does. meta is the catalog's
	// view of it.
	remote     bool
	heldBy     string
	leaseState string
	meta       ImageMeta
	// lost marks a disk served here whose lease was lost (it is suspended);
	// attaching marks one being attached.
	lost      bool
	attaching bool
	conns     atomic.Int64
	// openErr is why the disk could not be opened at start (for example its
	// key is revoked); such a disk is listed but not served.
	openErr error
	info    *cryptodisk.Info
	// stopWatch ends the revocation watch of a customer-key disk.
	stopWatch func()
	// access is who may open the disk over NBD; see access.go.
	access Access
}

// DiskInfo is a disk as the API and `disk show -o json` present it.
type DiskInfo struct {
	Name           string `json:"name"`
	SizeBytes      int64  `json:"sizeBytes"`
	SectorSize     int    `json:"sectorSize"`
	EncryptionType string `json:"encryptionType"`
	KeyProvider    string `json:"keyProvider"`
	KeyID          string `json:"keyId"`
	State          string `json:"state"`
	StateReason    string `json:"stateReason,omitempty"`
	Path           string `json:"path"`
	ExportName     string `json:"exportName"`
	UUID           string `json:"uuid"`
	Connections    int64  `json:"connections"`
	Cipher         string `json:"cipher"`
	// WritesCompleted counts writes completed since the disk was opened; it
	// stands still while the disk is suspended.
	WritesCompleted uint64 `json:"writesCompleted"`
	// SuspendedSince is when the current suspension began.
	SuspendedSince *time.Time `json:"suspendedSince,omitempty"`
	// Allow and AllowReadOnly are the NBD access rules; see Access.
	Allow         []string `json:"allow,omitempty"`
	AllowReadOnly []string `json:"allowReadOnly,omitempty"`
	// Cumulative I/O since the daemon started, for `cryptnbd status`.
	ReadBytes  uint64            `json:"readBytes"`
	WriteBytes uint64            `json:"writeBytes"`
	ReadOps    uint64            `json:"readOps"`
	WriteOps   uint64            `json:"writeOps"`
	Properties map[string]string `json:"properties,omitempty"`
	// SharesVolumeKeyWith names the disks and snapshots made by copying this
	// image (or that it was copied from): they hold the same volume key.
	SharesVolumeKeyWith []string `json:"sharesVolumeKeyWith,omitempty"`
	// ServedBy is the daemon serving the disk (its lease holder), and
	// LeaseState the blob lease's state, on a shared store (--store azblob).
	ServedBy   string `json:"servedBy,omitempty"`
	LeaseState string `json:"leaseState,omitempty"`
}

// CreateRequest is the body of a disk creation.
type CreateRequest struct {
	Name           string `json:"name"`
	SizeBytes      int64  `json:"sizeBytes"`
	SectorSize     int    `json:"sectorSize,omitempty"`
	EncryptionType string `json:"encryptionType,omitempty"`
	// DES is the disk encryption set of a customer-key disk.
	DES string `json:"des,omitempty"`
	// Source is a snapshot, DISK@SNAP, to copy; see createFromSnapshot.
	Source string `json:"source,omitempty"`
	// Reencrypt gives a disk made from Source its own volume key.
	Reencrypt bool `json:"reencrypt,omitempty"`
}

// NewManager opens every disk in cfg.DataDir. A disk that cannot be opened
// (its key unavailable, say) is kept in the list with its error rather than
// stopping the daemon.
func NewManager(ctx context.Context, cfg Config) (*Manager, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Providers[keys.PlatformName] == nil {
		return nil, errors.New("daemon: no platform key provider")
	}
	if cfg.Images == nil {
		cfg.Images = NewFileImages(cfg.DataDir)
	}
	if cfg.LeaseDuration == 0 {
		cfg.LeaseDuration = 30 * time.Second
	}
	m := &Manager{cfg: cfg, log: cfg.Logger, images: cfg.Images, disks: map[string]*entry{}, des: map[string]*desEntry{}}
	wo := cfg.Watch
	wo.Logger = cfg.Logger
	userEvent := wo.OnEvent
	wo.OnEvent = func(ev keys.WatchEvent) {
		if mx := cfg.Metrics; mx != nil {
			vault, key := metrics.KeyLabels(ev.KeyID)
			mx.KeyEvent(vault, key, ev.Kind, ev.Reason, ev.GraceRemaining, ev.Err)
		}
		if userEvent != nil {
			userEvent(ev)
		}
	}
	userNew := wo.OnNewVersion
	wo.OnNewVersion = func(kid, latest string) {
		m.onNewVersion(kid, latest)
		if userNew != nil {
			userNew(kid, latest)
		}
	}
	m.watcher = keys.NewWatcher(wo)
	if err := m.loadDES(ctx); err != nil {
		return nil, err
	}
	refs, err := m.images.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("daemon: %w", err)
	}
	var attach map[string]bool
	if m.images.Shared() {
		if attach, err = m.loadAttached(); err != nil {
			return nil, err
		}
	}
	for _, ref := range refs {
		name := ref.Name
		e := &entry{name: name, path: m.images.Location(name), meta: ref.Meta, heldBy: ref.HeldBy, leaseState: ref.LeaseState}
		if e.access, err = m.loadAccess(name); err != nil {
			return nil, fmt.Errorf("daemon: %w", err)
		}
		if m.images.Shared() && !attach[name] {
			e.remote = true
			m.disks[name] = e
			continue
		}
		o := OpenOptions{}
		if m.images.Shared() {
			o = m.leaseOptions(e, ref, false)
		}
		e.disk, e.store, e.info, e.openErr = m.openDisk(ctx, name, o)
		if e.openErr != nil {
			m.log.Error("disk not opened", "disk", name, "err", e.openErr)
			if errors.Is(e.openErr, ErrServedElsewhere) {
				// Taken over while this daemon was away: it is the other's now.
				e.remote, e.openErr = true, nil
				delete(attach, name)
			}
		} else {
			m.log.Info("disk opened", "disk", name, "sizeBytes", e.disk.Size(), "kid", e.info.Token.KeyID)
			e.heldBy, e.leaseState = m.cfg.DaemonID, leaseLeased
		}
		m.disks[name] = e
		if e.disk != nil && e.info.Token.Provider == keys.KeyVaultName {
			m.watchLocked(e, e.info.Token.Properties["des"], m.des[e.info.Token.Properties["des"]].kv)
		}
	}
	if m.images.Shared() {
		if err := m.saveAttachedLocked(); err != nil {
			return nil, err
		}
	}
	if err := m.loadSnapshots(ctx); err != nil {
		return nil, err
	}
	return m, nil
}

// openDisk opens a disk's image read-write and unlocks it.
func (m *Manager) openDisk(ctx context.Context, name string, o OpenOptions) (*cryptodisk.Disk, cryptodisk.Storage, *cryptodisk.Info, error) {
	store, err := m.images.Open(ctx, name, o)
	if err != nil {
		return nil, nil, nil, err
	}
	d, info, err := m.unlock(ctx, name, store, true)
	if err != nil {
		return nil, nil, info, err
	}
	return d, store, info, nil
}

// unlock reads store's header and opens the disk through the provider its
// token names, with the unwrap audited under name. On error store is
// closed. countDEK records the unwrap in the metrics.
func (m *Manager) unlock(ctx context.Context, name string, store cryptodisk.Storage, countDEK bool) (*cryptodisk.Disk, *cryptodisk.Info, error) {
	info, err := cryptodisk.Inspect(ctx, store)
	if err != nil {
		store.Close()
		return nil, nil, err
	}
	p, principal, err := m.providerFor(info.Token)
	if err != nil {
		store.Close()
		return nil, info, err
	}
	start := time.Now()
	d, err := cryptodisk.Open(ctx, store, p, m.diskOptions(name))
	m.cfg.Audit.timed("unwrap", name, info.Token.KeyID, principal, start, err)
	if err == nil && countDEK {
		m.dekUnwrapped(info.Token.KeyID)
	}
	if err != nil {
		store.Close()
		return nil, info, err
	}
	return d, info, nil
}

func (m *Manager) diskOptions(name string) cryptodisk.Options {
	o := m.cfg.Disk
	o.Logger = m.log.With("disk", name)
	return o
}

func (m *Manager) provider(name string) (keys.Provider, error) {
	p := m.cfg.Providers[name]
	if p == nil {
		return nil, fmt.Errorf("daemon: disk uses key provider %q, which this daemon is not configured for", name)
	}
	return p, nil
}

// providerFor picks the provider a disk's token names, and the principal
// that acts through it (for the audit log).
func (m *Manager) providerFor(tok cryptodisk.Token) (keys.Provider, string, error) {
	if tok.Provider != keys.KeyVaultName {
		p, err := m.provider(tok.Provider)
		if err != nil {
			return nil, "", err
		}
		return p, tok.Provider, nil
	}
	des := tok.Properties["des"]
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.des[des]
	if !ok {
		return nil, "", fmt.Errorf("daemon: disk uses disk encryption set %q, which does not exist here", des)
	}
	return e.kv, e.rec.Identity.PrincipalID, nil
}

// Create makes a new disk. It is written under a temporary name and renamed
// into place, so a crash never leaves a half-made disk visible.
func (m *Manager) Create(ctx context.Context, r CreateRequest) (DiskInfo, error) {
	if r.Source != "" || r.Reencrypt {
		return m.createFromSnapshot(ctx, r, nil)
	}
	if err := checkCreate(&r); err != nil {
		return DiskInfo{}, err
	}
	// Reserve the name while the (slow) creation runs without the lock.
	e, err := m.reserve(ctx, r.Name, "being created")
	if err != nil {
		return DiskInfo{}, err
	}
	d, ni, err := m.createImage(ctx, r, nil)
	if err != nil {
		m.abandon(e, nil, nil)
		return DiskInfo{}, err
	}
	di, err := m.publish(ctx, e, d, ni)
	if err != nil {
		return DiskInfo{}, fmt.Errorf("daemon: create %s: %w", r.Name, err)
	}
	m.log.Info("disk created", "disk", r.Name, "sizeBytes", r.SizeBytes, "kid", di.KeyID)
	return di, nil
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// List returns every disk, sorted by name.
func (m *Manager) List() []DiskInfo {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]DiskInfo, 0, len(m.disks))
	for _, e := range m.disks {
		out = append(out, m.infoLocked(e))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Show returns one disk.
func (m *Manager) Show(name string) (DiskInfo, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.disks[name]
	if !ok {
		return DiskInfo{}, fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	return m.infoLocked(e), nil
}

func (m *Manager) infoLocked(e *entry) DiskInfo {
	di := DiskInfo{Name: e.name, Path: e.path, ExportName: e.name, Connections: e.conns.Load(), Cipher: "aes-xts-plain64"}
	di.Allow, di.AllowReadOnly = e.access.Allow, e.access.AllowReadOnly
	if e.info != nil {
		tok := e.info.Token
		di.KeyProvider, di.KeyID, di.UUID, di.SectorSize = tok.Provider, tok.KeyID, e.info.UUID, e.info.SectorSize
		di.EncryptionType = tok.Properties["encryptionType"]
		di.Properties = tok.Properties
		di.SizeBytes = e.info.SizeBytes
	}
	di.SharesVolumeKeyWith = m.sharersLocked(e)
	if m.images.Shared() {
		di.ServedBy, di.LeaseState = e.heldBy, e.leaseState
		if e.info == nil {
			di.EncryptionType, di.SectorSize, di.SizeBytes = e.meta.EncryptionType, e.meta.SectorSize, e.meta.SizeBytes
		}
	}
	if e.remote {
		di.State = StateDetached
		di.StateReason = "not attached here"
		if e.heldBy != "" {
			di.StateReason = "served by " + e.heldBy
		}
		return di
	}
	if e.disk == nil {
		di.State = "Unavailable"
		if e.openErr != nil {
			di.StateReason = e.openErr.Error()
		}
		return di
	}
	tok := e.disk.Token()
	di.KeyProvider, di.KeyID = tok.Provider, tok.KeyID
	di.SizeBytes = e.disk.Size()
	st, reason, since := e.disk.State()
	di.State, di.StateReason = string(st), reason
	di.WritesCompleted = e.disk.WritesCompleted()
	if mx := m.cfg.Metrics; mx != nil {
		di.ReadBytes, di.WriteBytes, di.ReadOps, di.WriteOps = mx.DiskCounters(e.name)
	}
	if st == cryptodisk.StateSuspended {
		di.SuspendedSince = &since
	}
	return di
}

// Delete removes a disk. With live connections it is refused unless force,
// which closes the disk under them (their I/O then fails with ESHUTDOWN).
func (m *Manager) Delete(ctx context.Context, name string, force bool) error {
	m.mu.Lock()
	e, ok := m.disks[name]
	if !ok {
		m.mu.Unlock()
		return fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	if e.remote {
		m.mu.Unlock()
		return fmt.Errorf("%w: %s: attach it to this daemon first (cryptnbd disk attach %s)", ErrServedElsewhere, name, name)
	}
	if n := e.conns.Load(); n > 0 && !force {
		m.mu.Unlock()
		return fmt.Errorf("%w: %s has %d; disconnect them or use --force", ErrInUse, name, n)
	}
	if snaps := m.snapshotsOfLocked(name); len(snaps) > 0 && !force {
		m.mu.Unlock()
		return fmt.Errorf("%w: %s has %s, which hold the same volume key: shredding the disk would not make their data unreadable; delete them first, or use --force to keep them", ErrHasSnapshots, name, strings.Join(snaps, ", "))
	}
	delete(m.disks, name)
	stop := e.takeStopWatch()
	m.mu.Unlock()
	stop() // before Close: no Resume may reopen the gate of a closed disk
	if e.disk != nil {
		e.disk.Close()
	}
	if err := m.images.Remove(ctx, name); err != nil {
		return fmt.Errorf("daemon: delete %s: %w", name, err)
	}
	if m.images.Shared() {
		// A blob goes with its snapshots.
		m.mu.Lock()
		for _, full := range m.snapshotsOfLocked(name) {
			if se := m.snaps[full]; se.disk != nil {
				se.disk.Close()
			}
			delete(m.snaps, full)
		}
		err := m.setAttachedLocked(name, false)
		m.mu.Unlock()
		if err != nil {
			m.log.Warn("attached-disk list not saved", "err", err)
		}
	}
	os.Remove(m.accessPath(name))
	if mx := m.cfg.Metrics; mx != nil {
		mx.ForgetDisk(name)
	}
	m.cfg.Audit.Record(AuditEvent{Event: "delete", Disk: name})
	m.log.Info("disk deleted", "disk", name)
	return nil
}

// Resize grows a disk online.
func (m *Manager) Resize(ctx context.Context, name string, size int64) (DiskInfo, error) {
	e, err := m.open(name)
	if err != nil {
		return DiskInfo{}, err
	}
	if err := e.disk.Grow(ctx, size); err != nil {
		return DiskInfo{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if bs, ok := e.store.(*blobstore.Store); ok {
		// Keep the catalog's size current for daemons that do not serve it.
		md := bs.Metadata()
		md[metaSize] = strconv.FormatInt(e.disk.Size(), 10)
		if err := bs.SetMetadata(ctx, md); err != nil {
			m.log.Warn("disk resized, but its catalog size was not updated", "disk", name, "err", err)
		}
	}
	m.log.Info("disk resized", "disk", name, "sizeBytes", size)
	return m.Show(name)
}

func (m *Manager) open(name string) (*entry, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.disks[name]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	if e.remote {
		return nil, fmt.Errorf("%w: %s (%s): run the command on the daemon serving it, or attach it here", ErrServedElsewhere, name, m.infoLocked(e).StateReason)
	}
	if e.disk == nil {
		return nil, fmt.Errorf("daemon: disk %s is unavailable: %w", name, e.openErr)
	}
	return e, nil
}

// RecoverySecret unwraps a disk's keyslot secret through its provider, for
// an administrator's `cryptsetup open --key-file`. It is audited.
func (m *Manager) RecoverySecret(ctx context.Context, name string) ([]byte, error) {
	e, err := m.open(name)
	if err != nil {
		return nil, err
	}
	tok := e.disk.Token()
	p, principal, err := m.providerFor(tok)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	sec, err := e.disk.RecoverySecret(ctx, p)
	m.cfg.Audit.timed("recovery-secret", name, tok.KeyID, principal, start, err)
	if err != nil {
		return nil, err
	}
	return sec, nil
}

// Close flushes and closes every disk.
func (m *Manager) Close(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	var errs []error
	for _, e := range m.disks {
		if e.disk == nil {
			continue
		}
		if e.lost {
			// Its writes cannot land; the loss was reported when it happened.
			e.disk.Close()
			continue
		}
		if err := e.disk.Flush(ctx); err != nil {
			errs = append(errs, fmt.Errorf("flush %s: %w", e.name, err))
		}
		if err := e.disk.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close %s: %w", e.name, err))
		}
	}
	errs = append(errs, m.closeSnapshotsLocked())
	return errors.Join(errs...)
}

// Export implements nbd.Catalog: export name = disk name.
func (m *Manager) Export(ctx context.Context, name string) (*nbd.Export, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	// A snapshot, DISK@SNAP, is governed by its disk's access rules.
	diskName, _, isSnap := strings.Cut(name, "@")
	src, ok := m.disks[diskName]
	if !ok {
		return nil, fmt.Errorf("%w: %q", nbd.ErrUnknownExport, name)
	}
	readOnly, err := m.admitLocked(ctx, diskName, name, src)
	if err != nil {
		return nil, err
	}
	if isSnap {
		return m.exportSnapshotLocked(name)
	}
	e := src
	if e.disk == nil {
		return nil, fmt.Errorf("%w: %q", nbd.ErrUnknownExport, name)
	}
	e.conns.Add(1)
	// A Disk lets the server answer requests from the connection's reader
	// where its store need not wait; the metrics wrapper keeps that.
	var backend nbd.NoWaitBackend = e.disk
	if mx := m.cfg.Metrics; mx != nil {
		backend = mx.WrapBackend(name, e.disk).(nbd.NoWaitBackend)
		mx.ConnOpened(name)
	}
	info := m.exportInfoLocked(e)
	info.ReadOnly = readOnly
	var once sync.Once
	return &nbd.Export{
		ExportInfo: info,
		Backend:    backend,
		Release: func() {
			once.Do(func() {
				e.conns.Add(-1)
				if mx := m.cfg.Metrics; mx != nil {
					mx.ConnClosed(name)
				}
			})
		},
	}, nil
}

// Exports implements nbd.Catalog for NBD_OPT_LIST.
func (m *Manager) Exports(ctx context.Context) ([]nbd.ExportInfo, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	// LIST shows a client only what it may open.
	peer, hasPeer := nbd.PeerFromContext(ctx)
	visible := func(disk string) (bool, bool) {
		e, ok := m.disks[disk]
		if !ok {
			return false, false
		}
		if !hasPeer {
			return true, false
		}
		return e.access.decide(peer)
	}
	out := make([]nbd.ExportInfo, 0, len(m.disks))
	for _, e := range m.disks {
		if ok, ro := visible(e.name); ok && e.disk != nil {
			info := m.exportInfoLocked(e)
			info.ReadOnly = ro
			out = append(out, info)
		}
	}
	for _, info := range m.snapshotExportsLocked() {
		disk, _, _ := strings.Cut(info.Name, "@")
		if ok, _ := visible(disk); ok {
			out = append(out, info)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (m *Manager) exportInfoLocked(e *entry) nbd.ExportInfo {
	di := m.infoLocked(e)
	desc := fmt.Sprintf("%s, %s, XTS-AES-256 with %d-byte sectors, %s",
		HumanBytes(di.SizeBytes), di.EncryptionType, di.SectorSize, di.State)
	if di.StateReason != "" {
		desc += " (" + di.StateReason + ")"
	}
	return nbd.ExportInfo{
		Name: e.name, Description: desc,
		// Sub-sector I/O works by read-modify-write, but 512 keeps clients
		// from issuing byte-granular requests that are all overhead.
		MinBlock: 512, PreferredBlock: uint32(di.SectorSize), MaxBlock: maxBlock,
	}
}

// HumanBytes writes n in binary units, as the CLI and export descriptions
// show sizes: "512 B", "64 MiB", "1.5 GiB".
func HumanBytes(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB"}
	f := float64(n)
	i := 0
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%d B", n)
	}
	return strings.TrimSuffix(strconv.FormatFloat(f, 'f', 1, 64), ".0") + " " + units[i]
}
