package xts_test

import (
	"syscall"
	"time"
)

// threadCPU returns the CPU time consumed by the calling OS thread, so that
// benchmarks on a shared, loaded machine can report throughput per CPU
// second as well as per wall-clock second.
func threadCPU() (time.Duration, bool) {
	const rusageThread = 1 // RUSAGE_THREAD
	var ru syscall.Rusage
	if err := syscall.Getrusage(rusageThread, &ru); err != nil {
		return 0, false
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), true
}
