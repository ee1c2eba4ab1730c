package nbd

import (
	"math/bits"
	"sync"
)

// Payload buffers come from power-of-two size classes between 4 KiB and
// MaxPayload, each a sync.Pool of *[]byte so that get and put do not
// allocate. A buffer has one owner at a time: reader (WRITE payload) or
// worker (READ data), then the writer, which returns it to its pool. Each
// Server has its own pools, so servers in one process share no state.
const (
	minClassShift = 12 // 4 KiB
	maxClassShift = 25 // 32 MiB == MaxPayload
)

type bufPools [maxClassShift - minClassShift + 1]sync.Pool

func (p *bufPools) init() {
	for i := range p {
		size := 1 << (minClassShift + i)
		p[i].New = func() any {
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

// get returns a pooled buffer whose length is n (0 < n <= MaxPayload).
func (p *bufPools) get(n int) *[]byte {
	bp := p[classFor(n)].Get().(*[]byte)
	*bp = (*bp)[:n]
	return bp
}

// put returns a buffer obtained from get.
func (p *bufPools) put(bp *[]byte) {
	if bp == nil {
		return
	}
	b := (*bp)[:cap(*bp)]
	*bp = b
	p[classFor(cap(b))].Put(bp)
}
