package cryptodisk_test

import (
	"bytes"
	"context"
	"errors"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/cryptodisktest"
	"github.com/cryptnbd/cryptnbd/cryptodisk/memstore"
)

const (
	opRead  = cryptodisktest.OpRead
	opWrite = cryptodisktest.OpWrite
	opPunch = cryptodisktest.OpPunch
	opSync  = cryptodisktest.OpSync
)

// counting counts the store writes that have completed.
type counting struct {
	cryptodisktest.Storage
	writes atomic.Int64
}

func (c *counting) WriteAt(ctx context.Context, p []byte, off int64) error {
	err := c.Storage.WriteAt(ctx, p, off)
	c.writes.Add(1)
	return err
}

// newHookedEnv is a memory disk whose store calls can be stopped or failed.
func newHookedEnv(t *testing.T, ss int) (*env, *cryptodisktest.Hooked) {
	return newHookedEnvOpts(t, ss, cryptodisk.Options{})
}

func newHookedEnvOpts(t *testing.T, ss int, o cryptodisk.Options) (*env, *cryptodisktest.Hooked) {
	t.Helper()
	h := cryptodisktest.Hook(memstore.New(0))
	e := &env{store: h, keys: cryptodisktest.NewKeys(testSeed), size: diskSize}
	e.d = create(t, h, e.keys, ss, diskSize, o)
	return e, h
}

// waitFor polls cond until it holds; it fails the test after a generous
// deadline, which only a hang reaches.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// await returns the result of an operation started in a goroutine, failing
// the test if it never finishes.
func await(t *testing.T, what string, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not finish", what)
		return nil
	}
}

// notYet checks that ch has no result now and shortly after. It can miss a
// bug on a slow machine but never fails a correct disk.
func notYet(t *testing.T, what string, ch <-chan error) {
	t.Helper()
	select {
	case err := <-ch:
		t.Fatalf("%s finished (err %v) while it should still be waiting", what, err)
	case <-time.After(20 * time.Millisecond):
	}
}

func goErr(f func() error) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- f() }()
	return ch
}

func TestSuspendWaitsForInflightIO(t *testing.T) {
	h := cryptodisktest.Hook(memstore.New(0))
	c := &counting{Storage: h}
	keys := cryptodisktest.NewKeys(testSeed)
	d := create(t, c, keys, 4096, diskSize, cryptodisk.Options{})
	ctx := context.Background()
	data := bytes.Repeat([]byte{0x42}, 4096)

	gate := h.Stop(opWrite)
	before := c.writes.Load()
	writeDone := goErr(func() error { return d.WriteAt(ctx, bytes.Clone(data), 8192) })
	<-gate.Entered // the write holds the gate's read side, inside the store

	var writesAtSuspend atomic.Int64
	suspended := goErr(func() error {
		d.Suspend("test")
		writesAtSuspend.Store(c.writes.Load())
		return nil
	})
	notYet(t, "Suspend during a stopped write", suspended)
	gate.Release()
	if err := await(t, "write", writeDone); err != nil {
		t.Fatalf("in-flight WriteAt: %v", err)
	}
	await(t, "Suspend", suspended)
	if got := writesAtSuspend.Load(); got != before+1 {
		t.Errorf("Suspend returned with %d store writes completed, want %d: it did not wait", got-before, 1)
	}
	if st, reason, _ := d.State(); st != cryptodisk.StateSuspended || reason != "test" {
		t.Errorf("State() = %s, %q; want Suspended, \"test\"", st, reason)
	}
	if err := d.Resume(ctx, keys); err != nil {
		t.Fatalf("Resume: %v", err)
	}
	got := make([]byte, 4096)
	if err := d.ReadAt(ctx, got, 8192); err != nil || !bytes.Equal(got, data) {
		t.Errorf("after Resume: ReadAt = %v, data equal %v", err, bytes.Equal(got, data))
	}
}

func TestSuspendHoldsUntilResume(t *testing.T) {
	for _, ss := range sectorSizes {
		e := newEnv(t, backends[0], ss, diskSize, cryptodisk.Options{})
		ctx := context.Background()
		old := bytes.Repeat([]byte{1}, 10000)
		write(t, e.d, old, 0)
		e.d.Suspend("key revoked")
		if st, _, _ := e.d.State(); st != cryptodisk.StateSuspended {
			t.Fatalf("State() = %s after Suspend", st)
		}

		got := make([]byte, 10000)
		readDone := goErr(func() error { return e.d.ReadAt(ctx, got, 0) })
		newData := bytes.Repeat([]byte{2}, 3000)
		writeDone := goErr(func() error { return e.d.WriteAt(ctx, bytes.Clone(newData), 20000+7) })
		zeroDone := goErr(func() error { return e.d.Zero(ctx, 100, 50, false, false) })
		waitFor(t, "three held requests", func() bool { return e.d.Held() == 3 })
		notYet(t, "held read", readDone)
		notYet(t, "held write", writeDone)

		// Flush needs no key and is answered while suspended.
		if err := await(t, "Flush while suspended", goErr(func() error { return e.d.Flush(ctx) })); err != nil {
			t.Errorf("Flush while suspended: %v", err)
		}
		// Suspending again only updates the reason.
		e.d.Suspend("still revoked")
		if _, reason, _ := e.d.State(); reason != "still revoked" {
			t.Errorf("reason after second Suspend = %q", reason)
		}

		if err := e.d.Resume(ctx, e.keys); err != nil {
			t.Fatalf("Resume: %v", err)
		}
		for name, ch := range map[string]<-chan error{"read": readDone, "write": writeDone, "zero": zeroDone} {
			if err := await(t, "held "+name, ch); err != nil {
				t.Errorf("held %s after Resume: %v", name, err)
			}
		}
		// The held zero may run before or after the held read.
		if !bytes.Equal(got[:100], old[:100]) || !bytes.Equal(got[150:], old[150:]) {
			t.Errorf("held read returned wrong data outside the zeroed bytes")
		}
		model := make([]byte, diskSize)
		copy(model, old)
		clear(model[100:150])
		copy(model[20007:], newData)
		checkDisk(t, e.d, model)
		if got := e.d.Held(); got != 0 {
			t.Errorf("Held() = %d after Resume, want 0", got)
		}
		if st, _, _ := e.d.State(); st != cryptodisk.StateActive {
			t.Errorf("State() = %s after Resume, want Active", st)
		}
		// Resume of an active disk does nothing, not even an unwrap.
		n := e.keys.Unwraps()
		if err := e.d.Resume(ctx, e.keys); err != nil || e.keys.Unwraps() != n {
			t.Errorf("Resume of an active disk: err %v, %d unwraps", err, e.keys.Unwraps()-n)
		}
	}
}

func TestHeldRequestTimesOut(t *testing.T) {
	e := newEnv(t, backends[0], 4096, diskSize, cryptodisk.Options{SuspendHold: 30 * time.Millisecond})
	e.d.Suspend("test")
	ctx := context.Background()
	for name, f := range map[string]func() error{
		"ReadAt":  func() error { return e.d.ReadAt(ctx, make([]byte, 10), 0) },
		"WriteAt": func() error { return e.d.WriteAt(ctx, make([]byte, 10), 0) },
		"Trim":    func() error { return e.d.Trim(ctx, 0, 4096) },
	} {
		err := await(t, name, goErr(f))
		if !errors.Is(err, syscall.EIO) || !errors.Is(err, cryptodisk.ErrSuspended) {
			t.Errorf("%s held past SuspendHold: got %v, want ErrSuspended wrapping EIO", name, err)
		}
	}
	if got := e.d.Held(); got != 0 {
		t.Errorf("Held() = %d after timeouts, want 0", got)
	}
	// Nothing was written while suspended.
	if err := e.d.Resume(ctx, e.keys); err != nil {
		t.Fatal(err)
	}
	checkDisk(t, e.d, make([]byte, diskSize))
}

func TestHeldRequestCtxCancelled(t *testing.T) {
	e := newEnv(t, backends[0], 4096, diskSize, cryptodisk.Options{})
	e.d.Suspend("test")
	ctx, cancel := context.WithCancel(context.Background())
	other := goErr(func() error { return e.d.ReadAt(context.Background(), make([]byte, 10), 0) })
	done := goErr(func() error { return e.d.WriteAt(ctx, make([]byte, 10), 0) })
	waitFor(t, "two held requests", func() bool { return e.d.Held() == 2 })
	cancel()
	err := await(t, "cancelled write", done)
	if !errors.Is(err, context.Canceled) || !errors.Is(err, syscall.EIO) {
		t.Errorf("held write after cancel: got %v, want context.Canceled and EIO", err)
	}
	waitFor(t, "one held request", func() bool { return e.d.Held() == 1 })
	notYet(t, "the other held read", other)
	if err := e.d.Resume(context.Background(), e.keys); err != nil {
		t.Fatal(err)
	}
	if err := await(t, "other read", other); err != nil {
		t.Errorf("uncancelled held read: %v", err)
	}
}

func TestCloseFailsHeldRequests(t *testing.T) {
	e := newEnv(t, backends[0], 4096, diskSize, cryptodisk.Options{})
	ctx := context.Background()
	e.d.Suspend("test")
	r := goErr(func() error { return e.d.ReadAt(ctx, make([]byte, 10), 0) })
	w := goErr(func() error { return e.d.WriteAt(ctx, make([]byte, 10), 0) })
	waitFor(t, "two held requests", func() bool { return e.d.Held() == 2 })
	if err := e.d.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	for name, ch := range map[string]<-chan error{"read": r, "write": w} {
		err := await(t, name, ch)
		if !errors.Is(err, syscall.ESHUTDOWN) || !errors.Is(err, cryptodisk.ErrClosed) {
			t.Errorf("held %s at Close: got %v, want ErrClosed wrapping ESHUTDOWN", name, err)
		}
	}
	if st, _, _ := e.d.State(); st != cryptodisk.StateClosed {
		t.Errorf("State() = %s after Close", st)
	}
	// Requests after Close fail at once; Suspend and Resume are no-ops.
	if err := e.d.ReadAt(ctx, make([]byte, 10), 0); !errors.Is(err, syscall.ESHUTDOWN) {
		t.Errorf("ReadAt after Close: got %v, want ESHUTDOWN", err)
	}
	if err := e.d.Flush(ctx); !errors.Is(err, syscall.ESHUTDOWN) {
		t.Errorf("Flush after Close: got %v, want ESHUTDOWN", err)
	}
	e.d.Suspend("late")
	if err := e.d.Resume(ctx, e.keys); err != nil {
		t.Errorf("Resume after Close: %v", err)
	}
	if st, _, _ := e.d.State(); st != cryptodisk.StateClosed {
		t.Errorf("State() = %s after Suspend/Resume of a closed disk", st)
	}
	if err := e.d.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestResumeFailureStaysSuspended(t *testing.T) {
	e := newEnv(t, backends[0], 4096, diskSize, cryptodisk.Options{})
	ctx := context.Background()
	write(t, e.d, []byte("precious"), 0)
	e.d.Suspend("revoked")
	held := goErr(func() error { return e.d.ReadAt(ctx, make([]byte, 8), 0) })
	waitFor(t, "a held request", func() bool { return e.d.Held() == 1 })

	e.keys.Fail(syscall.EACCES)
	if err := e.d.Resume(ctx, e.keys); !errors.Is(err, syscall.EACCES) {
		t.Errorf("Resume with a failing unwrapper: got %v, want EACCES", err)
	}
	if err := e.d.Resume(ctx, cryptodisktest.WrongSecret(32)); !errors.Is(err, cryptodisk.ErrWrongKey) {
		t.Errorf("Resume with a wrong secret: got %v, want ErrWrongKey", err)
	}
	if st, reason, _ := e.d.State(); st != cryptodisk.StateSuspended || reason != "revoked" {
		t.Errorf("after failed Resume: State() = %s, %q; want Suspended, \"revoked\"", st, reason)
	}
	notYet(t, "held read after failed Resume", held)
	if got := e.d.Held(); got != 1 {
		t.Errorf("Held() = %d after failed Resume, want 1", got)
	}
	e.keys.Fail(nil)
	if err := e.d.Resume(ctx, e.keys); err != nil {
		t.Fatalf("Resume: %v", err)
	}
	if err := await(t, "held read", held); err != nil {
		t.Errorf("held read after Resume: %v", err)
	}
}

// TestSuspendUnderLoad suspends and resumes while goroutines do I/O: every
// request either succeeds or is held and then succeeds, and the data is
// whole at the end.
func TestSuspendUnderLoad(t *testing.T) {
	e := newEnv(t, backends[0], 4096, diskSize, cryptodisk.Options{})
	ctx := context.Background()
	const workers = 3
	stop := make(chan struct{})
	errs := make(chan error, workers)
	model := make([]byte, diskSize)
	for g := range workers {
		go func() {
			base := int64(g) * (diskSize / workers)
			buf := make([]byte, 6000)
			got := make([]byte, 6000)
			for i := 0; ; i++ {
				select {
				case <-stop:
					errs <- nil
					return
				default:
				}
				off := base + int64(i%20)*1000 + 3
				for j := range buf {
					buf[j] = byte(i + j)
				}
				copy(model[off:], buf)
				if err := e.d.WriteAt(ctx, buf, off); err != nil {
					errs <- err
					return
				}
				if err := e.d.ReadAt(ctx, got, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, model[off:off+6000]) {
					errs <- errors.New("read after write differs")
					return
				}
			}
		}()
	}
	for i := range 10 {
		e.d.Suspend("flap")
		if i%2 == 0 {
			time.Sleep(time.Millisecond)
		}
		if err := e.d.Resume(ctx, e.keys); err != nil {
			t.Fatalf("Resume: %v", err)
		}
	}
	close(stop)
	for range workers {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	checkDisk(t, e.d, model)
}
