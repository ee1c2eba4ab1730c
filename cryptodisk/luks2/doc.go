// Package luks2 reads and writes the LUKS2 on-disk format, as specified by
// cryptsetup's "LUKS2 On-Disk Format Specification" and implemented by
// cryptsetup 2.x: the two metadata copies (a 4096-byte binary header followed
// by a JSON area, checksummed with SHA-256), the keyslots area, and the JSON
// objects describing keyslots, segments, digests, tokens and config.
//
// The package is pure format code. It does no I/O of its own: callers pass
// an io.ReaderAt or io.WriterAt (and a sync function where ordering
// matters). It does not encrypt the data region and knows nothing of key
// providers; tokens are opaque JSON objects to it.
//
// What it supports:
//
//   - Format writes a header cryptsetup accepts: one crypt segment
//     (aes-xts-plain64, 512-bit key, sector size 512 to 4096, iv_tweak 0,
//     dynamic size, data offset 16 MiB by default), one luks2 keyslot (PBKDF2
//     with SHA-256, AF luks1 with 4000 SHA-256 stripes, area encrypted with
//     aes-xts-plain64 and a 512-bit key in 512-byte sectors), one PBKDF2
//     SHA-256 digest binding both, 16 KiB metadata copies.
//   - Read accepts any header with those shapes made by cryptsetup,
//     including argon2i/argon2id keyslots and 256-bit keyslot area keys, and
//     validates it as cryptsetup's LUKS2_hdr_validate does. Headers with a
//     reencryption in progress, several segments, a fixed-size or integrity
//     segment, or mandatory requirements are reported as ErrUnsupported.
//   - Write rewrites both copies with seqid+1, in an order that survives a
//     crash at any point (Read then returns the old or the new header).
//   - Wipe crypto-shreds by overwriting everything before the data segment.
//
// The data segment's IV is plain64 counted in 512-byte units from the data
// offset, whatever the sector size (dm-crypt without iv_large_sectors): the
// sector of SectorSize bytes at data offset + s*SectorSize has tweak
// s*SectorSize/512.
//
// Key material passed in or returned is owned by the caller. Temporary key
// buffers are zeroed after use; this is best effort, since the KDF and
// cipher implementations of the standard library keep copies out of reach.
package luks2
