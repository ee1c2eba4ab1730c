package cryptodisk

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cryptnbd/cryptnbd/cryptodisk/luks2"
)

// State is a disk's lifecycle state.
type State string

const (
	StateActive    State = "Active"
	StateSuspended State = "Suspended"
	StateClosed    State = "Closed"
)

const (
	volumeKeyBytes = 64 // XTS-AES-256: two AES-256 keys
	secretBytes    = 32
	// dataOffset is cryptsetup's default: room for two 16 KiB metadata
	// copies and the keyslot area, aligned to 1 MiB.
	dataOffset = 16 << 20
	// DefaultSuspendHold is below the Linux NBD client's 30 s request
	// timeout, so a held request is answered with EIO before the kernel gives
	// up on the whole connection.
	DefaultSuspendHold = 25 * time.Second
)

// Options configure an opened disk.
type Options struct {
	// Cipher builds the sector cipher; nil means the package default.
	Cipher CipherFactory
	// SuspendHold is how long a request waits while the disk is suspended
	// before it fails with EIO. Zero means DefaultSuspendHold.
	SuspendHold time.Duration
	Logger      *slog.Logger
}

// CreateOptions describe a new disk.
type CreateOptions struct {
	SizeBytes int64
	// SectorSize is the encryption sector: 4096 (default) or 512.
	SectorSize int
	// Provider names the key provider, recorded in the token.
	Provider   string
	Label      string
	Properties map[string]string
	// PBKDFIterations for keyslot 0 and the digest; the passphrase is a
	// random 256-bit secret, so cryptsetup's minimum of 1000 loses nothing.
	PBKDFIterations int
}

// Disk is one open encrypted disk. It is safe for concurrent use; it
// implements the NBD layer's Backend and the key watcher's suspend target.
type Disk struct {
	store  Storage
	lender Lender // store, where it lends its pages; else nil
	// noWait is the store where it can read without waiting, else nil;
	// noWaitWrites says its writes never wait either.
	noWait       NoWaitStorage
	noWaitWrites bool
	log          *slog.Logger
	newCipher    CipherFactory
	hold         time.Duration
	uuid         string
	dataOff      int64
	sectorSize   int64
	tweakStep    uint64
	size         atomic.Int64

	// hmu serialises header rewrites (re-wrap, resize) and guards hdr, token.
	hmu   sync.Mutex
	hdr   *luks2.Header
	token Token

	// gmu is the suspend gate. I/O holds the read side for as long as it
	// uses the cipher or writes the store; Suspend and Close take the write
	// side, so they wait for that I/O to drain before wiping the key.
	gmu     sync.RWMutex
	cipher  SectorCipher // nil while suspended or closed
	state   State
	reason  string
	since   time.Time
	resumed chan struct{} // closed when the disk leaves the suspended state
	held    atomic.Int64
	writes  atomic.Uint64 // writes completed, counted inside the gate

	// wmu is the write barrier: WriteAt and Zero (so Trim) hold its read
	// side while they change the store; Barrier holds the write side, so
	// the image it sees holds every write acknowledged before Barrier was
	// called and none that started after. Reads never take it.
	wmu sync.RWMutex

	// stripes serialise read-modify-write of partial sectors against any
	// other write to the same sector; see lockRange.
	stripes [nStripes]stripe
	bufs    sync.Pool // *[]byte of zeroChunk bytes, for zeroing
	// sectorBufs bounce partial sectors: one sector each, so losing them to
	// a GC costs a sector to refill, not a megabyte.
	sectorBufs sync.Pool
}

type stripe struct {
	sync.RWMutex
	_ [40]byte // keep stripes on separate cache lines
}

const (
	nStripes  = 256
	zeroChunk = 1 << 20
)

// Create formats store as a new LUKS2 disk whose keyslot secret is wrapped
// by w, and returns it open. The store should be empty; it is grown to hold
// the header and SizeBytes of data.
func Create(ctx context.Context, store Storage, w KeyWrapper, co CreateOptions, o Options) (*Disk, error) {
	if co.SectorSize == 0 {
		co.SectorSize = 4096
	}
	if co.SectorSize != 512 && co.SectorSize != 4096 {
		return nil, fmt.Errorf("cryptodisk: sector size %d: must be 512 or 4096", co.SectorSize)
	}
	if co.SizeBytes <= 0 || co.SizeBytes%int64(co.SectorSize) != 0 {
		return nil, fmt.Errorf("cryptodisk: size %d: must be a positive multiple of the %d-byte sector", co.SizeBytes, co.SectorSize)
	}
	if co.Provider == "" {
		return nil, errors.New("cryptodisk: create: no key provider named")
	}
	vk := make([]byte, volumeKeyBytes)
	secret := make([]byte, secretBytes)
	defer wipe(vk)
	defer wipe(secret)
	if _, err := rand.Read(vk); err != nil {
		return nil, fmt.Errorf("cryptodisk: volume key: %w", err)
	}
	if _, err := rand.Read(secret); err != nil {
		return nil, fmt.Errorf("cryptodisk: keyslot secret: %w", err)
	}
	rw := storeIO{ctx, store}
	if err := store.Grow(ctx, dataOffset+co.SizeBytes); err != nil {
		return nil, fmt.Errorf("cryptodisk: create: %w", err)
	}
	hdr, err := luks2.Format(rw, vk, secret, luks2.FormatOptions{
		Label:           co.Label,
		SectorSize:      co.SectorSize,
		DataOffset:      dataOffset,
		PBKDFIterations: co.PBKDFIterations,
	})
	if err != nil {
		return nil, fmt.Errorf("cryptodisk: create: %w", err)
	}
	kid, alg, wrapped, err := w.Wrap(ctx, secret, aad(hdr.UUID()))
	if err != nil {
		return nil, fmt.Errorf("cryptodisk: create: wrap keyslot secret: %w", err)
	}
	tok := Token{
		Type: TokenType, Keyslots: []string{"0"},
		Provider: co.Provider, KeyID: kid, Algorithm: alg, Wrapped: wrapped,
		Check: checkValue(secret, hdr.UUID()), Properties: co.Properties,
	}
	if err := setToken(hdr, tok); err != nil {
		return nil, err
	}
	if err := hdr.Write(rw, func() error { return store.Sync(ctx) }); err != nil {
		return nil, fmt.Errorf("cryptodisk: create: %w", err)
	}
	return open(store, hdr, tok, vk, o)
}

func setToken(hdr *luks2.Header, tok Token) error {
	raw, err := json.Marshal(tok)
	if err != nil {
		return fmt.Errorf("cryptodisk: token: %w", err)
	}
	if err := hdr.SetToken(tokenID, raw); err != nil {
		return fmt.Errorf("cryptodisk: token: %w", err)
	}
	return nil
}

// Info is what can be read from an image without any key.
type Info struct {
	UUID       string
	Label      string
	SectorSize int
	DataOffset int64
	SizeBytes  int64
	Token      Token
}

// Inspect reads the LUKS2 header and the cryptnbd token, so the caller can
// pick the key provider the token names before calling Open.
func Inspect(ctx context.Context, store Storage) (*Info, error) {
	hdr, tok, err := readHeader(ctx, store)
	if err != nil {
		return nil, err
	}
	return &Info{
		UUID: hdr.UUID(), Label: hdr.Label(), SectorSize: hdr.SectorSize(),
		DataOffset: hdr.DataOffset(), SizeBytes: store.Size() - hdr.DataOffset(), Token: tok,
	}, nil
}

func readHeader(ctx context.Context, store Storage) (*luks2.Header, Token, error) {
	hdr, err := luks2.Read(storeIO{ctx, store})
	if err != nil {
		return nil, Token{}, fmt.Errorf("cryptodisk: %w", err)
	}
	raw, ok := hdr.Tokens()[tokenID]
	if !ok {
		return nil, Token{}, ErrNotCryptnbd
	}
	tok, err := parseToken(raw)
	if err != nil {
		return nil, Token{}, err
	}
	return hdr, tok, nil
}

// Open unlocks an existing disk: unwrap the keyslot secret, check it against
// the token's check value, open keyslot 0 and verify the LUKS2 digest.
func Open(ctx context.Context, store Storage, u KeyUnwrapper, o Options) (*Disk, error) {
	hdr, tok, err := readHeader(ctx, store)
	if err != nil {
		return nil, err
	}
	vk, err := unlock(ctx, store, hdr, tok, u)
	if err != nil {
		return nil, err
	}
	defer wipe(vk)
	return open(store, hdr, tok, vk, o)
}

func unlock(ctx context.Context, store Storage, hdr *luks2.Header, tok Token, u KeyUnwrapper) ([]byte, error) {
	secret, err := unwrapSecret(ctx, hdr.UUID(), tok, u)
	if err != nil {
		return nil, err
	}
	defer wipe(secret)
	vk, err := hdr.Unlock(storeIO{ctx, store}, secret)
	if err != nil {
		return nil, fmt.Errorf("cryptodisk: keyslot: %w", err)
	}
	return vk, nil
}

func unwrapSecret(ctx context.Context, uuid string, tok Token, u KeyUnwrapper) ([]byte, error) {
	secret, err := u.Unwrap(ctx, tok.KeyID, tok.Algorithm, tok.Wrapped, aad(uuid))
	if err != nil {
		return nil, fmt.Errorf("cryptodisk: unwrap keyslot secret with %s: %w", tok.KeyID, err)
	}
	if subtle.ConstantTimeCompare(checkValue(secret, uuid), tok.Check) != 1 {
		wipe(secret)
		return nil, ErrWrongKey
	}
	return secret, nil
}

func open(store Storage, hdr *luks2.Header, tok Token, vk []byte, o Options) (*Disk, error) {
	if o.Cipher == nil {
		o.Cipher = DefaultCipher
	}
	if o.SuspendHold <= 0 {
		o.SuspendHold = DefaultSuspendHold
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	ss := hdr.SectorSize()
	if ss != 512 && ss != 4096 {
		return nil, fmt.Errorf("cryptodisk: unsupported sector size %d", ss)
	}
	c, err := o.Cipher(vk)
	if err != nil {
		return nil, fmt.Errorf("cryptodisk: cipher: %w", err)
	}
	d := &Disk{
		store: store, log: o.Logger, newCipher: o.Cipher, hold: o.SuspendHold,
		uuid: hdr.UUID(), dataOff: hdr.DataOffset(), sectorSize: int64(ss),
		// cryptsetup sets up dm-crypt for LUKS2 without iv_large_sectors, so
		// the plain64 IV counts 512-byte units even for 4096-byte sectors:
		// see get_dm_crypt_params() / the CRYPT_ACTIVATE_IV_LARGE_SECTORS flag
		// in cryptsetup's lib/libdevmapper.c, which LUKS2 activation never sets.
		tweakStep: uint64(ss / 512),
		hdr:       hdr, token: tok, cipher: c, state: StateActive, since: time.Now(),
	}
	d.lender, _ = store.(Lender)
	if nw, ok := store.(NoWaitStorage); ok {
		d.noWait, d.noWaitWrites = nw, nw.InMemory()
	}
	d.size.Store(store.Size() - d.dataOff)
	d.bufs.New = func() any { b := make([]byte, zeroChunk); return &b }
	d.sectorBufs.New = func() any { b := make([]byte, ss); return &b }
	return d, nil
}

// UUID is the LUKS2 UUID.
func (d *Disk) UUID() string { return d.uuid }

// SectorSize is the encryption sector in bytes.
func (d *Disk) SectorSize() int { return int(d.sectorSize) }

// Size is the data size in bytes.
func (d *Disk) Size() int64 { return d.size.Load() }

// Token is a copy of the disk's key token.
func (d *Disk) Token() Token {
	d.hmu.Lock()
	defer d.hmu.Unlock()
	return d.token
}

// State reports the gate's state, the reason for a suspension, and since when.
func (d *Disk) State() (State, string, time.Time) {
	d.gmu.RLock()
	defer d.gmu.RUnlock()
	return d.state, d.reason, d.since
}

// WritesCompleted counts writes (WRITE, and zeroing that punched holes)
// completed since the disk was opened. It cannot move while the disk is
// suspended, which is what makes it evidence that nothing was written
// after the suspension instant.
func (d *Disk) WritesCompleted() uint64 { return d.writes.Load() }

// Held is how many requests are waiting at the gate right now.
func (d *Disk) Held() int64 { return d.held.Load() }

// enter passes the gate: on success the caller holds gmu's read side and
// must call d.gmu.RUnlock. While the disk is suspended it waits, up to the
// hold time or until ctx ends.
func (d *Disk) enter(ctx context.Context) (SectorCipher, error) {
	d.gmu.RLock()
	if c := d.cipher; c != nil {
		return c, nil
	}
	d.gmu.RUnlock()
	return d.wait(ctx)
}

// tryEnter is enter for a caller that must not wait: it returns nil,
// holding nothing, while the disk is suspended or closed or Suspend is
// waiting for the gate.
func (d *Disk) tryEnter() SectorCipher {
	if !d.gmu.TryRLock() {
		return nil
	}
	if c := d.cipher; c != nil {
		return c
	}
	d.gmu.RUnlock()
	return nil
}

func (d *Disk) wait(ctx context.Context) (SectorCipher, error) {
	d.held.Add(1)
	defer d.held.Add(-1)
	timer := time.NewTimer(d.hold)
	defer timer.Stop()
	for {
		d.gmu.RLock()
		if c := d.cipher; c != nil {
			return c, nil
		}
		state, ch := d.state, d.resumed
		d.gmu.RUnlock()
		if state == StateClosed {
			return nil, fmt.Errorf("%w: %w", ErrClosed, syscall.ESHUTDOWN)
		}
		select {
		case <-ch:
		case <-timer.C:
			return nil, fmt.Errorf("%w: held %s: %w", ErrSuspended, d.hold, syscall.EIO)
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: %w: %w", ErrSuspended, ctx.Err(), syscall.EIO)
		}
	}
}

// Suspend stops I/O: it waits for requests already using the key to finish,
// then wipes the key schedule. Requests arriving afterwards are held until
// Resume or the hold time. Suspending a suspended disk updates the reason.
func (d *Disk) Suspend(reason string) {
	d.gmu.Lock()
	defer d.gmu.Unlock()
	switch d.state {
	case StateClosed:
		return
	case StateActive:
		d.cipher.Zero()
		d.cipher = nil
		d.state = StateSuspended
		d.since = time.Now()
		d.resumed = make(chan struct{})
	}
	d.reason = reason
	d.log.Warn("disk suspended", "uuid", d.uuid, "reason", reason)
}

// Resume unwraps the key again through u, verifies it, and lets held
// requests proceed. It is a no-op on an active disk.
func (d *Disk) Resume(ctx context.Context, u KeyUnwrapper) error {
	if st, _, _ := d.State(); st != StateSuspended {
		return nil
	}
	d.hmu.Lock()
	hdr, tok := d.hdr, d.token
	d.hmu.Unlock()
	vk, err := unlock(ctx, d.store, hdr, tok, u)
	if err != nil {
		return err
	}
	c, err := d.newCipher(vk)
	wipe(vk)
	if err != nil {
		return fmt.Errorf("cryptodisk: cipher: %w", err)
	}
	d.gmu.Lock()
	defer d.gmu.Unlock()
	if d.state != StateSuspended {
		c.Zero()
		return nil
	}
	d.cipher, d.state, d.reason, d.since = c, StateActive, "", time.Now()
	close(d.resumed)
	d.log.Info("disk resumed", "uuid", d.uuid)
	return nil
}

// Close wipes the key and closes the store. Held requests fail with
// ESHUTDOWN. Close does not flush: callers flush first if they want to.
func (d *Disk) Close() error {
	d.gmu.Lock()
	switch d.state {
	case StateClosed:
		d.gmu.Unlock()
		return nil
	case StateActive:
		d.cipher.Zero()
		d.cipher = nil
	case StateSuspended:
		close(d.resumed)
	}
	d.state = StateClosed
	d.gmu.Unlock()
	return d.store.Close()
}

// RecoverySecret unwraps the keyslot secret through u, for `cryptsetup open
// --key-file`. A revoked key cannot be bypassed: u must succeed.
func (d *Disk) RecoverySecret(ctx context.Context, u KeyUnwrapper) ([]byte, error) {
	tok := d.Token()
	return unwrapSecret(ctx, d.uuid, tok, u)
}

// Rewrap wraps the keyslot secret again under w (a new key or key version)
// and rewrites both header copies. No data is re-encrypted.
func (d *Disk) Rewrap(ctx context.Context, u KeyUnwrapper, w KeyWrapper, provider string) error {
	d.hmu.Lock()
	defer d.hmu.Unlock()
	secret, err := unwrapSecret(ctx, d.uuid, d.token, u)
	if err != nil {
		return err
	}
	defer wipe(secret)
	kid, alg, wrapped, err := w.Wrap(ctx, secret, aad(d.uuid))
	if err != nil {
		return fmt.Errorf("cryptodisk: rewrap: %w", err)
	}
	tok := d.token
	tok.Provider, tok.KeyID, tok.Algorithm, tok.Wrapped = provider, kid, alg, wrapped
	if err := setToken(d.hdr, tok); err != nil {
		return err
	}
	if err := d.hdr.Write(storeIO{ctx, d.store}, func() error { return d.store.Sync(ctx) }); err != nil {
		return fmt.Errorf("cryptodisk: rewrap: %w", err)
	}
	d.token = tok
	return nil
}

// Grow extends the disk to sizeBytes. Connected clients keep working; new
// connections see the new size.
func (d *Disk) Grow(ctx context.Context, sizeBytes int64) error {
	d.hmu.Lock()
	defer d.hmu.Unlock()
	if sizeBytes < d.Size() {
		return fmt.Errorf("cryptodisk: resize to %d: disks only grow (now %d)", sizeBytes, d.Size())
	}
	if sizeBytes%d.sectorSize != 0 {
		return fmt.Errorf("cryptodisk: resize to %d: not a multiple of the %d-byte sector", sizeBytes, d.sectorSize)
	}
	if err := d.store.Grow(ctx, d.dataOff+sizeBytes); err != nil {
		return fmt.Errorf("cryptodisk: resize: %w", err)
	}
	d.size.Store(sizeBytes)
	// The LUKS2 data segment is dynamic (it runs to the end of the image),
	// so the grown store is the resize. The size is also recorded in the
	// token, in one atomic header write, for tools that read only headers.
	if err := d.setPropertiesLocked(ctx, map[string]string{PropSizeBytes: strconv.FormatInt(sizeBytes, 10)}); err != nil {
		return fmt.Errorf("cryptodisk: resize: %w", err)
	}
	return nil
}

// PropSizeBytes is the token property Grow records the data size in.
const PropSizeBytes = "sizeBytes"

// SetProperties merges props into the token's properties (an empty value
// removes a key) and rewrites both header copies, one at a time with a sync
// after each, so a crash leaves either the old or the new token.
func (d *Disk) SetProperties(ctx context.Context, props map[string]string) error {
	d.hmu.Lock()
	defer d.hmu.Unlock()
	return d.setPropertiesLocked(ctx, props)
}

func (d *Disk) setPropertiesLocked(ctx context.Context, props map[string]string) error {
	tok := d.token
	merged := make(map[string]string, len(tok.Properties)+len(props))
	for k, v := range tok.Properties {
		merged[k] = v
	}
	for k, v := range props {
		if v == "" {
			delete(merged, k)
		} else {
			merged[k] = v
		}
	}
	tok.Properties = merged
	if err := setToken(d.hdr, tok); err != nil {
		return err
	}
	if err := d.hdr.Write(storeIO{ctx, d.store}, func() error { return d.store.Sync(ctx) }); err != nil {
		return fmt.Errorf("cryptodisk: header: %w", err)
	}
	d.token = tok
	return nil
}

// Barrier runs fn while no write, zero or trim is changing the store and no
// header is being rewritten: the store then holds exactly the writes
// acknowledged before Barrier was called, plus any that were admitted and
// finished while it waited. Reads keep flowing. Writes arriving meanwhile
// wait until fn returns, so fn should be quick (a reflink, a file copy).
func (d *Disk) Barrier(fn func() error) error {
	d.hmu.Lock()
	defer d.hmu.Unlock()
	d.wmu.Lock()
	defer d.wmu.Unlock()
	return fn()
}

func wipe(b []byte) { clear(b) }

// storeIO adapts a Storage to io.ReaderAt and io.WriterAt for the header code.
type storeIO struct {
	ctx context.Context
	s   Storage
}

func (a storeIO) ReadAt(p []byte, off int64) (int, error) {
	if err := a.s.ReadAt(a.ctx, p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (a storeIO) WriteAt(p []byte, off int64) (int, error) {
	if err := a.s.WriteAt(a.ctx, p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Shred crypto-shreds an image: both header copies and the whole keyslot
// area are overwritten with random bytes and synced. Without them no key,
// wrapped or not, opens the data region, even from a backup copy of it.
// The disk must not be open.
func Shred(ctx context.Context, store Storage) error {
	rw := storeIO{ctx, store}
	hdr, err := luks2.Read(rw)
	if err != nil {
		return fmt.Errorf("cryptodisk: shred: %w", err)
	}
	if err := luks2.Wipe(rw, hdr, func() error { return store.Sync(ctx) }); err != nil {
		return fmt.Errorf("cryptodisk: shred: %w", err)
	}
	return nil
}
