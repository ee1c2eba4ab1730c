// Package cryptodisk is one encrypted disk: a LUKS2 container on a Storage,
// with XTS-AES-256 sector encryption and a gate that suspends I/O when the
// disk's key is revoked.
//
// Layers, outermost first:
//
//	gate    holds requests while the disk is suspended; drains on Suspend
//	crypto  splits unaligned I/O into head, body and tail; read-modify-write
//	        of partial sectors under a striped lock; XTS in place, or
//	        between the request buffer and pages the Storage lends (Lender)
//	Storage the image: header and ciphertext (file, memory, page blob)
//
// # Zeros and holes
//
// An encryption sector whose ciphertext is all zero bytes stands for an
// unwritten sector and reads as plaintext zeros; no real ciphertext is all
// zeros except with probability 2^-4096. New disks are sparse files, TRIM and
// WRITE_ZEROES punch holes, and BLOCK_STATUS reports the holes. A WRITE of
// zero-filled data is encrypted like any other, so only explicit zeroing is
// visible. Someone holding the image learns which sectors were never written
// or were zeroed, as with any thin-provisioned encrypted disk (dm-crypt with
// discards allowed reveals the same). Opened with cryptsetup, such sectors
// decrypt to pseudo-random bytes, not zeros: filesystems never read space
// they have not written, so a recovered filesystem is intact.
package cryptodisk
