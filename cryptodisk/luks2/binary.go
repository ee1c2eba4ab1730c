package luks2

import (
	"bytes"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
)

// Layout of the 4096-byte binary header (struct luks2_hdr_disk in
// cryptsetup's lib/luks2/luks2.h). All integers are big-endian; strings are
// NUL-terminated within their fields.
const (
	binHeaderSize = 4096

	offMagic     = 0   // 6 bytes
	offVersion   = 6   // uint16
	offHdrSize   = 8   // uint64, binary header + JSON area
	offSeqID     = 16  // uint64
	offLabel     = 24  // 48 bytes
	offCsumAlg   = 72  // 32 bytes
	offSalt      = 104 // 64 bytes
	offUUID      = 168 // 40 bytes
	offSubsystem = 208 // 48 bytes
	offHdrOffset = 256 // uint64, offset of this copy from the device start
	offCsum      = 448 // 64 bytes

	labelLen   = 48
	csumAlgLen = 32
	saltLen    = 64
	uuidLen    = 40
	csumLen    = 64

	// defaultMetadataSize is the size of one metadata copy (binary header
	// plus JSON area) cryptsetup uses by default.
	defaultMetadataSize = 16384
	// maxMetadataSize is LUKS2_HDR_OFFSET_MAX.
	maxMetadataSize = 4 << 20
)

var (
	magicPrimary   = []byte("LUKS\xba\xbe")
	magicSecondary = []byte("SKUL\xba\xbe")
)

// secondaryOffsets are the offsets at which a secondary header may sit; they
// are also the only valid metadata sizes (LUKS2_HDR2_OFFSETS).
var secondaryOffsets = []int64{
	0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000,
}

func validMetadataSize(n int64) bool {
	for _, o := range secondaryOffsets {
		if n == o {
			return true
		}
	}
	return false
}

// binHeader is the decoded binary header of one metadata copy.
type binHeader struct {
	hdrSize   int64
	seqID     uint64
	label     string
	csumAlg   string
	salt      [saltLen]byte
	uuid      string
	subsystem string
}

// errNoMagic means a copy does not start with the LUKS2 magic at all, as
// opposed to a copy that has it but is damaged.
var errNoMagic = errors.New("no LUKS2 magic")

func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

func newHash(name string) (func() hash.Hash, bool) {
	switch name {
	case "sha1":
		return sha1.New, true
	case "sha224":
		return sha256.New224, true
	case "sha256":
		return sha256.New, true
	case "sha384":
		return sha512.New384, true
	case "sha512":
		return sha512.New, true
	}
	return nil, false
}

// checksum computes the header checksum over the binary header with its
// checksum field zeroed, followed by the whole JSON area.
func checksum(newH func() hash.Hash, bin, jsonArea []byte) []byte {
	h := newH()
	var zero [csumLen]byte
	h.Write(bin[:offCsum])
	h.Write(zero[:])
	h.Write(bin[offCsum+csumLen:])
	h.Write(jsonArea)
	return h.Sum(nil)
}

// readCopy reads and checks the metadata copy at off: magic, version,
// offsets, size and checksum. It returns the binary header and the JSON area.
// A copy that cannot be read because the device is too short is reported as
// errNoMagic; other I/O errors are returned as they are.
func readCopy(r io.ReaderAt, off int64, secondary bool) (*binHeader, []byte, error) {
	bin := make([]byte, binHeaderSize)
	if err := readFull(r, bin, off); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, nil, errNoMagic
		}
		return nil, nil, err
	}
	magic := magicPrimary
	if secondary {
		magic = magicSecondary
	}
	if !bytes.Equal(bin[offMagic:offMagic+len(magic)], magic) {
		return nil, nil, errNoMagic
	}
	if v := binary.BigEndian.Uint16(bin[offVersion:]); v != 2 {
		return nil, nil, formatErrorf("unsupported version %d", v)
	}
	if ho := binary.BigEndian.Uint64(bin[offHdrOffset:]); ho != uint64(off) {
		return nil, nil, formatErrorf("header offset %d, found at %d", ho, off)
	}
	size := binary.BigEndian.Uint64(bin[offHdrSize:])
	if !validMetadataSize(int64(min(size, maxMetadataSize+1))) {
		return nil, nil, formatErrorf("bad metadata size %d", size)
	}
	if secondary && size != uint64(off) {
		return nil, nil, formatErrorf("secondary header size %d, found at %d", size, off)
	}
	h := &binHeader{
		hdrSize:   int64(size),
		seqID:     binary.BigEndian.Uint64(bin[offSeqID:]),
		label:     cString(bin[offLabel : offLabel+labelLen]),
		csumAlg:   cString(bin[offCsumAlg : offCsumAlg+csumAlgLen]),
		uuid:      cString(bin[offUUID : offUUID+uuidLen]),
		subsystem: cString(bin[offSubsystem : offSubsystem+labelLen]),
	}
	copy(h.salt[:], bin[offSalt:])
	newH, ok := newHash(h.csumAlg)
	if !ok {
		return nil, nil, formatErrorf("unsupported checksum algorithm %q", h.csumAlg)
	}
	jsonArea := make([]byte, h.hdrSize-binHeaderSize)
	if err := readFull(r, jsonArea, off+binHeaderSize); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, nil, formatErrorf("truncated JSON area: %w", err)
		}
		return nil, nil, err
	}
	sum := checksum(newH, bin, jsonArea)
	if subtle.ConstantTimeCompare(sum, bin[offCsum:offCsum+len(sum)]) != 1 {
		return nil, nil, formatErrorf("checksum mismatch")
	}
	return h, jsonArea, nil
}

// encodeCopy lays out one metadata copy (binary header, JSON, zero padding)
// with its checksum.
func encodeCopy(h *binHeader, jsonText []byte, secondary bool) ([]byte, error) {
	newH, ok := newHash(h.csumAlg)
	if !ok {
		return nil, fmt.Errorf("unsupported checksum algorithm %q", h.csumAlg)
	}
	if int64(len(jsonText)) > h.hdrSize-binHeaderSize-1 {
		return nil, fmt.Errorf("JSON metadata is %d bytes, the area holds %d: %w",
			len(jsonText), h.hdrSize-binHeaderSize-1, ErrNoSpace)
	}
	buf := make([]byte, h.hdrSize)
	bin := buf[:binHeaderSize]
	off := int64(0)
	if secondary {
		copy(bin[offMagic:], magicSecondary)
		off = h.hdrSize
	} else {
		copy(bin[offMagic:], magicPrimary)
	}
	binary.BigEndian.PutUint16(bin[offVersion:], 2)
	binary.BigEndian.PutUint64(bin[offHdrSize:], uint64(h.hdrSize))
	binary.BigEndian.PutUint64(bin[offSeqID:], h.seqID)
	copy(bin[offLabel:offLabel+labelLen-1], h.label)
	copy(bin[offCsumAlg:offCsumAlg+csumAlgLen-1], h.csumAlg)
	copy(bin[offSalt:offSalt+saltLen], h.salt[:])
	copy(bin[offUUID:offUUID+uuidLen-1], h.uuid)
	copy(bin[offSubsystem:offSubsystem+labelLen-1], h.subsystem)
	binary.BigEndian.PutUint64(bin[offHdrOffset:], uint64(off))
	jsonArea := buf[binHeaderSize:]
	copy(jsonArea, jsonText)
	copy(bin[offCsum:], checksum(newH, bin, jsonArea))
	return buf, nil
}

// readFull reads len(p) bytes at off. A short read is io.ErrUnexpectedEOF
// (or io.EOF when nothing was read).
func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	if errors.Is(err, io.EOF) && n > 0 {
		err = io.ErrUnexpectedEOF
	}
	return err
}

func formatErrorf(format string, a ...any) error {
	return formatError{fmt.Errorf(format, a...)}
}
