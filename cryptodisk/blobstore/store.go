package blobstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/lease"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"
)

const (
	// PageSize is the page blob's unit: sizes, writes and clears are
	// aligned to it on the wire.
	PageSize = 512
	// maxPutBytes is the most one Upload Pages call may carry, and the size
	// of the chunks reads are split into.
	maxPutBytes = 4 << 20
	// maxClearBytes bounds one Clear Pages call so that each finishes well
	// within the retry policy's per-try timeout.
	maxClearBytes = 1 << 30
	// MaxSize is the largest page blob Azure allows: 8 TiB.
	MaxSize = 8 << 40

	// DefaultLeaseDuration is the lease length when Options leave it zero.
	DefaultLeaseDuration = 30 * time.Second
	// DefaultMaxConcurrency bounds concurrent service calls per Store.
	DefaultMaxConcurrency = 16
	// expiryPoll is how often Open retries a lease it waits for.
	expiryPoll = time.Second
	// nPageLocks is the number of page-lock stripes.
	nPageLocks = 64
)

// Options say which blob to open and how to hold it.
type Options struct {
	// Container holds the disk blobs. Required.
	Container *container.Client
	// Name is the blob name. Required.
	Name string
	// LeaseDuration is how long the lease lasts without renewal: whole
	// seconds from 15 to 60. Zero means DefaultLeaseDuration. The Store
	// renews it every third of the duration.
	LeaseDuration time.Duration
	// Holder identifies this daemon (daemon ID, host) to anyone who finds
	// the blob leased. Empty means the host name.
	Holder string
	// BreakLease takes the disk from a current holder: its lease is broken
	// at once and this Store acquires a new one. The old holder's next write
	// fails with ErrLeaseLost. Use it only when the old holder is known to
	// be gone or must be fenced off.
	BreakLease bool
	// WaitForExpiry makes Open wait, until ctx is done, for a current
	// holder's lease to expire (a holder that stopped renewing) instead of
	// failing with ErrLeased.
	WaitForExpiry bool
	// OnLeaseLost is called once, in its own goroutine, when the Store
	// learns it no longer holds the lease. The daemon suspends the disk.
	OnLeaseLost func()
	// MaxConcurrency bounds the service calls in flight at once. Zero means
	// DefaultMaxConcurrency.
	MaxConcurrency int
	Logger         *slog.Logger
}

// Store is a cryptodisk.Storage on one Azure page blob, held through a blob
// lease. It is safe for concurrent use; concurrent calls become concurrent
// HTTP requests, at most MaxConcurrency at a time.
//
// A Store from Create or Open owns a lease on the blob until Close and a
// goroutine that renews it, which exits at Close or when the lease is lost.
// A Store from OpenSnapshot holds no lease and only reads.
type Store struct {
	name     string
	pb       *pageblob.Client
	lc       *lease.BlobClient // nil for a snapshot
	leaseAC  *blob.AccessConditions
	snapshot string // "" for the base blob
	log      *slog.Logger
	sem      chan struct{}
	size     atomic.Int64
	closed   atomic.Bool

	// wmu tracks mutating calls: writes, clears and resizes hold the read
	// side while their service calls are in flight; Sync, Snapshot and Close
	// take the write side to wait for them.
	wmu sync.RWMutex
	// pages serialise read-modify-write of partial pages, striped by page
	// index: between our read of an edge page and our upload of it, no other
	// partial write of that page may run, or one of the two would undo the
	// other. Whole-page writes and clears need no page lock: one that
	// covers an edge page overlaps the partial write's own bytes, and
	// Storage callers never run overlapping writes concurrently.
	pages [nPageLocks]sync.Mutex
	// gmu serialises Grow and SetMetadata, each of which reads, changes and
	// publishes state that a concurrent call of the same kind would race on.
	gmu sync.Mutex

	// mmu guards meta, holder and since.
	mmu    sync.Mutex
	meta   map[string]string
	holder string
	since  time.Time

	lost     atomic.Bool
	lostOnce sync.Once
	onLost   func()

	stop      chan struct{} // closed by Close to end the renewal goroutine
	renewDone chan struct{} // closed when the renewal goroutine exits

	alloc allocCache
}

// Create makes a new page blob of size bytes (rounded up to PageSize) with
// the given metadata, takes its lease and returns it open. It fails with an
// error matching fs.ErrExist if the blob exists.
func Create(ctx context.Context, o Options, size int64, metadata map[string]string) (*Store, error) {
	if err := o.check(); err != nil {
		return nil, err
	}
	if err := checkMetadata(metadata); err != nil {
		return nil, err
	}
	if size < 0 || size > MaxSize {
		return nil, fmt.Errorf("blobstore: create %s: size %d out of range: %w", o.Name, size, syscall.EFBIG)
	}
	pb := o.Container.NewPageBlobClient(o.Name)
	anyETag := azcore.ETagAny
	_, err := pb.Create(ctx, roundUp(size), &pageblob.CreateOptions{
		Metadata: toService(metadata, "", time.Time{}),
		AccessConditions: &blob.AccessConditions{
			ModifiedAccessConditions: &blob.ModifiedAccessConditions{IfNoneMatch: &anyETag},
		},
	})
	if err != nil {
		if bloberror.HasCode(err, bloberror.BlobAlreadyExists, bloberror.ConditionNotMet, bloberror.LeaseIDMissing) {
			return nil, fmt.Errorf("blobstore: create %s: %w: %w", o.Name, fs.ErrExist, err)
		}
		return nil, ioError("create "+o.Name, err)
	}
	return open(ctx, o, pb)
}

// Open takes the lease on an existing page blob and returns it open. If
// another holder has the lease it fails with a *LeasedError (matching
// ErrLeased), unless o asks to break the lease or wait for it to expire. A
// missing blob gives an error matching fs.ErrNotExist.
func Open(ctx context.Context, o Options) (*Store, error) {
	if err := o.check(); err != nil {
		return nil, err
	}
	return open(ctx, o, o.Container.NewPageBlobClient(o.Name))
}

func (o *Options) check() error {
	if o.Container == nil || o.Name == "" {
		return errors.New("blobstore: options need a container and a blob name")
	}
	if o.LeaseDuration == 0 {
		o.LeaseDuration = DefaultLeaseDuration
	}
	if o.LeaseDuration < 15*time.Second || o.LeaseDuration > 60*time.Second || o.LeaseDuration%time.Second != 0 {
		return fmt.Errorf("blobstore: lease duration %v: must be whole seconds from 15 to 60", o.LeaseDuration)
	}
	if o.Holder == "" {
		o.Holder, _ = os.Hostname()
	}
	if o.MaxConcurrency <= 0 {
		o.MaxConcurrency = DefaultMaxConcurrency
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

func open(ctx context.Context, o Options, pb *pageblob.Client) (*Store, error) {
	lc, err := lease.NewBlobClient(pb, nil) // a random lease ID
	if err != nil {
		return nil, fmt.Errorf("blobstore: open %s: %w", o.Name, err)
	}
	acquired, err := acquireLease(ctx, o, pb, lc)
	if err != nil {
		return nil, err
	}
	s := &Store{
		name:      o.Name,
		pb:        pb,
		lc:        lc,
		leaseAC:   &blob.AccessConditions{LeaseAccessConditions: &blob.LeaseAccessConditions{LeaseID: lc.LeaseID()}},
		log:       o.Logger.With("blob", o.Name),
		sem:       make(chan struct{}, o.MaxConcurrency),
		onLost:    o.OnLeaseLost,
		stop:      make(chan struct{}),
		renewDone: make(chan struct{}),
	}
	if err := s.load(ctx); err != nil {
		s.releaseLease()
		return nil, err
	}
	// Record who holds the disk, so that whoever fails to take it can say.
	s.mmu.Lock()
	meta := s.meta
	s.mmu.Unlock()
	now := time.Now()
	if _, err := pb.SetMetadata(ctx, toService(meta, o.Holder, now), &blob.SetMetadataOptions{AccessConditions: s.leaseAC}); err != nil {
		s.releaseLease()
		return nil, ioError("open "+o.Name+": record holder", err)
	}
	s.mmu.Lock()
	s.holder, s.since = o.Holder, now
	s.mmu.Unlock()
	go s.renew(o.LeaseDuration, acquired)
	return s, nil
}

// acquireLease takes the blob's lease as o asks, returning when the request
// that succeeded was sent (the lease runs from no earlier than that).
func acquireLease(ctx context.Context, o Options, pb *pageblob.Client, lc *lease.BlobClient) (time.Time, error) {
	seconds := int32(o.LeaseDuration / time.Second)
	broken := false
	for {
		sent := time.Now()
		_, err := lc.AcquireLease(ctx, seconds, nil)
		if err == nil {
			return sent, nil
		}
		if !bloberror.HasCode(err, bloberror.LeaseAlreadyPresent, bloberror.LeaseIsBreakingAndCannotBeAcquired) {
			return time.Time{}, ioError("open "+o.Name+": acquire lease", err)
		}
		switch {
		case o.BreakLease && !broken:
			// Break period 0 ends the lease now, even one already breaking.
			// Break once: if someone else wins the race for the free blob,
			// they hold it fairly.
			zero := int32(0)
			if _, err := lc.BreakLease(ctx, &lease.BlobBreakOptions{BreakPeriod: &zero}); err != nil &&
				!bloberror.HasCode(err, bloberror.LeaseNotPresentWithLeaseOperation) {
				return time.Time{}, ioError("open "+o.Name+": break lease", err)
			}
			broken = true
			o.Logger.Warn("blobstore: broke the lease of another holder", "blob", o.Name)
		case o.WaitForExpiry:
			t := time.NewTimer(expiryPoll)
			select {
			case <-ctx.Done():
				t.Stop()
				return time.Time{}, fmt.Errorf("blobstore: open %s: waiting for the lease to expire: %w: %w",
					o.Name, leasedError(context.WithoutCancel(ctx), pb, o.Name), ctx.Err())
			case <-t.C:
			}
		default:
			return time.Time{}, leasedError(ctx, pb, o.Name)
		}
	}
}

// leasedError describes who holds pb's lease.
func leasedError(ctx context.Context, pb *pageblob.Client, name string) error {
	e := &LeasedError{Name: name}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if props, err := pb.GetProperties(ctx, nil); err == nil {
		_, e.Holder, _ = fromService(props.Metadata)
		if props.LeaseState != nil {
			e.State = string(*props.LeaseState)
		}
	}
	return e
}

// load reads the blob's size and metadata and checks it is a page blob.
func (s *Store) load(ctx context.Context) error {
	props, err := s.pb.GetProperties(ctx, nil)
	if err != nil {
		return ioError("open "+s.name, err)
	}
	if props.BlobType == nil || *props.BlobType != blob.BlobTypePageBlob {
		return fmt.Errorf("blobstore: open %s: not a page blob", s.name)
	}
	if props.ContentLength == nil {
		return fmt.Errorf("blobstore: open %s: service reported no size", s.name)
	}
	s.size.Store(*props.ContentLength)
	user, holder, since := fromService(props.Metadata)
	s.mmu.Lock()
	s.meta, s.holder, s.since = user, holder, since
	s.mmu.Unlock()
	return nil
}

// OpenSnapshot opens a snapshot made by Snapshot, read-only. It takes no
// lease: a snapshot never changes. Writes fail with ErrReadOnly.
func OpenSnapshot(ctx context.Context, c *container.Client, name, snapshot string, o Options) (*Store, error) {
	o.Container, o.Name = c, name
	if err := o.check(); err != nil {
		return nil, err
	}
	pb, err := c.NewPageBlobClient(name).WithSnapshot(snapshot)
	if err != nil {
		return nil, fmt.Errorf("blobstore: open snapshot %s of %s: %w", snapshot, name, err)
	}
	s := &Store{
		name:     name,
		pb:       pb,
		snapshot: snapshot,
		log:      o.Logger.With("blob", name, "snapshot", snapshot),
		sem:      make(chan struct{}, o.MaxConcurrency),
	}
	if err := s.load(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

// Name is the blob's name.
func (s *Store) Name() string { return s.name }

// Size is the blob's size in bytes.
func (s *Store) Size() int64 { return s.size.Load() }

// Holder is the holder recorded on the blob: this daemon's, for a Store
// that holds the lease.
func (s *Store) Holder() string {
	s.mmu.Lock()
	defer s.mmu.Unlock()
	return s.holder
}

// Metadata returns a copy of the blob's metadata, without the keys this
// package keeps for itself. Keys are lower case.
func (s *Store) Metadata() map[string]string {
	s.mmu.Lock()
	defer s.mmu.Unlock()
	return maps.Clone(s.meta)
}

// SetMetadata replaces the blob's metadata with m (see Create for what keys
// and values may be); the holder record is kept.
func (s *Store) SetMetadata(ctx context.Context, m map[string]string) error {
	if err := s.mutable(); err != nil {
		return err
	}
	if err := checkMetadata(m); err != nil {
		return err
	}
	s.gmu.Lock()
	defer s.gmu.Unlock()
	s.mmu.Lock()
	holder, since := s.holder, s.since
	s.mmu.Unlock()
	if err := s.call(ctx, "set metadata", func(ctx context.Context) error {
		_, err := s.pb.SetMetadata(ctx, toService(m, holder, since), &blob.SetMetadataOptions{AccessConditions: s.leaseAC})
		return err
	}); err != nil {
		return err
	}
	s.mmu.Lock()
	s.meta = maps.Clone(m)
	s.mmu.Unlock()
	return nil
}

// mutable reports why s cannot be written, if it cannot.
func (s *Store) mutable() error {
	switch {
	case s.closed.Load():
		return fmt.Errorf("blobstore: %s: %w", s.name, fs.ErrClosed)
	case s.lc == nil:
		return ErrReadOnly
	case s.lost.Load():
		return s.lostError()
	}
	return nil
}

func (s *Store) lostError() error {
	return fmt.Errorf("blobstore: %s: %w: %w", s.name, ErrLeaseLost, syscall.EIO)
}

// acquire takes a slot of the concurrency bound.
func (s *Store) acquire(ctx context.Context) error {
	select {
	case s.sem <- struct{}{}:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("blobstore: %s: %w", s.name, ctx.Err())
	}
}

func (s *Store) release() { <-s.sem }

// call runs one lease-carrying service call in a concurrency slot, and
// turns a lease error into a lost lease.
func (s *Store) call(ctx context.Context, op string, fn func(ctx context.Context) error) error {
	if err := s.acquire(ctx); err != nil {
		return err
	}
	err := fn(ctx)
	s.release()
	return s.opError(op, err)
}

// chunks runs fn over [off, off+n) in pieces of at most size bytes,
// concurrently within the concurrency bound, and returns the first error.
// fn must not take a concurrency slot itself.
func (s *Store) chunks(ctx context.Context, off, n, size int64, fn func(ctx context.Context, off, n int64) error) error {
	if n <= size {
		if err := s.acquire(ctx); err != nil {
			return err
		}
		defer s.release()
		return fn(ctx, off, n)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error
	)
	for at, end := off, off+n; at < end; at += size {
		if err := s.acquire(ctx); err != nil {
			once.Do(func() { first = err })
			break
		}
		wg.Go(func() {
			defer s.release()
			if err := fn(ctx, at, min(size, end-at)); err != nil {
				once.Do(func() { first = err })
				cancel(err)
			}
		})
	}
	wg.Wait()
	return first
}

// ReadAt fills p from off with Get Blob calls of at most 4 MiB each, run
// concurrently. Pages never written or cleared read as zeros.
func (s *Store) ReadAt(ctx context.Context, p []byte, off int64) error {
	if s.closed.Load() {
		return fmt.Errorf("blobstore: read %s: %w", s.name, fs.ErrClosed)
	}
	if off < 0 || off > s.size.Load()-int64(len(p)) {
		return fmt.Errorf("blobstore: read %s [%d,+%d) beyond %d: %w", s.name, off, len(p), s.size.Load(), syscall.EINVAL)
	}
	if len(p) == 0 {
		return nil
	}
	return s.chunks(ctx, off, int64(len(p)), maxPutBytes, func(ctx context.Context, at, n int64) error {
		return s.get(ctx, p[at-off:at-off+n], at)
	})
}

// get reads p at off in one request. The caller holds a concurrency slot.
func (s *Store) get(ctx context.Context, p []byte, off int64) error {
	resp, err := s.pb.DownloadStream(ctx, &blob.DownloadStreamOptions{Range: blob.HTTPRange{Offset: off, Count: int64(len(p))}})
	if err != nil {
		return ioError(fmt.Sprintf("read %s [%d,+%d)", s.name, off, len(p)), err)
	}
	defer resp.Body.Close()
	if _, err := io.ReadFull(resp.Body, p); err != nil {
		return ioError(fmt.Sprintf("read %s [%d,+%d)", s.name, off, len(p)), err)
	}
	// Reading to EOF lets the HTTP client reuse the connection; a body
	// closed early costs a new connection per read.
	if n, _ := io.Copy(io.Discard, io.LimitReader(resp.Body, 1)); n != 0 {
		return fmt.Errorf("blobstore: read %s [%d,+%d): service sent more than asked for: %w", s.name, off, len(p), syscall.EIO)
	}
	return nil
}

// WriteAt writes p at off with Upload Pages calls of at most 4 MiB each,
// run concurrently, every one carrying the lease ID. Whole aligned pages go
// straight up; a write that starts or ends inside a page first reads that
// page and merges into it, under that page's lock (see Store.pages). A write is
// durable when WriteAt returns nil. WriteAt does not keep p.
func (s *Store) WriteAt(ctx context.Context, p []byte, off int64) error {
	if err := s.mutable(); err != nil {
		return err
	}
	if off < 0 || off > s.size.Load()-int64(len(p)) {
		return fmt.Errorf("blobstore: write %s [%d,+%d) beyond %d: %w", s.name, off, len(p), s.size.Load(), syscall.ENOSPC)
	}
	if len(p) == 0 {
		return nil
	}
	end := off + int64(len(p))
	s.wmu.RLock()
	defer s.wmu.RUnlock()
	if off%PageSize == 0 && end%PageSize == 0 {
		return s.upload(ctx, p, off)
	}
	return s.mergeUpload(ctx, off, end, func(buf []byte) { copy(buf, p) })
}

// lockEdges locks the page locks of the partial pages at the edges of
// [off, end), in stripe order, and returns the unlock.
func (s *Store) lockEdges(off, end int64) func() {
	var idx []int
	if off%PageSize != 0 {
		idx = append(idx, int(off/PageSize%nPageLocks))
	}
	if end%PageSize != 0 {
		idx = append(idx, int(end/PageSize%nPageLocks))
	}
	if len(idx) == 2 {
		if idx[0] == idx[1] {
			idx = idx[:1]
		} else if idx[0] > idx[1] {
			idx[0], idx[1] = idx[1], idx[0]
		}
	}
	for _, i := range idx {
		s.pages[i].Lock()
	}
	return func() {
		for _, i := range idx {
			s.pages[i].Unlock()
		}
	}
}

// mergeUpload writes [off, end) after widening it to whole pages: the
// partial edge pages are read, fill writes the caller's bytes into buf
// (which holds [off, end)), and the pages go up, all under the edge pages'
// locks. The caller holds wmu's read side.
func (s *Store) mergeUpload(ctx context.Context, off, end int64, fill func(buf []byte)) error {
	defer s.lockEdges(off, end)()
	a, b := roundDown(off), roundUp(end)
	page := make([]byte, b-a)
	if off != a {
		if err := s.readPage(ctx, page[:PageSize], a); err != nil {
			return err
		}
	}
	if end != b && (b-PageSize != a || off == a) {
		if err := s.readPage(ctx, page[len(page)-PageSize:], b-PageSize); err != nil {
			return err
		}
	}
	fill(page[off-a : end-a])
	return s.upload(ctx, page, a)
}

func (s *Store) readPage(ctx context.Context, p []byte, off int64) error {
	if err := s.acquire(ctx); err != nil {
		return err
	}
	defer s.release()
	return s.get(ctx, p, off)
}

// upload writes whole pages. The caller holds wmu.
func (s *Store) upload(ctx context.Context, p []byte, off int64) error {
	defer s.alloc.invalidate(off, int64(len(p)))
	return s.chunks(ctx, off, int64(len(p)), maxPutBytes, func(ctx context.Context, at, n int64) error {
		return s.leased(ctx, "upload pages", func(ctx context.Context) error {
			body := streaming.NopCloser(bytes.NewReader(p[at-off : at-off+n]))
			_, err := s.pb.UploadPages(ctx, body, blob.HTTPRange{Offset: at, Count: n},
				&pageblob.UploadPagesOptions{AccessConditions: s.leaseAC})
			return err
		})
	})
}

// leased runs a lease-carrying call whose caller already holds a
// concurrency slot, turning lease errors into a lost lease.
func (s *Store) leased(ctx context.Context, op string, fn func(ctx context.Context) error) error {
	if s.lost.Load() {
		return s.lostError()
	}
	return s.opError(op, fn(ctx))
}

// opError wraps the error of a blob operation for the caller, nil for
// nil; a lease error marks the lease lost.
func (s *Store) opError(op string, err error) error {
	if err == nil {
		return nil
	}
	if isLeaseError(err) {
		s.markLost(err)
		return fmt.Errorf("blobstore: %s %s: %w: %w: %w", op, s.name, ErrLeaseLost, syscall.EIO, err)
	}
	return ioError(op+" "+s.name, err)
}

// Punch clears the whole pages of the range with Clear Pages (cleared pages
// are holes: they read as zeros and Allocated reports them unallocated) and
// writes zeros into partial pages at its edges.
func (s *Store) Punch(ctx context.Context, off, length int64) error {
	if err := s.mutable(); err != nil {
		return err
	}
	if off < 0 || length < 0 || off > s.size.Load()-length {
		return fmt.Errorf("blobstore: punch %s [%d,+%d) beyond %d: %w", s.name, off, length, s.size.Load(), syscall.EINVAL)
	}
	if length == 0 {
		return nil
	}
	end := off + length
	a, b := roundUp(off), roundDown(end) // the whole pages inside
	s.wmu.RLock()
	defer s.wmu.RUnlock()
	if off == a && end == b {
		return s.clear(ctx, a, b)
	}
	if a >= b { // inside one page, or across one boundary without a whole page
		return s.mergeUpload(ctx, off, end, func(buf []byte) { clear(buf) })
	}
	if off != a {
		if err := s.mergeUpload(ctx, off, a, func(buf []byte) { clear(buf) }); err != nil {
			return err
		}
	}
	if end != b {
		if err := s.mergeUpload(ctx, b, end, func(buf []byte) { clear(buf) }); err != nil {
			return err
		}
	}
	return s.clear(ctx, a, b)
}

// clear clears whole pages [a, b). The caller holds wmu.
func (s *Store) clear(ctx context.Context, a, b int64) error {
	defer s.alloc.invalidate(a, b-a)
	return s.chunks(ctx, a, b-a, maxClearBytes, func(ctx context.Context, at, n int64) error {
		return s.leased(ctx, "clear pages", func(ctx context.Context) error {
			_, err := s.pb.ClearPages(ctx, blob.HTTPRange{Offset: at, Count: n}, &pageblob.ClearPagesOptions{AccessConditions: s.leaseAC})
			return err
		})
	})
}

// Allocated reports valid pages (written and not cleared) as allocated and
// the rest as holes, from Get Page Ranges. Results are cached per 256 MiB
// window until a write, clear or resize touches the window.
func (s *Store) Allocated(ctx context.Context, off, length int64, fn func(length int64, allocated bool) bool) error {
	if s.closed.Load() {
		return fmt.Errorf("blobstore: allocated %s: %w", s.name, fs.ErrClosed)
	}
	if off < 0 || length < 0 {
		return fmt.Errorf("blobstore: allocated %s [%d,+%d): %w", s.name, off, length, syscall.EINVAL)
	}
	end := min(off+length, s.size.Load())
	if length > s.size.Load() { // off+length may overflow
		end = s.size.Load()
	}
	// Runs are coalesced across windows before fn sees them.
	var (
		runLen   int64
		runAlloc bool
	)
	emit := func(n int64, alloc bool) bool {
		if n <= 0 {
			return true
		}
		if runLen > 0 && alloc != runAlloc {
			if !fn(runLen, runAlloc) {
				return false
			}
			runLen = 0
		}
		runLen, runAlloc = runLen+n, alloc
		return true
	}
	for at := off; at < end; {
		wEnd := min((at/allocWindow+1)*allocWindow, end)
		spans, err := s.windowSpans(ctx, at, wEnd)
		if err != nil {
			return err
		}
		for _, sp := range spans {
			if sp.end <= at || sp.start >= wEnd {
				continue
			}
			if !emit(max(sp.start, at)-at, false) {
				return nil
			}
			at = max(sp.start, at)
			if !emit(min(sp.end, wEnd)-at, true) {
				return nil
			}
			at = min(sp.end, wEnd)
		}
		if !emit(wEnd-at, false) {
			return nil
		}
		at = wEnd
	}
	if runLen > 0 {
		fn(runLen, runAlloc)
	}
	return nil
}

// Sync waits for writes, clears and resizes in flight and returns. A page
// blob write is durable once the service acknowledges it, so there is
// nothing to flush: every WriteAt or Punch that returned nil is already
// durable. After the lease is lost Sync fails with ErrLeaseLost, so a
// client's FLUSH reports that the disk can no longer be written.
func (s *Store) Sync(ctx context.Context) error {
	if s.closed.Load() {
		return fmt.Errorf("blobstore: sync %s: %w", s.name, fs.ErrClosed)
	}
	if s.lc == nil {
		return nil
	}
	s.wmu.Lock()
	s.wmu.Unlock() //nolint:staticcheck // an empty critical section: waiting is the point
	if s.lost.Load() {
		return s.lostError()
	}
	return nil
}

// Grow resizes the blob to size bytes rounded up to PageSize; the new range
// reads as zeros.
func (s *Store) Grow(ctx context.Context, size int64) error {
	if err := s.mutable(); err != nil {
		return err
	}
	s.gmu.Lock()
	defer s.gmu.Unlock()
	old := s.size.Load()
	size = roundUp(size)
	switch {
	case size < old:
		return fmt.Errorf("blobstore: grow %s from %d to %d: pages blobs only grow here: %w", s.name, old, size, syscall.EINVAL)
	case size > MaxSize:
		return fmt.Errorf("blobstore: grow %s to %d: more than 8 TiB: %w", s.name, size, syscall.EFBIG)
	case size == old:
		return nil
	}
	s.wmu.RLock()
	defer s.wmu.RUnlock()
	defer s.alloc.invalidate(old, size-old)
	if err := s.call(ctx, "resize", func(ctx context.Context) error {
		_, err := s.pb.Resize(ctx, size, &pageblob.ResizeOptions{AccessConditions: s.leaseAC})
		return err
	}); err != nil {
		return err
	}
	s.size.Store(size)
	return nil
}

// Snapshot makes a read-only, point-in-time copy of the blob and returns its
// ID for OpenSnapshot. It waits for writes in flight and holds new ones
// until the snapshot exists, so the snapshot has every acknowledged write
// and no partial one.
func (s *Store) Snapshot(ctx context.Context) (string, error) {
	if err := s.mutable(); err != nil {
		return "", err
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	var id string
	err := s.call(ctx, "snapshot", func(ctx context.Context) error {
		resp, err := s.pb.CreateSnapshot(ctx, &blob.CreateSnapshotOptions{AccessConditions: s.leaseAC})
		if err == nil {
			if resp.Snapshot == nil {
				return errors.New("service returned no snapshot ID")
			}
			id = *resp.Snapshot
		}
		return err
	})
	return id, err
}

// Delete deletes the blob and its snapshots, and closes s.
func (s *Store) Delete(ctx context.Context) error {
	if err := s.mutable(); err != nil {
		return err
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	include := blob.DeleteSnapshotsOptionTypeInclude
	err := s.call(ctx, "delete", func(ctx context.Context) error {
		_, err := s.pb.Delete(ctx, &blob.DeleteOptions{DeleteSnapshots: &include, AccessConditions: s.leaseAC})
		return err
	})
	if err != nil {
		return err
	}
	if !s.closed.Swap(true) {
		s.stopRenewal()
	}
	return nil
}

// Close waits for writes in flight, stops renewing and releases the lease,
// so another daemon can take the disk at once. It does not (and need not)
// sync. A Store whose lease was lost closes without error.
func (s *Store) Close() error {
	if s.closed.Swap(true) {
		return fmt.Errorf("blobstore: close %s: %w", s.name, fs.ErrClosed)
	}
	if s.lc == nil {
		return nil
	}
	s.stopRenewal()
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.lost.Load() {
		return nil
	}
	return s.releaseLease()
}

func (s *Store) releaseLease() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := s.lc.ReleaseLease(ctx, nil); err != nil && !isLeaseError(err) {
		return ioError("release lease on "+s.name, err)
	}
	return nil
}

func roundUp(n int64) int64   { return (n + PageSize - 1) &^ (PageSize - 1) }
func roundDown(n int64) int64 { return n &^ (PageSize - 1) }
