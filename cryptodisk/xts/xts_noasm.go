//go:build !amd64 || purego

package xts

func bestImpl() impl { return implGeneric }

func availableImpls() []impl { return []impl{implGeneric} }

func (c *Cipher) crypt(dst, src []byte, sectorSize int, tweak, step uint64, decrypt bool) {
	c.cryptGeneric(dst, src, sectorSize, tweak, step, decrypt)
}
