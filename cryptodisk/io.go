package cryptodisk

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"syscall"
	"unsafe"
)

// ReadAt decrypts len(p) bytes from off into p. Sectors whose ciphertext is
// all zeros read as zeros (see the package doc).
func (d *Disk) ReadAt(ctx context.Context, p []byte, off int64) error {
	return d.readAt(ctx, p, off, false)
}

// TryReadAt is ReadAt for a caller that must not wait. Where the read would
// have to wait, for a suspended key, a stripe held by a read-modify-write or
// the store's device, it returns false at once, holding nothing, and the
// caller uses ReadAt; p's contents are then undefined. With true, the error
// is the read's own.
func (d *Disk) TryReadAt(ctx context.Context, p []byte, off int64) (bool, error) {
	if d.noWait == nil {
		return false, nil
	}
	return tried(d.readAt(ctx, p, off, true))
}

// errWouldWait stops a no-wait request that met something it would have to
// wait for; tried turns it into the Try methods' false, so it never leaves
// the package.
var errWouldWait = errors.New("cryptodisk: request would wait")

func tried(err error) (bool, error) {
	if err == errWouldWait {
		return false, nil
	}
	return true, err
}

// readAt is ReadAt, and with noWait TryReadAt up to tried.
func (d *Disk) readAt(ctx context.Context, p []byte, off int64, noWait bool) error {
	if err := d.checkRange(off, int64(len(p)), syscall.EINVAL); err != nil {
		return err
	}
	c, err := d.pass(ctx, noWait)
	if err != nil {
		return err
	}
	defer d.gmu.RUnlock()
	ss := d.sectorSize
	end := off + int64(len(p))
	if end == off {
		return nil
	}
	// A shared hold on the stripes keeps a partial-sector read-modify-write
	// of another request out of these sectors while they are read: a store
	// need not make a read atomic against a concurrent write, and a sector
	// caught half-written from a hole would decrypt to garbage, even in
	// bytes the writer did not touch.
	locks, ok := d.lockRange(off/ss, (end-1)/ss, false, false, noWait)
	if !ok {
		return errWouldWait
	}
	defer locks.unlock()
	// Head and tail sectors only partly wanted go through a bounce buffer;
	// the aligned body is decrypted into p, from p itself after a read or
	// straight from pages the store lends.
	for off < end {
		sector := off / ss
		inner := off % ss
		if inner != 0 || end-off < ss {
			n := min(ss-inner, end-off)
			bp := d.sectorBufs.Get().(*[]byte)
			buf := (*bp)[:ss]
			err := d.readSectors(ctx, c, buf, sector, noWait)
			if err == nil {
				copy(p[:n], buf[inner:])
			}
			d.sectorBufs.Put(bp)
			if err != nil {
				return err
			}
			p, off = p[n:], off+n
			continue
		}
		n := (end - off) / ss * ss
		if err := d.readSectors(ctx, c, p[:n], sector, noWait); err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

// pass takes the gate for a request: enter, or with noWait tryEnter, which
// fails with errWouldWait.
func (d *Disk) pass(ctx context.Context, noWait bool) (SectorCipher, error) {
	if !noWait {
		return d.enter(ctx)
	}
	if c := d.tryEnter(); c != nil {
		return c, nil
	}
	return nil, errWouldWait
}

// readSectors reads whole sectors starting at sector and decrypts them into
// buf, leaving all-zero ciphertext sectors as zeros. Where the store lends
// the ciphertext in place, the cipher reads it there and no copy is made.
// With noWait it reads only what the store has in memory, and returns
// errWouldWait where the store would have to wait.
func (d *Disk) readSectors(ctx context.Context, c SectorCipher, buf []byte, sector int64, noWait bool) error {
	off := d.dataOff + sector*d.sectorSize
	if d.lender != nil {
		if src := d.lender.Lend(off, len(buf), false); src != nil {
			err := d.decryptLent(c, buf, src, sector)
			d.lender.Unlend()
			if err != nil {
				return fmt.Errorf("cryptodisk: read sector %d: %w", sector, err)
			}
			return nil
		}
	}
	var err error
	if noWait {
		err = d.noWait.ReadAtNoWait(ctx, buf, off)
	} else {
		err = d.store.ReadAt(ctx, buf, off)
	}
	if err != nil {
		if noWait && errors.Is(err, syscall.EAGAIN) {
			return errWouldWait
		}
		return fmt.Errorf("cryptodisk: read sector %d: %w", sector, err)
	}
	d.decryptRuns(c, buf, buf, sector)
	return nil
}

// decryptRuns decrypts whole sectors of src into dst (the same slice, or
// one that does not overlap it). Runs of written sectors go to the cipher
// in one call each, so it sees long inputs it can pipeline; all-zero
// ciphertext sectors become zeros.
func (d *Disk) decryptRuns(c SectorCipher, dst, src []byte, sector int64) {
	ss := int(d.sectorSize)
	inPlace := &dst[0] == &src[0]
	runStart := -1
	for i := 0; i <= len(src); i += ss {
		written := i < len(src) && !allZero(src[i:i+ss])
		if !written && i < len(src) && !inPlace {
			clear(dst[i : i+ss])
		}
		if written && runStart < 0 {
			runStart = i
		}
		if !written && runStart >= 0 {
			first := uint64(sector+int64(runStart/ss)) * d.tweakStep
			c.DecryptSectors(dst[runStart:i], src[runStart:i], ss, first, d.tweakStep)
			runStart = -1
		}
	}
}

// decryptLent is decryptRuns from memory the store lent. That memory is a
// file mapping, which faults if the file shrinks under it; the fault is
// this request's I/O error, not the daemon's crash.
func (d *Disk) decryptLent(c SectorCipher, dst, lent []byte, sector int64) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = lentFault(r, lent)
		}
	}()
	d.decryptRuns(c, dst, lent, sector)
	return nil
}

// encryptLent encrypts whole sectors of src into memory the store lent;
// see decryptLent.
func (d *Disk) encryptLent(c SectorCipher, lent, src []byte, sector int64) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = lentFault(r, lent)
		}
	}()
	c.EncryptSectors(lent, src, int(d.sectorSize), uint64(sector)*d.tweakStep, d.tweakStep)
	return nil
}

// lentFault turns a recovered memory fault inside lent into EIO, and
// re-raises anything else: a fault elsewhere is a bug, not a store error.
func lentFault(r any, lent []byte) error {
	if f, ok := r.(interface{ Addr() uintptr }); ok {
		lo := uintptr(unsafe.Pointer(unsafe.SliceData(lent)))
		if a := f.Addr(); a >= lo && a < lo+uintptr(len(lent)) {
			return fmt.Errorf("memory fault in the store's mapping at byte %d of %d: %w", a-lo, len(lent), syscall.EIO)
		}
	}
	panic(r)
}

// WriteAt encrypts p and writes it at off. p may be left holding its
// ciphertext (or unchanged, where the store lent its pages), so the caller
// must not use its contents afterwards.
func (d *Disk) WriteAt(ctx context.Context, p []byte, off int64) error {
	return d.writeAt(ctx, p, off, false)
}

// TryWriteAt is WriteAt for a caller that must not wait. It takes writes of
// whole sectors to a store held in memory, and declines any other, or one
// that would wait for a suspended key, the write barrier or a stripe: it
// then returns false at once, having written nothing and left p as it was,
// and the caller uses WriteAt. With true, the error is the write's own.
func (d *Disk) TryWriteAt(ctx context.Context, p []byte, off int64) (bool, error) {
	if !d.noWaitWrites || off%d.sectorSize != 0 || int64(len(p))%d.sectorSize != 0 {
		return false, nil
	}
	return tried(d.writeAt(ctx, p, off, true))
}

// writeAt is WriteAt, and with noWait TryWriteAt up to tried.
func (d *Disk) writeAt(ctx context.Context, p []byte, off int64, noWait bool) error {
	if err := d.checkRange(off, int64(len(p)), syscall.ENOSPC); err != nil {
		return err
	}
	if len(p) == 0 {
		// write would take an unaligned empty range for a partial sector
		// and, with p nil, zero the rest of it.
		return nil
	}
	c, err := d.pass(ctx, noWait)
	if err != nil {
		return err
	}
	defer d.gmu.RUnlock()
	if !noWait {
		d.wmu.RLock()
	} else if !d.wmu.TryRLock() {
		return errWouldWait
	}
	defer d.wmu.RUnlock()
	if err := d.write(ctx, c, p, off, noWait); err != nil {
		return err
	}
	// Counted while the gate is still held: Suspend cannot complete between
	// the write and the count, so a suspended disk's count stands still.
	d.writes.Add(1)
	return nil
}

// write stores plaintext p at off. Partial head and tail sectors are read,
// patched and rewritten under an exclusive stripe lock, whole ones under a
// shared one (see lockRange). Whole sectors are encrypted straight into the
// store's pages where it lends them, or in place in p and then written.
// With noWait (whole sectors only) it returns errWouldWait, having done
// nothing, where it would wait for a stripe.
func (d *Disk) write(ctx context.Context, c SectorCipher, p []byte, off int64, noWait bool) error {
	ss := d.sectorSize
	end := off + int64(len(p))
	first, last := off/ss, (end-1)/ss
	headPartial := off%ss != 0
	tailPartial := end%ss != 0
	bodyStart := (off + ss - 1) / ss * ss
	bodyEnd := end / ss * ss
	locks, ok := d.lockRange(first, last, headPartial, tailPartial, noWait)
	if !ok {
		return errWouldWait
	}
	defer locks.unlock()
	if headPartial {
		n := min(ss-off%ss, end-off)
		if err := d.patchSector(ctx, c, first, off%ss, p[:n]); err != nil {
			return err
		}
	}
	if tailPartial && (last != first || !headPartial) {
		n := end % ss
		if err := d.patchSector(ctx, c, last, 0, p[len(p)-int(n):]); err != nil {
			return err
		}
	}
	if bodyEnd <= bodyStart {
		return nil
	}
	body := p[bodyStart-off : bodyEnd-off]
	if d.lender != nil {
		if dst := d.lender.Lend(d.dataOff+bodyStart, len(body), true); dst != nil {
			err := d.encryptLent(c, dst, body, bodyStart/ss)
			d.lender.Unlend()
			if err != nil {
				return fmt.Errorf("cryptodisk: write at %d: %w", bodyStart, err)
			}
			return nil
		}
	}
	c.EncryptSectors(body, body, int(ss), uint64(bodyStart/ss)*d.tweakStep, d.tweakStep)
	if err := d.store.WriteAt(ctx, body, d.dataOff+bodyStart); err != nil {
		return fmt.Errorf("cryptodisk: write at %d: %w", bodyStart, err)
	}
	return nil
}

// patchSector is the read-modify-write of one partial sector. The caller
// holds the sector's stripe exclusively.
func (d *Disk) patchSector(ctx context.Context, c SectorCipher, sector, inner int64, data []byte) error {
	bp := d.sectorBufs.Get().(*[]byte)
	defer d.sectorBufs.Put(bp)
	buf := (*bp)[:d.sectorSize]
	if err := d.readSectors(ctx, c, buf, sector, false); err != nil {
		return err
	}
	if data == nil {
		clear(buf[inner:])
	} else {
		copy(buf[inner:], data)
	}
	c.EncryptSectors(buf, buf, int(d.sectorSize), uint64(sector)*d.tweakStep, d.tweakStep)
	if err := d.store.WriteAt(ctx, buf, d.dataOff+sector*d.sectorSize); err != nil {
		return fmt.Errorf("cryptodisk: write sector %d: %w", sector, err)
	}
	return nil
}

// lockRange locks the stripes of sectors first..last: exclusively for a
// partial head or tail sector (its read-modify-write must not interleave
// with any other write to that sector, or bytes outside either write would
// be lost, nor with a read of it), shared for whole sectors and reads.
// Stripes are taken in index order, so two writers cannot deadlock. With
// try it takes them only if none is held against it, and otherwise returns
// false holding none. The result is a value, not a closure, so that
// locking allocates nothing.
func (d *Disk) lockRange(first, last int64, headPartial, tailPartial, try bool) (stripeLock, bool) {
	l := stripeLock{d: d, lo: 0, hi: nStripes - 1, head: -1, tail: -1}
	if last-first+1 < nStripes {
		l.lo, l.hi = int(first%nStripes), int(last%nStripes)
	}
	if headPartial {
		l.head = int(first % nStripes)
	}
	if tailPartial {
		l.tail = int(last % nStripes)
	}
	if l.lo <= l.hi {
		return l, l.lock(l.lo, l.hi, try)
	}
	// The range wraps around the stripes.
	if !l.lock(0, l.hi, try) {
		return l, false
	}
	if !l.lock(l.lo, nStripes-1, try) {
		l.release(0, l.hi)
		return l, false
	}
	return l, true
}

// stripeLock is the set of stripes one request holds: lo..hi, or 0..hi and
// lo..nStripes-1 when lo > hi; head and tail (-1 for none) exclusively.
type stripeLock struct {
	d          *Disk
	lo, hi     int
	head, tail int
}

// lock takes stripes from..to, or with try gives back what it took and
// returns false at the first one held against it.
func (l *stripeLock) lock(from, to int, try bool) bool {
	for i := from; i <= to; i++ {
		s := &l.d.stripes[i]
		excl := i == l.head || i == l.tail
		switch {
		case !try && excl:
			s.Lock()
		case !try:
			s.RLock()
		case excl && !s.TryLock(), !excl && !s.TryRLock():
			l.release(from, i-1)
			return false
		}
	}
	return true
}

func (l *stripeLock) release(from, to int) {
	for i := from; i <= to; i++ {
		if i == l.head || i == l.tail {
			l.d.stripes[i].Unlock()
		} else {
			l.d.stripes[i].RUnlock()
		}
	}
}

func (l *stripeLock) unlock() {
	if l.lo <= l.hi {
		l.release(l.lo, l.hi)
	} else {
		l.release(0, l.hi)
		l.release(l.lo, nStripes-1)
	}
}

// Flush makes every completed write durable. It does not need the key, so
// it is answered even while the disk is suspended.
func (d *Disk) Flush(ctx context.Context) error {
	d.gmu.RLock()
	defer d.gmu.RUnlock()
	if d.state == StateClosed {
		return fmt.Errorf("%w: %w", ErrClosed, syscall.ESHUTDOWN)
	}
	if err := d.store.Sync(ctx); err != nil {
		return fmt.Errorf("cryptodisk: flush: %w", err)
	}
	return nil
}

// Trim releases the range; it reads back as zeros.
func (d *Disk) Trim(ctx context.Context, off, length int64) error {
	return d.Zero(ctx, off, length, false, false)
}

// Zero makes the range read as zeros. Whole sectors become holes unless
// noHole, in which case encrypted zeros are written; partial sectors at the
// edges are zeroed by read-modify-write. With fast and noHole it returns
// ENOTSUP, since writing encrypted zeros is no faster than a WRITE.
func (d *Disk) Zero(ctx context.Context, off, length int64, noHole, fast bool) error {
	if err := d.checkRange(off, length, syscall.ENOSPC); err != nil {
		return err
	}
	if fast && noHole {
		return fmt.Errorf("cryptodisk: zeroing without holes is not fast: %w", syscall.ENOTSUP)
	}
	if length == 0 {
		return nil
	}
	c, err := d.enter(ctx)
	if err != nil {
		return err
	}
	defer d.gmu.RUnlock()
	d.wmu.RLock()
	defer d.wmu.RUnlock()
	ss := d.sectorSize
	end := off + length
	bodyStart := (off + ss - 1) / ss * ss
	bodyEnd := end / ss * ss
	if bodyEnd <= bodyStart { // within one or two partial sectors
		return d.zeroPartial(ctx, c, off, end)
	}
	if off < bodyStart {
		if err := d.zeroPartial(ctx, c, off, bodyStart); err != nil {
			return err
		}
	}
	if end > bodyEnd {
		if err := d.zeroPartial(ctx, c, bodyEnd, end); err != nil {
			return err
		}
	}
	// Whole sectors are written (or punched) under a shared hold like any
	// whole-sector write, so a read-modify-write of one of them cannot
	// straddle it and bring old bytes back.
	locks, _ := d.lockRange(bodyStart/ss, bodyEnd/ss-1, false, false, false)
	defer locks.unlock()
	if noHole {
		return d.writeZeros(ctx, c, bodyStart, bodyEnd)
	}
	if err := d.store.Punch(ctx, d.dataOff+bodyStart, bodyEnd-bodyStart); err != nil {
		return fmt.Errorf("cryptodisk: zero at %d: %w", bodyStart, err)
	}
	d.writes.Add(1)
	return nil
}

// zeroPartial zeroes [off, end), which lies within at most two sectors
// that are not wholly covered.
func (d *Disk) zeroPartial(ctx context.Context, c SectorCipher, off, end int64) error {
	ss := d.sectorSize
	for off < end {
		sector := off / ss
		n := min(ss-off%ss, end-off)
		locks, _ := d.lockRange(sector, sector, true, true, false)
		var err error
		if n == ss {
			err = d.writeZeros(ctx, c, off, off+n)
		} else {
			err = d.patchZero(ctx, c, sector, off%ss, n)
		}
		locks.unlock()
		if err != nil {
			return err
		}
		off += n
	}
	return nil
}

func (d *Disk) patchZero(ctx context.Context, c SectorCipher, sector, inner, n int64) error {
	bp := d.sectorBufs.Get().(*[]byte)
	defer d.sectorBufs.Put(bp)
	zero := (*bp)[:n]
	clear(zero)
	return d.patchSector(ctx, c, sector, inner, zero)
}

// writeZeros writes encrypted zeros over whole sectors [start, end).
func (d *Disk) writeZeros(ctx context.Context, c SectorCipher, start, end int64) error {
	bp := d.bufs.Get().(*[]byte)
	defer d.bufs.Put(bp)
	ss := d.sectorSize
	for start < end {
		n := min(int64(len(*bp)), end-start)
		buf := (*bp)[:n]
		clear(buf)
		c.EncryptSectors(buf, buf, int(ss), uint64(start/ss)*d.tweakStep, d.tweakStep)
		if err := d.store.WriteAt(ctx, buf, d.dataOff+start); err != nil {
			return fmt.Errorf("cryptodisk: zero at %d: %w", start, err)
		}
		start += n
	}
	return nil
}

// Cache is accepted and ignored: reads are served from the page cache of
// the store anyway, and decrypting ahead would only spend CPU.
func (d *Disk) Cache(ctx context.Context, off, length int64) error {
	return d.checkRange(off, length, syscall.EINVAL)
}

// Extents reports holes in the store as holes of the disk.
func (d *Disk) Extents(ctx context.Context, off, length int64, fn func(length int64, hole bool) bool) error {
	if err := d.checkRange(off, length, syscall.EINVAL); err != nil {
		return err
	}
	err := d.store.Allocated(ctx, d.dataOff+off, length, func(n int64, allocated bool) bool {
		return fn(n, !allocated)
	})
	if err != nil {
		return fmt.Errorf("cryptodisk: extents: %w", err)
	}
	return nil
}

func (d *Disk) checkRange(off, length int64, errno syscall.Errno) error {
	if off < 0 || length < 0 || off+length > d.size.Load() || off+length < off {
		return fmt.Errorf("cryptodisk: [%d,+%d) is outside the %d-byte disk: %w", off, length, d.size.Load(), errno)
	}
	return nil
}

// allZero reports whether b is all zero bytes, eight at a time.
func allZero(b []byte) bool {
	for len(b) >= 64 {
		var acc uint64
		for i := 0; i < 64; i += 8 {
			acc |= uint64(b[i]) | uint64(b[i+1])<<8 | uint64(b[i+2])<<16 | uint64(b[i+3])<<24 |
				uint64(b[i+4])<<32 | uint64(b[i+5])<<40 | uint64(b[i+6])<<48 | uint64(b[i+7])<<56
		}
		if acc != 0 {
			return false
		}
		b = b[64:]
	}
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}
