package metrics_test

import (
	"context"
	"errors"
	"sync"
	"syscall"
	"testing"

	"github.com/cryptnbd/cryptnbd/metrics"
)

// fakeBackend answers every call with err, after waiting for release if
// that is set. It fills reads with 0xAB.
type fakeBackend struct {
	err     error
	entered chan struct{} // receives once per call, if set
	release chan struct{} // calls wait for it to close, if set
}

func (f *fakeBackend) wait() error {
	if f.entered != nil {
		f.entered <- struct{}{}
	}
	if f.release != nil {
		<-f.release
	}
	return f.err
}

func (f *fakeBackend) ReadAt(_ context.Context, p []byte, _ int64) error {
	for i := range p {
		p[i] = 0xAB
	}
	return f.wait()
}
func (f *fakeBackend) WriteAt(context.Context, []byte, int64) error { return f.wait() }
func (f *fakeBackend) Flush(context.Context) error                  { return f.wait() }
func (f *fakeBackend) Trim(context.Context, int64, int64) error     { return f.wait() }
func (f *fakeBackend) Zero(context.Context, int64, int64, bool, bool) error {
	return f.wait()
}
func (f *fakeBackend) Cache(context.Context, int64, int64) error { return f.wait() }
func (f *fakeBackend) Extents(_ context.Context, _, length int64, fn func(int64, bool) bool) error {
	fn(length, true)
	return f.wait()
}
func (f *fakeBackend) Size() int64 { return 1 << 30 }

func TestWrapBackendCountsEachOp(t *testing.T) {
	ctx := context.Background()
	eio := syscall.EIO
	calls := []struct {
		op    string
		bytes float64 // counted into bytes_total on success; -1: no series
		call  func(b metrics.Backend) error
	}{
		{"read", 4096, func(b metrics.Backend) error { return b.ReadAt(ctx, make([]byte, 4096), 0) }},
		{"write", 512, func(b metrics.Backend) error { return b.WriteAt(ctx, make([]byte, 512), 4096) }},
		{"flush", -1, func(b metrics.Backend) error { return b.Flush(ctx) }},
		{"trim", 1 << 20, func(b metrics.Backend) error { return b.Trim(ctx, 0, 1<<20) }},
		{"zero", 8192, func(b metrics.Backend) error { return b.Zero(ctx, 0, 8192, false, false) }},
		{"cache", 65536, func(b metrics.Backend) error { return b.Cache(ctx, 0, 65536) }},
		{"extents", -1, func(b metrics.Backend) error {
			return b.Extents(ctx, 0, 1<<30, func(int64, bool) bool { return true })
		}},
	}
	for _, c := range calls {
		t.Run(c.op, func(t *testing.T) {
			m := metrics.New()
			good := m.WrapBackend("d1", &fakeBackend{})
			bad := m.WrapBackend("d1", &fakeBackend{err: eio}) // same disk: shared counters
			for range 3 {
				if err := c.call(good); err != nil {
					t.Fatalf("%s: %v", c.op, err)
				}
			}
			if err := c.call(bad); !errors.Is(err, syscall.EIO) {
				t.Errorf("%s error = %v, want the backend's EIO unchanged", c.op, err)
			}
			l := map[string]string{"disk": "d1", "op": c.op}
			if got := mustValue(t, m, "cryptnbd_disk_requests_total", map[string]string{"disk": "d1", "op": c.op, "result": "ok"}); got != 3 {
				t.Errorf("ok requests = %v, want 3", got)
			}
			if got := mustValue(t, m, "cryptnbd_disk_requests_total", map[string]string{"disk": "d1", "op": c.op, "result": "error"}); got != 1 {
				t.Errorf("error requests = %v, want 1", got)
			}
			if got := mustValue(t, m, "cryptnbd_disk_request_duration_seconds", l); got != 4 {
				t.Errorf("duration observations = %v, want 4", got)
			}
			got, ok := value(t, m, "cryptnbd_disk_bytes_total", l)
			switch {
			case c.bytes < 0 && ok:
				t.Errorf("bytes_total has a series for %s", c.op)
			case c.bytes >= 0 && got != 3*c.bytes:
				t.Errorf("bytes = %v, want %v (successful requests only)", got, 3*c.bytes)
			}
			if got := mustValue(t, m, "cryptnbd_disk_requests_in_flight", map[string]string{"disk": "d1"}); got != 0 {
				t.Errorf("in flight after the calls = %v, want 0", got)
			}
		})
	}
}

func TestWrapBackendPassesDataThrough(t *testing.T) {
	m := metrics.New()
	b := m.WrapBackend("d", &fakeBackend{})
	p := make([]byte, 16)
	if err := b.ReadAt(context.Background(), p, 0); err != nil {
		t.Fatal(err)
	}
	for i, c := range p {
		if c != 0xAB {
			t.Fatalf("p[%d] = %#x, want the backend's 0xab", i, c)
		}
	}
	if got := b.Size(); got != 1<<30 {
		t.Errorf("Size = %d, want %d", got, 1<<30)
	}
	var runs int
	b.Extents(context.Background(), 0, 100, func(length int64, hole bool) bool {
		runs++
		if length != 100 || !hole {
			t.Errorf("extent (%d, %v), want (100, true)", length, hole)
		}
		return true
	})
	if runs != 1 {
		t.Errorf("extent callbacks = %d, want 1", runs)
	}
}

// TestWrapBackendInFlight: requests count in flight while the backend
// has them, Try calls too (one serving 1 MiB takes about half a
// millisecond).
func TestWrapBackendInFlight(t *testing.T) {
	m := metrics.New()
	f := &tryBackend{fakeBackend: fakeBackend{entered: make(chan struct{}), release: make(chan struct{})}, serve: true}
	b := m.WrapBackend("d", f).(metrics.NoWaitBackend)
	ctx := context.Background()
	var wg sync.WaitGroup
	wg.Go(func() { b.WriteAt(ctx, make([]byte, 512), 0) })
	wg.Go(func() { b.TryWriteAt(ctx, make([]byte, 512), 0) })
	wg.Go(func() { b.TryReadAt(ctx, make([]byte, 512), 0) })
	for range 3 {
		<-f.entered
	}
	if got := mustValue(t, m, "cryptnbd_disk_requests_in_flight", map[string]string{"disk": "d"}); got != 3 {
		t.Errorf("in flight = %v, want 3", got)
	}
	close(f.release)
	wg.Wait()
	if got := mustValue(t, m, "cryptnbd_disk_requests_in_flight", map[string]string{"disk": "d"}); got != 0 {
		t.Errorf("in flight after release = %v, want 0", got)
	}
}

func TestDiskCounters(t *testing.T) {
	ctx := context.Background()
	m := metrics.New()
	if rb, wb, ro, wo := m.DiskCounters("nope"); rb|wb|ro|wo != 0 {
		t.Errorf("unknown disk counters = %d %d %d %d, want zeros", rb, wb, ro, wo)
	}
	b := m.WrapBackend("d", &fakeBackend{})
	bad := m.WrapBackend("d", &fakeBackend{err: syscall.EIO})
	other := m.WrapBackend("e", &fakeBackend{})
	for range 5 {
		b.ReadAt(ctx, make([]byte, 4096), 0)
	}
	b.WriteAt(ctx, make([]byte, 512), 0)
	b.WriteAt(ctx, make([]byte, 1024), 0)
	bad.WriteAt(ctx, make([]byte, 4096), 0) // failed: not counted
	b.Flush(ctx)
	other.ReadAt(ctx, make([]byte, 1), 0)
	rb, wb, ro, wo := m.DiskCounters("d")
	if rb != 5*4096 || wb != 1536 || ro != 5 || wo != 2 {
		t.Errorf("DiskCounters = %d %d %d %d, want %d %d %d %d", rb, wb, ro, wo, 5*4096, 1536, 5, 2)
	}
}

func TestConnections(t *testing.T) {
	m := metrics.New()
	m.ConnOpened("a")
	m.ConnOpened("a")
	m.ConnOpened("b")
	m.ConnClosed("a")
	for disk, want := range map[string]float64{"a": 1, "b": 1} {
		if got := mustValue(t, m, "cryptnbd_disk_connections", map[string]string{"disk": disk}); got != want {
			t.Errorf("connections{disk=%q} = %v, want %v", disk, got, want)
		}
	}
}

func TestForgetDisk(t *testing.T) {
	m := metrics.New()
	m.WrapBackend("gone", &fakeBackend{}).Flush(context.Background())
	m.WrapBackend("kept", &fakeBackend{}).Flush(context.Background())
	m.ConnOpened("gone")
	m.ForgetDisk("gone")
	for _, name := range []string{"cryptnbd_disk_requests_total", "cryptnbd_disk_request_duration_seconds", "cryptnbd_disk_connections", "cryptnbd_disk_requests_in_flight"} {
		if _, ok := value(t, m, name, map[string]string{"disk": "gone"}); ok {
			t.Errorf("%s still has disk=gone", name)
		}
		if _, ok := value(t, m, name, map[string]string{"disk": "kept"}); !ok {
			t.Errorf("%s lost disk=kept", name)
		}
	}
}

// nopBackend does nothing, so a benchmark measures only the wrapper.
type nopBackend struct{}

func (nopBackend) ReadAt(context.Context, []byte, int64) error                         { return nil }
func (nopBackend) WriteAt(context.Context, []byte, int64) error                        { return nil }
func (nopBackend) Flush(context.Context) error                                         { return nil }
func (nopBackend) Trim(context.Context, int64, int64) error                            { return nil }
func (nopBackend) Zero(context.Context, int64, int64, bool, bool) error                { return nil }
func (nopBackend) Cache(context.Context, int64, int64) error                           { return nil }
func (nopBackend) Extents(context.Context, int64, int64, func(int64, bool) bool) error { return nil }
func (nopBackend) Size() int64                                                         { return 1 << 30 }

func TestWrapBackendAllocatesNothing(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates; run without -race (the benchmarks show 0 allocs/op too)")
	}
	ctx := context.Background()
	m := metrics.New()
	b := m.WrapBackend("d", nopBackend{})
	bad := m.WrapBackend("d", &fakeBackend{err: syscall.EIO})
	try := m.WrapBackend("d", &tryBackend{serve: true}).(metrics.NoWaitBackend)
	p := make([]byte, 4096)
	for _, c := range []struct {
		name string
		f    func()
	}{
		{"ReadAt", func() { b.ReadAt(ctx, p, 0) }},
		{"WriteAt", func() { b.WriteAt(ctx, p, 0) }},
		{"failed WriteAt", func() { bad.WriteAt(ctx, p, 0) }},
		{"Flush", func() { b.Flush(ctx) }},
		{"Zero", func() { b.Zero(ctx, 0, 4096, false, true) }},
		{"TryReadAt", func() { try.TryReadAt(ctx, p, 0) }},
		{"TryWriteAt", func() { try.TryWriteAt(ctx, p, 0) }},
	} {
		if n := testing.AllocsPerRun(1000, c.f); n != 0 {
			t.Errorf("%s allocates %v times per call, want 0", c.name, n)
		}
	}
}

func BenchmarkWrapBackend(b *testing.B) {
	ctx := context.Background()
	for _, c := range []struct {
		name string
		f    func(metrics.Backend, []byte) error
	}{
		{"ReadAt", func(w metrics.Backend, p []byte) error { return w.ReadAt(ctx, p, 0) }},
		{"WriteAt", func(w metrics.Backend, p []byte) error { return w.WriteAt(ctx, p, 0) }},
	} {
		b.Run(c.name, func(b *testing.B) {
			w := metrics.New().WrapBackend("bench", nopBackend{})
			p := make([]byte, 4096)
			b.ReportAllocs()
			b.SetBytes(int64(len(p)))
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					c.f(w, p)
				}
			})
		})
	}
}

// BenchmarkUnwrapped is the baseline: the same calls without the wrapper.
func BenchmarkUnwrapped(b *testing.B) {
	var w metrics.Backend = nopBackend{}
	p := make([]byte, 4096)
	b.ReportAllocs()
	for b.Loop() {
		w.ReadAt(context.Background(), p, 0)
	}
}

// tryBackend is a fakeBackend whose Try methods serve when serve is set
// and decline otherwise.
type tryBackend struct {
	fakeBackend
	serve bool
}

func (b *tryBackend) TryReadAt(ctx context.Context, p []byte, off int64) (bool, error) {
	if !b.serve {
		return false, nil
	}
	return true, b.ReadAt(ctx, p, off)
}

func (b *tryBackend) TryWriteAt(ctx context.Context, p []byte, off int64) (bool, error) {
	if !b.serve {
		return false, nil
	}
	return true, b.WriteAt(ctx, p, off)
}

// TestWrapBackendNoWait: the wrapper of a NoWaitBackend is one, and counts
// a Try call only when it served the request: one that declined is made
// again through ReadAt or WriteAt, and would otherwise count twice. The
// wrapper of any other backend is not one, so the NBD server does not try.
func TestWrapBackendNoWait(t *testing.T) {
	ctx := context.Background()
	if _, ok := metrics.New().WrapBackend("d", &fakeBackend{}).(metrics.NoWaitBackend); ok {
		t.Fatal("the wrapper of a plain backend offers Try methods")
	}
	m := metrics.New()
	serving := m.WrapBackend("d", &tryBackend{serve: true}).(metrics.NoWaitBackend)
	declining := m.WrapBackend("d", &tryBackend{}).(metrics.NoWaitBackend)
	failing := m.WrapBackend("d", &tryBackend{fakeBackend: fakeBackend{err: syscall.EIO}, serve: true}).(metrics.NoWaitBackend)
	p := make([]byte, 4096)
	for _, b := range []metrics.NoWaitBackend{serving, declining, failing} {
		for range 2 {
			b.TryReadAt(ctx, p, 0)
			b.TryWriteAt(ctx, p[:512], 0)
		}
	}
	if ok, err := declining.TryReadAt(ctx, p, 0); ok || err != nil {
		t.Errorf("declining TryReadAt = %v, %v through the wrapper", ok, err)
	}
	for op, n := range map[string]float64{"read": 4096, "write": 512} {
		l := map[string]string{"disk": "d", "op": op}
		if got := mustValue(t, m, "cryptnbd_disk_requests_total", map[string]string{"disk": "d", "op": op, "result": "ok"}); got != 2 {
			t.Errorf("%s ok = %v, want 2", op, got)
		}
		if got := mustValue(t, m, "cryptnbd_disk_requests_total", map[string]string{"disk": "d", "op": op, "result": "error"}); got != 2 {
			t.Errorf("%s errors = %v, want 2", op, got)
		}
		if got := mustValue(t, m, "cryptnbd_disk_request_duration_seconds", l); got != 4 {
			t.Errorf("%s duration observations = %v, want 4", op, got)
		}
		if got := mustValue(t, m, "cryptnbd_disk_bytes_total", l); got != 2*n {
			t.Errorf("%s bytes = %v, want %v", op, got, 2*n)
		}
	}
	if got := mustValue(t, m, "cryptnbd_disk_requests_in_flight", map[string]string{"disk": "d"}); got != 0 {
		t.Errorf("in flight after the calls = %v, want 0", got)
	}
	if r, w, ro, wo := m.DiskCounters("d"); r != 2*4096 || w != 2*512 || ro != 2 || wo != 2 {
		t.Errorf("DiskCounters = %d, %d, %d, %d; want 8192, 1024, 2, 2", r, w, ro, wo)
	}
}
