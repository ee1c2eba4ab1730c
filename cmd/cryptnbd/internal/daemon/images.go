package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/filestore"
)

// Images is where a Manager's disk images live: files in the data directory
// (the default), or page blobs in an Azure storage container shared by many
// daemons. The Manager keeps its disk table, keys and NBD exports; an
// Images only stores, names, copies and removes images. Implementations are
// safe for concurrent use.
type Images interface {
	// Kind names the implementation: "file" or "azblob".
	Kind() string
	// Shared reports whether other daemons see the same images, so the
	// catalog must be re-read and disks attached one daemon at a time.
	Shared() bool
	// List returns the committed disk images. A creation that never
	// committed (a crash) is cleaned up or skipped, never listed.
	List(ctx context.Context) ([]ImageRef, error)
	// Create makes an empty image for disk name, under a temporary name or
	// state that List does not show until the NewImage is committed. meta is
	// what the catalog shows of the disk without its key.
	// A shared store calls onLeaseLost once if the new image's exclusive
	// hold is lost while it is open.
	Create(ctx context.Context, name string, meta ImageMeta, onLeaseLost func()) (*NewImage, error)
	// Open opens a committed image. A read-write open of a shared image is
	// exclusive: it fails with an error matching ErrServedElsewhere while
	// another daemon serves the disk, unless o asks to wait or break.
	Open(ctx context.Context, name string, o OpenOptions) (cryptodisk.Storage, error)
	// Remove crypto-shreds the image's header and removes it. The caller has
	// closed every Storage of it.
	Remove(ctx context.Context, name string) error
	// Location is what `disk show` and `snapshot show` print as the path
	// of an image: disk NAME or snapshot DISK@SNAP.
	Location(name string) string

	// Snapshot copies the image of disk, open as src, into snapshot full
	// (DISK@SNAP). The caller holds the disk's write barrier. It returns how
	// the copy was made.
	Snapshot(ctx context.Context, src cryptodisk.Storage, disk, full string) (method string, err error)
	// Snapshots lists the snapshots by full name.
	Snapshots(ctx context.Context) ([]string, error)
	// OpenSnapshot opens a snapshot read-only.
	OpenSnapshot(ctx context.Context, full string) (cryptodisk.Storage, error)
	// SnapshotStat says when a snapshot was taken and what it occupies.
	SnapshotStat(full string) (created time.Time, allocatedBytes int64)
	// RemoveSnapshot shreds what it can of a snapshot and removes it.
	RemoveSnapshot(ctx context.Context, full string) error
	// CloneSnapshot makes a new image for disk name holding a copy of
	// snapshot full (same header, same volume key).
	CloneSnapshot(ctx context.Context, full, name string, meta ImageMeta, onLeaseLost func()) (*NewImage, error)

	// PutRecord, Records and DeleteRecord keep small JSON definitions
	// (disk encryption sets) under kind, beside the images.
	PutRecord(ctx context.Context, kind, name string, data []byte) error
	Records(ctx context.Context, kind string) (map[string][]byte, error)
	DeleteRecord(ctx context.Context, kind, name string) error
}

// ErrServedElsewhere means another daemon holds the disk (its blob lease).
// The error text names the holder.
var ErrServedElsewhere = errors.New("disk is served by another daemon")

// ImageRef is one committed image as List returns it.
type ImageRef struct {
	Name string
	// Meta is the catalog's view of a shared image; zero for files.
	Meta ImageMeta
	// HeldBy is who serves a shared image now ("" when nobody does), and
	// LeaseState its lease state as the store reports it.
	HeldBy     string
	LeaseState string
}

// ImageMeta is what a shared catalog records of a disk beside its image,
// readable without the key.
type ImageMeta struct {
	EncryptionType string
	DES            string
	SectorSize     int
	SizeBytes      int64
}

// OpenOptions say how to open an image.
type OpenOptions struct {
	ReadOnly bool
	// WaitForExpiry waits (until ctx is done) for a holder that stopped
	// renewing its lease; BreakLease takes the disk from a live holder.
	WaitForExpiry bool
	BreakLease    bool
	// OnLeaseLost is called once if the exclusive hold on a shared image is
	// lost while it is open.
	OnLeaseLost func()
}

// NewImage is an image being made. The caller builds the disk on Store,
// flushes it, then calls Commit, which publishes it under its name; or, on
// failure, closes the disk (and so Store) and calls Abort.
type NewImage struct {
	Store  cryptodisk.Storage
	Commit func(ctx context.Context) error
	// Abort removes what Create made; Store must be closed first.
	Abort func()
}

// fileImages keeps images as sparse LUKS2 files under DATA_DIR/disks and
// DATA_DIR/snapshots, records as DATA_DIR/KIND/NAME.json.
type fileImages struct {
	dataDir string
	// noMap keeps every image access on pread and pwrite instead of
	// letting the cipher work on the page cache through a mapping.
	noMap bool
	// addr bounds the address space all mapped images take together.
	addr *filestore.AddressBudget
}

// NewFileImages is the data-directory store, with images mapped (see
// filestore.File.Map).
func NewFileImages(dataDir string) Images { return newFileImages(dataDir, false) }

func newFileImages(dataDir string, noMap bool) *fileImages {
	return &fileImages{dataDir: dataDir, noMap: noMap, addr: filestore.NewAddressBudget(filestore.DefaultAddressBudget)}
}

// open opens an image and maps it unless told not to.
func (f *fileImages) open(path string, readOnly bool) (cryptodisk.Storage, error) {
	store, err := filestore.Open(path, readOnly)
	if err != nil {
		return nil, err
	}
	f.mapFile(store)
	return store, nil
}

func (f *fileImages) mapFile(store *filestore.File) {
	if !f.noMap {
		store.Map(f.addr)
	}
}

func (f *fileImages) Kind() string { return "file" }
func (f *fileImages) Shared() bool { return false }

func (f *fileImages) path(name string) string {
	return filepath.Join(f.dataDir, diskDir, name+diskExt)
}

func (f *fileImages) snapPath(full string) string {
	return filepath.Join(f.dataDir, snapDir, full+diskExt)
}

func (f *fileImages) Location(name string) string {
	if strings.Contains(name, "@") {
		return f.snapPath(name)
	}
	return f.path(name)
}

// scan lists dir's *.luks names, removing leftovers of creations that
// never finished: nobody was told they exist.
func scan(dir string) ([]string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, de := range ents {
		n := de.Name()
		if strings.HasSuffix(n, creatingExt) {
			os.Remove(filepath.Join(dir, n))
			continue
		}
		if name, ok := strings.CutSuffix(n, diskExt); ok {
			out = append(out, name)
		}
	}
	return out, nil
}

func (f *fileImages) List(ctx context.Context) ([]ImageRef, error) {
	names, err := scan(filepath.Join(f.dataDir, diskDir))
	if err != nil {
		return nil, fmt.Errorf("daemon: %w", err)
	}
	out := make([]ImageRef, 0, len(names))
	for _, n := range names {
		if ValidateName(n) == nil {
			out = append(out, ImageRef{Name: n})
		}
	}
	return out, nil
}

// publishNew is the commit of a file made at tmp: renamed into place and
// the directory synced, so the name appears only for a complete image.
func publishNew(tmp, path string) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		if err := os.Rename(tmp, path); err != nil {
			os.Remove(tmp)
			return err
		}
		if err := syncDir(filepath.Dir(path)); err != nil {
			os.Remove(path)
			return err
		}
		return nil
	}
}

func (f *fileImages) Create(ctx context.Context, name string, _ ImageMeta, _ func()) (*NewImage, error) {
	path := f.path(name)
	tmp := path + creatingExt
	store, err := filestore.Create(tmp, 0)
	if err != nil {
		return nil, err
	}
	f.mapFile(store)
	return &NewImage{Store: store, Commit: publishNew(tmp, path), Abort: func() { os.Remove(tmp) }}, nil
}

func (f *fileImages) Open(ctx context.Context, name string, o OpenOptions) (cryptodisk.Storage, error) {
	return f.open(f.path(name), o.ReadOnly)
}

func (f *fileImages) Remove(ctx context.Context, name string) error {
	return shred(ctx, f.path(name))
}

func (f *fileImages) Snapshot(ctx context.Context, _ cryptodisk.Storage, disk, full string) (string, error) {
	path := f.snapPath(full)
	tmp := path + creatingExt
	method, err := cloneFile(ctx, f.path(disk), tmp)
	if err != nil {
		return "", err
	}
	if err := publishFile(tmp, path, 0o400); err != nil {
		return "", err
	}
	return method, nil
}

func (f *fileImages) Snapshots(ctx context.Context) ([]string, error) {
	names, err := scan(filepath.Join(f.dataDir, snapDir))
	if err != nil {
		return nil, fmt.Errorf("daemon: %w", err)
	}
	return names, nil
}

func (f *fileImages) OpenSnapshot(ctx context.Context, full string) (cryptodisk.Storage, error) {
	return f.open(f.snapPath(full), true)
}

func (f *fileImages) SnapshotStat(full string) (time.Time, int64) {
	st, err := os.Stat(f.snapPath(full))
	if err != nil {
		return time.Time{}, 0
	}
	var alloc int64
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		alloc = sys.Blocks * 512
	}
	return st.ModTime().UTC(), alloc
}

func (f *fileImages) RemoveSnapshot(ctx context.Context, full string) error {
	path := f.snapPath(full)
	if err := os.Chmod(path, 0o600); err != nil {
		return err
	}
	return shred(ctx, path)
}

func (f *fileImages) CloneSnapshot(ctx context.Context, full, name string, _ ImageMeta, _ func()) (*NewImage, error) {
	path := f.path(name)
	tmp := path + creatingExt
	// The snapshot is read-only: no barrier is needed to copy it.
	if _, err := cloneFile(ctx, f.snapPath(full), tmp); err != nil {
		return nil, err
	}
	store, err := f.open(tmp, false)
	if err != nil {
		os.Remove(tmp)
		return nil, err
	}
	return &NewImage{Store: store, Commit: publishNew(tmp, path), Abort: func() { os.Remove(tmp) }}, nil
}

func (f *fileImages) recordPath(kind, name string) string {
	return filepath.Join(f.dataDir, kind, name+".json")
}

func (f *fileImages) PutRecord(ctx context.Context, kind, name string, data []byte) error {
	return writeFileAtomic(f.recordPath(kind, name), data)
}

func (f *fileImages) Records(ctx context.Context, kind string) (map[string][]byte, error) {
	dir := filepath.Join(f.dataDir, kind)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	out := map[string][]byte{}
	for _, de := range ents {
		name, ok := strings.CutSuffix(de.Name(), ".json")
		if !ok || ValidateName(name) != nil {
			continue
		}
		raw, err := os.ReadFile(filepath.Join(dir, de.Name()))
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", kind, name, err)
		}
		if !json.Valid(raw) {
			return nil, fmt.Errorf("%s %s: not JSON", kind, name)
		}
		out[name] = raw
	}
	return out, nil
}

func (f *fileImages) DeleteRecord(ctx context.Context, kind, name string) error {
	return os.Remove(f.recordPath(kind, name))
}
