package luks2_test

import (
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk/luks2"
)

// BenchmarkRead measures parsing and validating both metadata copies.
func BenchmarkRead(b *testing.B) {
	d := &memDisk{}
	if _, err := luks2.Format(d, testKey(), testPass, luks2.FormatOptions{DataOffset: mib}); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := luks2.Read(d); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkUnlock measures a keyslot open at the minimum PBKDF2 cost.
func BenchmarkUnlock(b *testing.B) {
	d := &memDisk{}
	h, err := luks2.Format(d, testKey(), testPass, luks2.FormatOptions{DataOffset: mib})
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := h.Unlock(d, testPass); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkFormat measures Format with the default 16 MiB data offset,
// most of it filling the keyslots area with random bytes.
func BenchmarkFormat(b *testing.B) {
	for b.Loop() {
		d := &memDisk{}
		if _, err := luks2.Format(d, testKey(), testPass, luks2.FormatOptions{}); err != nil {
			b.Fatal(err)
		}
	}
}
