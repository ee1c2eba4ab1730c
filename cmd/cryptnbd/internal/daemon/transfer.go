package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"time"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/keys"
)

// ErrUnavailable: the disk cannot be read now (suspended, its key revoked
// or not yet opened).
var ErrUnavailable = errors.New("disk unavailable")

// ErrHasSnapshots: a disk with snapshots is deleted only with force.
var ErrHasSnapshots = errors.New("disk has snapshots")

// chunkBytes is the unit of import, export and re-encryption: a chunk that
// is all zeros is left as a hole.
const chunkBytes = 1 << 20

var zeroChunk = make([]byte, chunkBytes)

func isZero(b []byte) bool { return bytes.Equal(b, zeroChunk[:len(b)]) }

// holeBytes is the granularity at which zeros inside a chunk are left as
// holes: the larger encryption sector, and a common filesystem block.
const holeBytes = 4096

// dataRuns calls fn for each run of b that is not all zeros, in holeBytes
// pieces, so that a chunk with a little data does not fill a whole hole.
func dataRuns(b []byte, fn func(off, n int) error) error {
	start := -1
	for i := 0; i <= len(b); i += holeBytes {
		end := min(i+holeBytes, len(b))
		data := i < len(b) && !isZero(b[i:end])
		if data && start < 0 {
			start = i
		}
		if !data && start >= 0 {
			if err := fn(start, i-start); err != nil {
				return err
			}
			start = -1
		}
	}
	return nil
}

// Progress is told how many of total bytes are done. It is called from the
// goroutine doing the work, often; it must be quick.
type Progress func(doneBytes, totalBytes int64)

// reserve claims name in the disk table while a disk is being made, as
// Create does: the entry is listed as unavailable and not served until
// publish fills it in. On a shared store the catalog is read first, so a
// disk another daemon made is not made twice.
func (m *Manager) reserve(ctx context.Context, name, why string) (*entry, error) {
	if m.images.Shared() {
		if err := m.Refresh(ctx); err != nil {
			return nil, err
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.disks[name]; ok {
		return nil, fmt.Errorf("%w: %s", ErrExists, name)
	}
	e := &entry{name: name, path: m.images.Location(name), openErr: errors.New(why)}
	m.disks[name] = e
	return e, nil
}

// abandon drops a reservation and the image being made behind it (ni may
// be nil).
func (m *Manager) abandon(e *entry, d *cryptodisk.Disk, ni *NewImage) {
	if d != nil {
		d.Close()
	} else if ni != nil {
		ni.Store.Close()
	}
	if ni != nil {
		ni.Abort()
	}
	m.mu.Lock()
	if m.disks[e.name] == e {
		delete(m.disks, e.name)
	}
	m.mu.Unlock()
}

// publish makes a disk built on ni durable, commits it under its name and
// fills in its reservation. On error the disk is abandoned.
func (m *Manager) publish(ctx context.Context, e *entry, d *cryptodisk.Disk, ni *NewImage) (DiskInfo, error) {
	if err := d.Flush(ctx); err != nil {
		m.abandon(e, d, ni)
		return DiskInfo{}, fmt.Errorf("daemon: %s: %w", e.name, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.disks[e.name] != e { // deleted while being made
		d.Close()
		ni.Abort()
		return DiskInfo{}, fmt.Errorf("%w: %s was deleted while being made", ErrNotFound, e.name)
	}
	if err := ni.Commit(ctx); err != nil {
		delete(m.disks, e.name)
		d.Close()
		ni.Abort()
		return DiskInfo{}, fmt.Errorf("daemon: %s: %w", e.name, err)
	}
	tok := d.Token()
	e.disk, e.store, e.openErr = d, ni.Store, nil
	e.info = &cryptodisk.Info{UUID: d.UUID(), SectorSize: d.SectorSize(), SizeBytes: d.Size(), Token: tok}
	if m.images.Shared() {
		e.heldBy, e.leaseState = m.cfg.DaemonID, leaseLeased
		e.meta = metaOf(d)
		if err := m.setAttachedLocked(e.name, true); err != nil {
			m.log.Error("attached-disk list not saved; the disk will not be re-attached at restart", "disk", e.name, "err", err)
		}
	}
	if des := tok.Properties["des"]; des != "" {
		if de, ok := m.des[des]; ok {
			m.watchLocked(e, des, de.kv)
		}
	}
	return m.infoLocked(e), nil
}

// checkCreate fills in a creation request's defaults and checks it, for
// Create and the imports.
func checkCreate(r *CreateRequest) error {
	if err := ValidateName(r.Name); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if r.EncryptionType == "" {
		r.EncryptionType = EncryptionPlatformKey
		if r.DES != "" {
			r.EncryptionType = EncryptionCustomerKey
		}
	}
	switch {
	case r.EncryptionType == EncryptionPlatformKey && r.DES != "":
		return fmt.Errorf("%w: a disk encryption set is for %s; drop --des or change --encryption-type", ErrInvalid, EncryptionCustomerKey)
	case r.EncryptionType == EncryptionCustomerKey && r.DES == "":
		return fmt.Errorf("%w: %s needs --des NAME (create one with cryptnbd des create)", ErrInvalid, EncryptionCustomerKey)
	case r.EncryptionType != EncryptionPlatformKey && r.EncryptionType != EncryptionCustomerKey:
		return fmt.Errorf("%w: encryption type %q: use %s or %s", ErrInvalid, r.EncryptionType, EncryptionPlatformKey, EncryptionCustomerKey)
	}
	if r.SectorSize == 0 {
		r.SectorSize = 4096
	}
	if r.SectorSize != 512 && r.SectorSize != 4096 {
		return fmt.Errorf("%w: sector size %d: use 4096 or 512", ErrInvalid, r.SectorSize)
	}
	if r.SizeBytes <= 0 || r.SizeBytes%int64(r.SectorSize) != 0 {
		return fmt.Errorf("%w: size %d bytes: must be a positive multiple of the %d-byte sector", ErrInvalid, r.SizeBytes, r.SectorSize)
	}
	return nil
}

// createImage formats a new disk under a fresh volume key, wrapped by the
// platform key or r.DES's key, on an image that is not yet visible. The
// caller publishes or abandons it.
func (m *Manager) createImage(ctx context.Context, r CreateRequest, extra map[string]string) (*cryptodisk.Disk, *NewImage, error) {
	var (
		p         keys.Provider
		principal = keys.PlatformName
		props     = map[string]string{"name": r.Name, "encryptionType": r.EncryptionType}
		err       error
	)
	for k, v := range extra {
		props[k] = v
	}
	if r.DES == "" {
		if p, err = m.provider(keys.PlatformName); err != nil {
			return nil, nil, err
		}
	} else {
		if p, principal, err = m.desProvider(ctx, r.DES); err != nil {
			return nil, nil, err
		}
		props["des"] = r.DES
	}
	ni, err := m.images.Create(ctx, r.Name, ImageMeta{EncryptionType: r.EncryptionType, DES: r.DES, SectorSize: r.SectorSize, SizeBytes: r.SizeBytes},
		func() { m.leaseLost(r.Name) })
	if err != nil {
		return nil, nil, fmt.Errorf("daemon: create %s: %w", r.Name, err)
	}
	start := time.Now()
	d, err := cryptodisk.Create(ctx, ni.Store, p, cryptodisk.CreateOptions{
		SizeBytes: r.SizeBytes, SectorSize: r.SectorSize, Provider: p.Name(), Label: r.Name,
		Properties: props, PBKDFIterations: m.cfg.PBKDFIterations,
	}, m.diskOptions(r.Name))
	kid := ""
	if d != nil {
		kid = d.Token().KeyID
	}
	m.cfg.Audit.timed("wrap", r.Name, kid, principal, start, err)
	if err != nil {
		ni.Store.Close()
		ni.Abort()
		return nil, nil, fmt.Errorf("daemon: create %s: %w", r.Name, err)
	}
	return d, ni, nil
}

// createFromSnapshot makes disk r.Name with the contents of snapshot
// r.Source (DISK@SNAP). The new disk keeps the snapshot's key protector: a
// disk of a customer-managed key stays under that disk encryption set. By
// default it is a clone of the image and so shares the volume key; with
// r.Reencrypt it gets a fresh volume key and the plaintext is copied.
func (m *Manager) createFromSnapshot(ctx context.Context, r CreateRequest, progress Progress) (DiskInfo, error) {
	if _, _, err := SplitSnapshotName(r.Source); err != nil {
		return DiskInfo{}, fmt.Errorf("%w: --source: %w", ErrInvalid, err)
	}
	if err := ValidateName(r.Name); err != nil {
		return DiskInfo{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	m.mu.Lock()
	se, ok := m.snaps[r.Source]
	m.mu.Unlock()
	if !ok {
		return DiskInfo{}, fmt.Errorf("%w: snapshot %s", ErrNotFound, r.Source)
	}
	if se.disk == nil {
		return DiskInfo{}, fmt.Errorf("%w: snapshot %s: %v", ErrUnavailable, r.Source, se.openErr)
	}
	tok := se.disk.Token()
	snapDES, snapType := tok.Properties["des"], tok.Properties["encryptionType"]
	if r.DES == "" {
		r.DES = snapDES
	}
	if r.DES != snapDES {
		if snapDES == "" {
			return DiskInfo{}, fmt.Errorf("%w: snapshot %s is encrypted with the platform key; a disk made from it is too: drop --des", ErrInvalid, r.Source)
		}
		return DiskInfo{}, fmt.Errorf("%w: snapshot %s is under disk encryption set %s; a disk made from it must use the same customer-managed key: give --des %s or none", ErrInvalid, r.Source, snapDES, snapDES)
	}
	if snapType == "" {
		snapType = EncryptionPlatformKey
		if snapDES != "" {
			snapType = EncryptionCustomerKey
		}
	}
	if r.EncryptionType != "" && r.EncryptionType != snapType {
		return DiskInfo{}, fmt.Errorf("%w: snapshot %s is %s; a disk made from it is too", ErrInvalid, r.Source, snapType)
	}
	r.EncryptionType = snapType
	size := se.disk.Size()
	if r.SizeBytes == 0 {
		r.SizeBytes = size
	}
	if r.SizeBytes < size {
		return DiskInfo{}, fmt.Errorf("%w: size %d is smaller than snapshot %s (%d bytes)", ErrInvalid, r.SizeBytes, r.Source, size)
	}
	if r.SectorSize == 0 {
		r.SectorSize = se.disk.SectorSize()
	}
	if !r.Reencrypt && r.SectorSize != se.disk.SectorSize() {
		return DiskInfo{}, fmt.Errorf("%w: a clone keeps the snapshot's %d-byte sectors; use --reencrypt to change them", ErrInvalid, se.disk.SectorSize())
	}
	if err := checkCreate(&r); err != nil {
		return DiskInfo{}, err
	}
	e, err := m.reserve(ctx, r.Name, "being created")
	if err != nil {
		return DiskInfo{}, err
	}
	var (
		d  *cryptodisk.Disk
		ni *NewImage
	)
	if r.Reencrypt {
		d, ni, err = m.createImage(ctx, r, map[string]string{"source": r.Source})
		if err != nil {
			m.abandon(e, nil, nil)
			return DiskInfo{}, err
		}
		if err := copyPlaintext(ctx, d, se.disk, size, progress); err != nil {
			m.abandon(e, d, ni)
			return DiskInfo{}, fmt.Errorf("daemon: re-encrypt %s into %s: %w", r.Source, r.Name, err)
		}
	} else {
		meta := ImageMeta{EncryptionType: r.EncryptionType, DES: r.DES, SectorSize: r.SectorSize, SizeBytes: r.SizeBytes}
		if ni, err = m.images.CloneSnapshot(ctx, r.Source, r.Name, meta, func() { m.leaseLost(r.Name) }); err != nil {
			m.abandon(e, nil, nil)
			return DiskInfo{}, fmt.Errorf("daemon: create %s: %w", r.Name, err)
		}
		if d, _, err = m.unlock(ctx, r.Name, ni.Store, false); err != nil {
			ni.Abort()
			m.abandon(e, nil, nil)
			return DiskInfo{}, fmt.Errorf("daemon: create %s: %w", r.Name, err)
		}
		err := d.SetProperties(ctx, map[string]string{"name": r.Name, "source": r.Source})
		if err == nil && r.SizeBytes > size {
			err = d.Grow(ctx, r.SizeBytes)
		}
		if err != nil {
			m.abandon(e, d, ni)
			return DiskInfo{}, fmt.Errorf("daemon: create %s: %w", r.Name, err)
		}
		if progress != nil {
			progress(size, size)
		}
	}
	di, err := m.publish(ctx, e, d, ni)
	if err != nil {
		return DiskInfo{}, err
	}
	m.log.Info("disk created from snapshot", "disk", r.Name, "snapshot", r.Source, "reencrypt", r.Reencrypt)
	return di, nil
}

// copyPlaintext copies the first size bytes of src into dst, decrypting and
// re-encrypting. Holes of src, and chunks that read as zeros, are skipped, so
// they stay holes in dst (a new disk reads as zeros).
func copyPlaintext(ctx context.Context, dst, src *cryptodisk.Disk, size int64, progress Progress) error {
	type run struct {
		off, n int64
	}
	var runs []run
	var off int64
	err := src.Extents(ctx, 0, size, func(n int64, hole bool) bool {
		if !hole {
			runs = append(runs, run{off, n})
		}
		off += n
		return true
	})
	if err != nil {
		return err
	}
	buf := make([]byte, chunkBytes)
	for _, r := range runs {
		for o := r.off; o < r.off+r.n; {
			if err := ctx.Err(); err != nil {
				return err
			}
			n := min(int64(len(buf)), r.off+r.n-o)
			b := buf[:n]
			if err := src.ReadAt(ctx, b, o); err != nil {
				return err
			}
			if !isZero(b) {
				if err := dst.WriteAt(ctx, b, o); err != nil {
					return err
				}
			}
			o += n
			if progress != nil {
				progress(o, size)
			}
		}
	}
	if progress != nil {
		progress(size, size)
	}
	return nil
}

// ImportImage creates disk r.Name from the raw image in body, which must hold
// exactly r.SizeBytes bytes. All-zero chunks are not written, so they stay
// holes. The disk is built under a temporary name and appears only once
// complete: if body ends early or ctx is cancelled (the client went away),
// nothing is left behind.
func (m *Manager) ImportImage(ctx context.Context, r CreateRequest, body io.Reader) (DiskInfo, error) {
	if r.Source != "" || r.Reencrypt {
		return DiskInfo{}, fmt.Errorf("%w: import takes no source snapshot", ErrInvalid)
	}
	if err := checkCreate(&r); err != nil {
		return DiskInfo{}, err
	}
	if r.DES != "" {
		if _, err := m.desEntry(r.DES); err != nil {
			return DiskInfo{}, fmt.Errorf("%w: %w", ErrInvalid, err)
		}
	}
	e, err := m.reserve(ctx, r.Name, "being imported")
	if err != nil {
		return DiskInfo{}, err
	}
	d, ni, err := m.createImage(ctx, r, nil)
	if err != nil {
		m.abandon(e, nil, nil)
		return DiskInfo{}, err
	}
	start := time.Now()
	written, err := fill(ctx, d, body, r.SizeBytes)
	if err != nil {
		m.abandon(e, d, ni)
		m.log.Warn("import abandoned", "disk", r.Name, "err", err)
		return DiskInfo{}, fmt.Errorf("daemon: import %s: %w", r.Name, err)
	}
	di, err := m.publish(ctx, e, d, ni)
	if err != nil {
		return DiskInfo{}, err
	}
	m.cfg.Audit.Record(AuditEvent{Event: "import", Disk: r.Name, KeyID: di.KeyID,
		Detail: fmt.Sprintf("%d bytes, %d written (the rest zero)", r.SizeBytes, written)})
	m.log.Info("disk imported", "disk", r.Name, "sizeBytes", r.SizeBytes, "writtenBytes", written, "took", time.Since(start))
	return di, nil
}

// fill writes body's size bytes into d, skipping zero chunks, and checks
// that body ends there.
func fill(ctx context.Context, d *cryptodisk.Disk, body io.Reader, size int64) (int64, error) {
	buf := make([]byte, chunkBytes)
	var off, written int64
	for off < size {
		if err := ctx.Err(); err != nil {
			return written, err
		}
		n := min(int64(len(buf)), size-off)
		b := buf[:n]
		got, err := io.ReadFull(body, b)
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return written, fmt.Errorf("%w: the image ended after %d of %d bytes", ErrInvalid, off+int64(got), size)
			}
			return written, fmt.Errorf("read image at %d: %w", off, err)
		}
		err = dataRuns(b, func(i, n int) error {
			written += int64(n)
			return d.WriteAt(ctx, b[i:i+n], off+int64(i))
		})
		if err != nil {
			return written, err
		}
		off += n
	}
	var one [1]byte
	if n, _ := io.ReadFull(body, one[:]); n > 0 {
		return written, fmt.Errorf("%w: the image is larger than the %d bytes announced", ErrInvalid, size)
	}
	return written, nil
}

// ExportImage writes the plaintext of a disk or snapshot (DISK@SNAP) to w. It is
// audited, and it goes through the key provider first: the keyslot secret
// is unwrapped (and dropped), so a revoked or disabled key blocks an export
// even though the daemon holds the volume key. A suspended disk is refused.
// begin is called with the size before the first byte is written.
func (m *Manager) ExportImage(ctx context.Context, name string, w io.Writer, begin func(sizeBytes int64)) error {
	m.mu.Lock()
	e, ok := m.disks[name]
	if !ok {
		e, ok = m.snaps[name]
	}
	m.mu.Unlock()
	if !ok {
		return fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	if e.disk == nil {
		return fmt.Errorf("%w: %s: %v", ErrUnavailable, name, e.openErr)
	}
	if st, reason, _ := e.disk.State(); st != cryptodisk.StateActive {
		return fmt.Errorf("%w: %s is %s: %s", ErrUnavailable, name, st, reason)
	}
	tok := e.disk.Token()
	p, principal, err := m.providerFor(tok)
	if err != nil {
		return err
	}
	start := time.Now()
	sec, err := e.disk.RecoverySecret(ctx, p)
	clear(sec)
	size := e.disk.Size()
	ev := AuditEvent{Event: "export", Disk: name, KeyID: tok.KeyID, Principal: principal,
		LatencyMS: float64(time.Since(start).Microseconds()) / 1000, Detail: "plaintext image, " + strconv.FormatInt(size, 10) + " bytes"}
	if err != nil {
		ev.Error = err.Error()
	}
	m.cfg.Audit.Record(ev)
	if err != nil {
		return fmt.Errorf("%w: export %s: %w", ErrUnavailable, name, err)
	}
	begin(size)
	buf := make([]byte, chunkBytes)
	for off := int64(0); off < size; {
		n := min(int64(len(buf)), size-off)
		if err := e.disk.ReadAt(ctx, buf[:n], off); err != nil {
			return fmt.Errorf("daemon: export %s at %d: %w", name, off, err)
		}
		if _, err := w.Write(buf[:n]); err != nil {
			return fmt.Errorf("daemon: export %s: %w", name, err)
		}
		off += n
	}
	m.log.Info("disk exported", "disk", name, "sizeBytes", size, "took", time.Since(start))
	return nil
}
