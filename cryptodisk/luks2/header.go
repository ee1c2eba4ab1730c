package luks2

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
)

var (
	// ErrNoHeader means neither metadata copy carries the LUKS2 magic: the
	// device holds no LUKS2 header (or it was wiped).
	ErrNoHeader = errors.New("luks2: no LUKS2 header")
	// ErrCorrupt means a LUKS2 magic was found but no copy of the metadata
	// is valid (bad checksum, bad JSON, failed validation).
	ErrCorrupt = errors.New("luks2: corrupt header")
	// ErrUnsupported means the header is valid LUKS2 but uses a feature this
	// package does not implement (reencryption, several or fixed-size
	// segments, integrity, a keyslot KDF or cipher it lacks, ...).
	ErrUnsupported = errors.New("luks2: unsupported header feature")
	// ErrWrongPassphrase means no keyslot opened with the passphrase.
	ErrWrongPassphrase = errors.New("luks2: wrong passphrase")
	// ErrNoSpace means the JSON metadata no longer fits its area.
	ErrNoSpace = errors.New("luks2: no space in JSON area")
)

// Header is a parsed and validated LUKS2 header. It holds no key material.
//
// The accessors and Unlock only read the Header and may run concurrently.
// SetToken, RemoveToken and Write modify it and need exclusive access; the
// caller also serialises Writes to one device (there is no on-disk lock).
type Header struct {
	bin   binHeader        // fields of the binary header; bin.salt is unused
	salts [2][saltLen]byte // per-copy salts, primary then secondary
	md    *metadata

	// current[i] reports whether copy i (0 primary, 1 secondary) is known
	// to hold this header's latest committed state. Write updates first a
	// copy that is not current, so that a crash never rolls back past a
	// committed state.
	current [2]bool
}

type copyState struct {
	bin  *binHeader
	md   *metadata
	err  error // nil, or wraps ErrUnsupported for a usable-but-unsupported copy
	seen bool  // the magic was there
}

func (c copyState) ok() bool {
	return c.bin != nil && (c.err == nil || errors.Is(c.err, ErrUnsupported))
}

func readState(r io.ReaderAt, off int64, secondary bool) (copyState, error) {
	bin, area, err := readCopy(r, off, secondary)
	switch {
	case errors.Is(err, errNoMagic):
		return copyState{}, nil
	case err != nil && !isFormatError(err):
		return copyState{}, err // I/O error
	case err != nil:
		return copyState{seen: true, err: err}, nil
	}
	md, err := parseMetadata(area, bin.hdrSize)
	if err != nil && !errors.Is(err, ErrUnsupported) {
		return copyState{seen: true, err: err}, nil
	}
	return copyState{seen: true, bin: bin, md: md, err: err}, nil
}

// formatError marks errors that describe bad content, as opposed to I/O.
type formatError struct{ error }

func (e formatError) Unwrap() error { return e.error }

func isFormatError(err error) bool {
	var fe formatError
	return errors.As(err, &fe)
}

// Read parses both metadata copies from r and returns the valid one with the
// highest seqid; a copy that is torn or corrupt is ignored. If the primary
// copy is unusable, the secondary is searched at every offset cryptsetup
// allows. Errors: ErrNoHeader if no copy has the LUKS2 magic, ErrCorrupt if
// none is valid, ErrUnsupported if the newest valid copy uses a feature this
// package lacks; an I/O error from r is returned wrapped.
func Read(r io.ReaderAt) (*Header, error) {
	p, err := readState(r, 0, false)
	if err != nil {
		return nil, fmt.Errorf("luks2: read primary header: %w", err)
	}
	var s copyState
	if p.ok() {
		s, err = readState(r, p.bin.hdrSize, true)
		if err != nil {
			return nil, fmt.Errorf("luks2: read secondary header: %w", err)
		}
	} else {
		for _, off := range secondaryOffsets {
			c, err := readState(r, off, true)
			if err != nil {
				return nil, fmt.Errorf("luks2: read secondary header: %w", err)
			}
			if c.seen {
				s = c
			}
			if c.ok() {
				break
			}
		}
	}
	var h *Header
	var chosen copyState
	switch {
	case p.ok() && (!s.ok() || p.bin.seqID >= s.bin.seqID):
		chosen = p
		h = newHeader(p, s)
		h.current = [2]bool{true, s.ok() && s.bin.seqID == p.bin.seqID}
	case s.ok():
		chosen = s
		h = newHeader(s, p)
		h.salts[0], h.salts[1] = h.salts[1], h.salts[0]
		h.current = [2]bool{p.ok() && p.bin.seqID == s.bin.seqID, true}
	case p.seen || s.seen:
		return nil, fmt.Errorf("%w: primary: %s; secondary: %s", ErrCorrupt, describe(p), describe(s))
	default:
		return nil, ErrNoHeader
	}
	if chosen.err != nil {
		return nil, fmt.Errorf("luks2: %w", chosen.err)
	}
	return h, nil
}

func describe(c copyState) string {
	switch {
	case !c.seen:
		return "no magic"
	case c.err != nil:
		return c.err.Error()
	}
	return "valid"
}

// newHeader builds a Header from the chosen copy c; other supplies the other
// copy's salt when it has one.
func newHeader(c, other copyState) *Header {
	h := &Header{bin: *c.bin, md: c.md}
	h.salts[0] = c.bin.salt
	if other.bin != nil {
		h.salts[1] = other.bin.salt
	} else {
		// Derive a distinct salt for the copy that has none; the salt has
		// no cryptographic role, it only makes the two copies differ.
		h.salts[1] = c.bin.salt
		h.salts[1][0] ^= 0xff
	}
	return h
}

// UUID returns the header's UUID, as stored (normally lower case).
func (h *Header) UUID() string { return h.bin.uuid }

// Label returns the header's label, "" if none.
func (h *Header) Label() string { return h.bin.label }

// SeqID returns the header's sequence number; every Write increases it.
func (h *Header) SeqID() uint64 { return h.bin.seqID }

// SectorSize returns the data segment's encryption sector size in bytes.
func (h *Header) SectorSize() int { return int(*h.md.segments[0].SectorSize) }

// DataOffset returns the byte offset of the data segment from the start of
// the device. The data segment extends to the end of the device, and its
// IV (tweak) counts 512-byte units from this offset.
func (h *Header) DataOffset() int64 { return int64(h.md.segments[0].offset) }

// Cipher returns the data segment's cipher spec, such as "aes-xts-plain64".
func (h *Header) Cipher() string { return h.md.segments[0].Encryption }

// KeySize returns the volume key size in bytes, as recorded by the keyslots
// bound to the data segment, or 0 if there is no such keyslot.
func (h *Header) KeySize() int {
	for _, ks := range h.segmentKeyslots() {
		return int(*h.md.keyslots[ks].KeySize)
	}
	return 0
}

// Tokens returns a copy of the header's tokens by ID. The caller owns the
// returned map and slices.
func (h *Header) Tokens() map[int]json.RawMessage {
	out := make(map[int]json.RawMessage, len(h.md.tokens))
	for id, t := range h.md.tokens {
		out[id] = slices.Clone(t)
	}
	return out
}

// SetToken sets token id (0 to 31) to tok, a JSON object with a non-empty
// "type" string and a "keyslots" array naming existing keyslots, like
// cryptsetup requires. Other fields are free. The change reaches the device
// at the next Write. tok is copied.
func (h *Header) SetToken(id int, tok json.RawMessage) error {
	if id < 0 || id >= maxObjects {
		return fmt.Errorf("luks2: token ID %d out of range", id)
	}
	if err := validateToken(tok, h.md.keyslots); err != nil {
		return fmt.Errorf("luks2: token %d: %w", id, err)
	}
	var b bytes.Buffer
	if err := json.Compact(&b, tok); err != nil {
		return fmt.Errorf("luks2: token %d: %w", id, err)
	}
	old, had := h.md.tokens[id]
	h.md.tokens[id] = b.Bytes()
	text, err := h.md.encode()
	if err == nil && int64(len(text)) > h.bin.hdrSize-binHeaderSize-1 {
		err = fmt.Errorf("JSON metadata would be %d bytes: %w", len(text), ErrNoSpace)
	}
	if err != nil {
		if had {
			h.md.tokens[id] = old
		} else {
			delete(h.md.tokens, id)
		}
		return fmt.Errorf("luks2: token %d: %w", id, err)
	}
	return nil
}

// RemoveToken removes token id, if present. The change reaches the device
// at the next Write.
func (h *Header) RemoveToken(id int) { delete(h.md.tokens, id) }

// Write stores the header with its seqid increased by one in both metadata
// copies. It writes one copy, calls sync, writes the other and calls sync
// again, choosing the order so that a crash at any point leaves a device
// from which Read returns either the previous or the new header. sync may
// be nil. After an error the Header remains usable and a later Write
// (with a yet higher seqid) repairs both copies.
func (h *Header) Write(w io.WriterAt, sync func() error) error {
	if sync == nil {
		sync = func() error { return nil }
	}
	text, err := h.md.encode()
	if err != nil {
		return fmt.Errorf("luks2: encode metadata: %w", err)
	}
	h.bin.seqID++
	var copies [2][]byte
	for i := range copies {
		b := h.bin
		b.salt = h.salts[i]
		if copies[i], err = encodeCopy(&b, text, i == 1); err != nil {
			return fmt.Errorf("luks2: %w", err)
		}
	}
	order := []int{0, 1}
	if h.current[0] && !h.current[1] {
		order = []int{1, 0}
	}
	for _, i := range order {
		off := int64(0)
		if i == 1 {
			off = h.bin.hdrSize
		}
		h.current[i] = false
		if _, err := w.WriteAt(copies[i], off); err != nil {
			return fmt.Errorf("luks2: write header copy at %d: %w", off, err)
		}
		if err := sync(); err != nil {
			return fmt.Errorf("luks2: sync header copy at %d: %w", off, err)
		}
		h.current[i] = true
		h.current[1-i] = false
	}
	h.current = [2]bool{true, true}
	return nil
}

// segmentKeyslots returns the keyslots bound through a digest to the data
// segment, in increasing order.
func (h *Header) segmentKeyslots() []int {
	var ids []int
	for _, d := range h.md.segmentDigests(0) {
		for _, s := range h.md.digests[d].Keyslots {
			id, _ := parseID(s) // validated by parseMetadata
			if !slices.Contains(ids, id) {
				ids = append(ids, id)
			}
		}
	}
	slices.Sort(ids)
	return ids
}
