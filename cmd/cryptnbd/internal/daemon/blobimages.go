package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/blobstore"
)

// Blob metadata keys of a disk (blobstore wants [a-z_] keys).
const (
	metaDisk       = "cryptnbd_disk"
	metaEncryption = "encryption_type"
	metaDES        = "des"
	metaSector     = "sector_size"
	metaSize       = "size_bytes"
	// metaCreating marks a blob whose disk is still being made; List skips
	// it, and removes it once nobody holds it (its maker died).
	metaCreating = "cryptnbd_creating"
)

// snapPrefix holds one JSON record per snapshot, naming its blob snapshot.
const snapPrefix = "snapshots/"

// BlobImagesOptions configure the page-blob store.
type BlobImagesOptions struct {
	// Container holds one page blob per disk (named after it) and the JSON
	// records beside them. It is created if missing.
	Container *container.Client
	// LeaseDuration is the blob lease: 15 to 60 whole seconds.
	LeaseDuration time.Duration
	// Holder is this daemon's ID, recorded in the blobs it holds.
	Holder string
	Logger *slog.Logger
}

// blobImages keeps each disk in a page blob held by a lease (see
// cryptodisk/blobstore), disk metadata in blob metadata, snapshots as blob
// snapshots recorded in snapshots/DISK@SNAP.json, and records such as disk
// encryption sets as KIND/NAME.json block blobs. Safe for concurrent use.
type blobImages struct {
	o BlobImagesOptions
	c *container.Client

	// mu guards snaps, the snapshot records last read.
	mu    sync.Mutex
	snaps map[string]snapRecord
}

// snapRecord is snapshots/DISK@SNAP.json.
type snapRecord struct {
	Disk     string    `json:"disk"`
	Snapshot string    `json:"snapshot"` // the blob snapshot's ID
	Created  time.Time `json:"created"`
}

// NewBlobImages makes the container if needed and returns the store.
func NewBlobImages(ctx context.Context, o BlobImagesOptions) (Images, error) {
	if o.Container == nil || o.Holder == "" {
		return nil, errors.New("daemon: blob images need a container and a holder ID")
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := blobstore.CreateContainer(cctx, o.Container); err != nil {
		return nil, fmt.Errorf("daemon: storage container: %w", err)
	}
	return &blobImages{o: o, c: o.Container, snaps: map[string]snapRecord{}}, nil
}

func (b *blobImages) Kind() string { return "azblob" }
func (b *blobImages) Shared() bool { return true }

func (b *blobImages) Location(name string) string {
	if disk, _, ok := strings.Cut(name, "@"); ok {
		b.mu.Lock()
		rec := b.snaps[name]
		b.mu.Unlock()
		return b.c.URL() + "/" + disk + "?snapshot=" + rec.Snapshot
	}
	return b.c.URL() + "/" + name
}

func (b *blobImages) options(name string, onLost func()) blobstore.Options {
	return blobstore.Options{Container: b.c, Name: name, LeaseDuration: b.o.LeaseDuration, Holder: b.o.Holder,
		OnLeaseLost: onLost, Logger: b.o.Logger}
}

func toMeta(m ImageMeta) map[string]string {
	out := map[string]string{metaEncryption: m.EncryptionType, metaSector: strconv.Itoa(m.SectorSize),
		metaSize: strconv.FormatInt(m.SizeBytes, 10)}
	if m.DES != "" {
		out[metaDES] = m.DES
	}
	return out
}

func fromMeta(md map[string]string) ImageMeta {
	m := ImageMeta{EncryptionType: md[metaEncryption], DES: md[metaDES]}
	m.SectorSize, _ = strconv.Atoi(md[metaSector])
	m.SizeBytes, _ = strconv.ParseInt(md[metaSize], 10, 64)
	return m
}

func (b *blobImages) List(ctx context.Context) ([]ImageRef, error) {
	infos, err := blobstore.List(ctx, b.c)
	if err != nil {
		return nil, err
	}
	out := make([]ImageRef, 0, len(infos))
	for _, bi := range infos {
		if ValidateName(bi.Name) != nil || bi.Metadata[metaDisk] != bi.Name {
			continue // not a cryptnbd disk
		}
		if bi.Metadata[metaCreating] != "" {
			if bi.LeaseState != "leased" && bi.LeaseState != "breaking" {
				// Its maker died before committing: nobody was told it exists.
				b.deleteBlob(ctx, bi.Name)
			}
			continue
		}
		out = append(out, ImageRef{Name: bi.Name, Meta: fromMeta(bi.Metadata), HeldBy: bi.Holder, LeaseState: bi.LeaseState})
	}
	return out, nil
}

// deleteBlob deletes a blob nobody holds, with its snapshots; best effort.
func (b *blobImages) deleteBlob(ctx context.Context, name string) {
	include := blob.DeleteSnapshotsOptionTypeInclude
	_, err := b.c.NewBlobClient(name).Delete(ctx, &blob.DeleteOptions{DeleteSnapshots: &include})
	if err != nil && !bloberror.HasCode(err, bloberror.BlobNotFound) {
		b.o.Logger.Warn("unfinished disk blob not deleted", "blob", name, "err", err)
	}
}

// leasedErr turns blobstore's lease refusal into ErrServedElsewhere.
func leasedErr(err error) error {
	if errors.Is(err, blobstore.ErrLeased) {
		return fmt.Errorf("%w: %w", ErrServedElsewhere, err)
	}
	return err
}

func (b *blobImages) Create(ctx context.Context, name string, meta ImageMeta, onLost func()) (*NewImage, error) {
	md := toMeta(meta)
	md[metaDisk] = name
	md[metaCreating] = "true"
	store, err := blobstore.Create(ctx, b.options(name, onLost), 0, md)
	if errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("%w: %s (in the storage container)", ErrExists, name)
	}
	if err != nil {
		return nil, leasedErr(err)
	}
	return &NewImage{
		Store: store,
		Commit: func(ctx context.Context) error {
			done := toMeta(meta)
			done[metaDisk] = name
			return store.SetMetadata(ctx, done)
		},
		Abort: func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			b.deleteBlob(ctx, name)
		},
	}, nil
}

func (b *blobImages) Open(ctx context.Context, name string, o OpenOptions) (cryptodisk.Storage, error) {
	if o.ReadOnly {
		return nil, fmt.Errorf("daemon: %s: read-only opens of a disk blob are not supported", name)
	}
	bo := b.options(name, o.OnLeaseLost)
	bo.WaitForExpiry, bo.BreakLease = o.WaitForExpiry, o.BreakLease
	store, err := blobstore.Open(ctx, bo)
	if err != nil {
		return nil, leasedErr(err)
	}
	return store, nil
}

// Remove takes the disk's lease, overwrites its LUKS2 header and keyslots,
// and deletes the blob and its snapshots (Azure deletes a blob only with
// them), and the snapshots' records.
func (b *blobImages) Remove(ctx context.Context, name string) error {
	store, err := blobstore.Open(ctx, b.options(name, nil))
	if err != nil {
		return leasedErr(err)
	}
	if err := cryptodisk.Shred(ctx, store); err != nil {
		store.Close()
		return err
	}
	if err := store.Delete(ctx); err != nil {
		store.Close()
		return err
	}
	recs, err := blobstore.ListJSON(ctx, b.c, snapPrefix+name+"@")
	if err != nil {
		return err
	}
	for key := range recs {
		if err := blobstore.DeleteJSON(ctx, b.c, key); err != nil {
			return err
		}
		b.mu.Lock()
		delete(b.snaps, strings.TrimSuffix(strings.TrimPrefix(key, snapPrefix), ".json"))
		b.mu.Unlock()
	}
	return nil
}

func (b *blobImages) Snapshot(ctx context.Context, src cryptodisk.Storage, disk, full string) (string, error) {
	bs, ok := src.(*blobstore.Store)
	if !ok {
		return "", fmt.Errorf("daemon: snapshot %s: the disk is not open on a blob", full)
	}
	id, err := bs.Snapshot(ctx)
	if err != nil {
		return "", err
	}
	rec := snapRecord{Disk: disk, Snapshot: id, Created: time.Now().UTC()}
	if err := blobstore.PutJSON(ctx, b.c, snapPrefix+full+".json", rec); err != nil {
		b.deleteSnapshotBlob(ctx, rec)
		return "", err
	}
	b.mu.Lock()
	b.snaps[full] = rec
	b.mu.Unlock()
	return "blob-snapshot", nil
}

func (b *blobImages) Snapshots(ctx context.Context) ([]string, error) {
	recs, err := blobstore.ListJSON(ctx, b.c, snapPrefix)
	if err != nil {
		return nil, err
	}
	snaps := map[string]snapRecord{}
	for key, raw := range recs {
		full := strings.TrimSuffix(strings.TrimPrefix(key, snapPrefix), ".json")
		var rec snapRecord
		if json.Unmarshal(raw, &rec) != nil || rec.Snapshot == "" {
			continue
		}
		snaps[full] = rec
	}
	b.mu.Lock()
	b.snaps = snaps
	b.mu.Unlock()
	out := make([]string, 0, len(snaps))
	for full := range snaps {
		out = append(out, full)
	}
	return out, nil
}

func (b *blobImages) record(ctx context.Context, full string) (snapRecord, error) {
	b.mu.Lock()
	rec, ok := b.snaps[full]
	b.mu.Unlock()
	if ok {
		return rec, nil
	}
	if err := blobstore.GetJSON(ctx, b.c, snapPrefix+full+".json", &rec); err != nil {
		return snapRecord{}, err
	}
	return rec, nil
}

func (b *blobImages) OpenSnapshot(ctx context.Context, full string) (cryptodisk.Storage, error) {
	rec, err := b.record(ctx, full)
	if err != nil {
		return nil, err
	}
	return blobstore.OpenSnapshot(ctx, b.c, rec.Disk, rec.Snapshot, blobstore.Options{Logger: b.o.Logger})
}

// SnapshotStat reports when the snapshot was taken; what a blob snapshot
// occupies is not cheap to learn, so it is reported as 0.
func (b *blobImages) SnapshotStat(full string) (time.Time, int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.snaps[full].Created, 0
}

// RemoveSnapshot deletes the blob snapshot and its record. A blob snapshot
// is immutable, so its header copy cannot be overwritten first.
func (b *blobImages) RemoveSnapshot(ctx context.Context, full string) error {
	rec, err := b.record(ctx, full)
	if err != nil {
		return err
	}
	if err := b.deleteSnapshotBlob(ctx, rec); err != nil {
		return err
	}
	if err := blobstore.DeleteJSON(ctx, b.c, snapPrefix+full+".json"); err != nil {
		return err
	}
	b.mu.Lock()
	delete(b.snaps, full)
	b.mu.Unlock()
	return nil
}

func (b *blobImages) deleteSnapshotBlob(ctx context.Context, rec snapRecord) error {
	sc, err := b.c.NewBlobClient(rec.Disk).WithSnapshot(rec.Snapshot)
	if err != nil {
		return fmt.Errorf("daemon: snapshot %s of %s: %w", rec.Snapshot, rec.Disk, err)
	}
	if _, err := sc.Delete(ctx, nil); err != nil && !bloberror.HasCode(err, bloberror.BlobNotFound) {
		return fmt.Errorf("daemon: delete snapshot %s of %s: %w", rec.Snapshot, rec.Disk, err)
	}
	return nil
}

// CloneSnapshot creates the new disk's blob and copies the snapshot's
// ciphertext into it, allocated ranges only.
func (b *blobImages) CloneSnapshot(ctx context.Context, full, name string, meta ImageMeta, onLost func()) (*NewImage, error) {
	src, err := b.OpenSnapshot(ctx, full)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	ni, err := b.Create(ctx, name, meta, onLost)
	if err != nil {
		return nil, err
	}
	if err := copyStorage(ctx, ni.Store, src); err != nil {
		ni.Store.Close()
		ni.Abort()
		return nil, err
	}
	return ni, nil
}

// copyStorage copies src's allocated bytes into dst, grown to src's size.
func copyStorage(ctx context.Context, dst, src cryptodisk.Storage) error {
	size := src.Size()
	if err := dst.Grow(ctx, size); err != nil {
		return err
	}
	type run struct{ off, n int64 }
	var runs []run
	var off int64
	if err := src.Allocated(ctx, 0, size, func(n int64, alloc bool) bool {
		if alloc {
			runs = append(runs, run{off, n})
		}
		off += n
		return true
	}); err != nil {
		return err
	}
	buf := make([]byte, 4<<20)
	for _, r := range runs {
		for o := r.off; o < r.off+r.n; {
			p := buf[:min(int64(len(buf)), r.off+r.n-o)]
			if err := src.ReadAt(ctx, p, o); err != nil {
				return err
			}
			if err := dst.WriteAt(ctx, p, o); err != nil {
				return err
			}
			o += int64(len(p))
		}
	}
	return dst.Sync(ctx)
}

func (b *blobImages) PutRecord(ctx context.Context, kind, name string, data []byte) error {
	return blobstore.PutJSON(ctx, b.c, kind+"/"+name+".json", json.RawMessage(data))
}

func (b *blobImages) Records(ctx context.Context, kind string) (map[string][]byte, error) {
	recs, err := blobstore.ListJSON(ctx, b.c, kind+"/")
	if err != nil {
		return nil, err
	}
	out := make(map[string][]byte, len(recs))
	for key, raw := range recs {
		name := strings.TrimSuffix(strings.TrimPrefix(key, kind+"/"), ".json")
		if ValidateName(name) == nil {
			out[name] = raw
		}
	}
	return out, nil
}

func (b *blobImages) DeleteRecord(ctx context.Context, kind, name string) error {
	return blobstore.DeleteJSON(ctx, b.c, kind+"/"+name+".json")
}
