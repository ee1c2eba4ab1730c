package nbd

import (
	"math/bits"
	"sync"
)

// Payload buffers come from power-of-two size classes between 4 KiB and
// MaxPayload, each a sync.Pool of *[]byte so that Get and Put do not
// allocate. A buffer has one owner at a time: reader (WRITE payload) or
// worker (READ data), then the writer, which returns it to its pool.
const (
	minClassShift = 12 // 4 KiB
	maxClassShift = 25 // 32 MiB == MaxPayload
)

var bufClasses [maxClassShift - minClassShift + 1]sync.Pool

func init() {
	for i := range bufClasses {
		size := 1 << (minClassShift + i)
		bufClasses[i].New = func() any {
			b := make([]byte, size)
			return &b
		}
	}
}

// classFor returns the pool index for n bytes; n must be in [1, MaxPayload].
func classFor(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// getBuf returns a pooled buffer whose length is n (0 < n <= MaxPayload).
func getBuf(n int) *[]byte {
	bp := bufClasses[classFor(n)].Get().(*[]byte)
	*bp = (*bp)[:n]
	return bp
}

// putBuf returns a buffer obtained from getBuf.
func putBuf(bp *[]byte) {
	if bp == nil {
		return
	}
	b := (*bp)[:cap(*bp)]
	*bp = b
	bufClasses[classFor(cap(b))].Put(bp)
}
