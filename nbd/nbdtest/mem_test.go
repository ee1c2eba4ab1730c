package nbdtest_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"syscall"
	"testing"

	"github.com/cryptnbd/cryptnbd/nbd"
	"github.com/cryptnbd/cryptnbd/nbd/nbdtest"
)

var _ nbd.Backend = (*nbdtest.Mem)(nil)
var _ nbd.Backend = nbdtest.Null{}
var _ nbd.Catalog = (*nbdtest.Catalog)(nil)

type run struct {
	n    int64
	hole bool
}

func extents(t *testing.T, m *nbdtest.Mem, off, n int64) []run {
	t.Helper()
	var rs []run
	if err := m.Extents(context.Background(), off, n, func(l int64, hole bool) bool {
		rs = append(rs, run{l, hole})
		return true
	}); err != nil {
		t.Fatalf("Extents: %v", err)
	}
	return rs
}

func TestMemSparse(t *testing.T) {
	ctx := context.Background()
	const c = nbdtest.ChunkBytes
	m := nbdtest.NewMem(8 * c)
	if got := extents(t, m, 0, 8*c); fmt.Sprint(got) != fmt.Sprint([]run{{8 * c, true}}) {
		t.Errorf("empty disk extents %v", got)
	}
	if err := m.WriteAt(ctx, bytes.Repeat([]byte{1}, 3*c), c); err != nil {
		t.Fatal(err)
	}
	if err := m.Trim(ctx, 2*c, c); err != nil {
		t.Fatal(err)
	}
	if err := m.Zero(ctx, 5*c, c, true, false); err != nil {
		t.Fatal(err)
	}
	want := []run{{c, true}, {c, false}, {c, true}, {c, false}, {c, true}, {c, false}, {2 * c, true}}
	if got := extents(t, m, 0, 8*c); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("extents %v, want %v", got, want)
	}
	if got := extents(t, m, c+10, 20); fmt.Sprint(got) != fmt.Sprint([]run{{20, false}}) {
		t.Errorf("partial extents %v", got)
	}
	p := make([]byte, 4*c)
	if err := m.ReadAt(ctx, p, c); err != nil {
		t.Fatal(err)
	}
	wantData := append(append(bytes.Repeat([]byte{1}, c), make([]byte, c)...), bytes.Repeat([]byte{1}, c)...)
	wantData = append(wantData, make([]byte, c)...)
	if !bytes.Equal(p, wantData) {
		t.Errorf("contents differ")
	}
	if err := m.ReadAt(ctx, p, 6*c); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("read past end: %v, want EINVAL", err)
	}
}

func TestMemFail(t *testing.T) {
	ctx := context.Background()
	m := nbdtest.NewMem(1 << 16)
	m.Fail(nbdtest.OpRead|nbdtest.OpFlush, 4096, 4096, syscall.EIO)
	tests := []struct {
		name string
		err  error
		want error
	}{
		{"read inside", m.ReadAt(ctx, make([]byte, 10), 5000), syscall.EIO},
		{"read overlapping", m.ReadAt(ctx, make([]byte, 10), 4090), syscall.EIO},
		{"read outside", m.ReadAt(ctx, make([]byte, 10), 8192), nil},
		{"write inside", m.WriteAt(ctx, make([]byte, 10), 5000), nil},
		{"flush", m.Flush(ctx), syscall.EIO},
	}
	for _, tt := range tests {
		if !errors.Is(tt.err, tt.want) || (tt.want == nil && tt.err != nil) {
			t.Errorf("%s: %v, want %v", tt.name, tt.err, tt.want)
		}
	}
	m.ClearFaults()
	if err := m.Flush(ctx); err != nil || m.Flushes() != 1 {
		t.Errorf("flush after ClearFaults: %v, %d flushes", err, m.Flushes())
	}
}
