package daemon

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// ValidateName checks a disk name, which is also its NBD export name.
func ValidateName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("invalid disk name %q: use 1-63 characters a-z, 0-9 and '-', starting with a letter or digit", name)
	}
	return nil
}

// ParseSize reads sizes like 30G, 512M, 1T, 4096 (bytes); the suffixes are
// binary (G = GiB), as for qemu-img and az disk create --size-gb.
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	mult := int64(1)
	t = strings.TrimSuffix(strings.TrimSuffix(t, "iB"), "B")
	if t == "" {
		return 0, fmt.Errorf("invalid size %q", s)
	}
	switch strings.ToUpper(t[len(t)-1:]) {
	case "K":
		mult = 1 << 10
	case "M":
		mult = 1 << 20
	case "G":
		mult = 1 << 30
	case "T":
		mult = 1 << 40
	case "P":
		mult = 1 << 50
	}
	if mult != 1 {
		t = t[:len(t)-1]
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n <= 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("invalid size %q: want a positive number with an optional K, M, G or T suffix", s)
	}
	return n * mult, nil
}
