package xts

// Impls returns the names of the implementations this machine can run, for
// tests and benchmarks that exercise each one.
func Impls() []string {
	var names []string
	for _, im := range availableImpls() {
		names = append(names, im.String())
	}
	return names
}

// NewImpl is New with the implementation forced to the one named.
func NewImpl(key []byte, name string) (*Cipher, error) {
	for _, im := range availableImpls() {
		if im.String() == name {
			return newImpl(key, im)
		}
	}
	panic("xts: implementation not available: " + name)
}
