//go:build !linux

package xts_test

import "time"

func threadCPU() (time.Duration, bool) { return 0, false }
