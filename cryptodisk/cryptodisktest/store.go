package cryptodisktest

import (
	"context"
	"fmt"
	"sync"
)

// Storage is cryptodisk.Storage, restated so this package need not import
// cryptodisk (white-box tests of cryptodisk import this package).
type Storage interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
	WriteAt(ctx context.Context, p []byte, off int64) error
	Punch(ctx context.Context, off, length int64) error
	Allocated(ctx context.Context, off, length int64, fn func(length int64, allocated bool) bool) error
	Sync(ctx context.Context) error
	Size() int64
	Grow(ctx context.Context, size int64) error
	Close() error
}

// Op names a Storage method for Hooked.
type Op int

const (
	OpRead Op = iota
	OpWrite
	OpPunch
	OpSync
)

func (o Op) String() string {
	return [...]string{"read", "write", "punch", "sync"}[o]
}

// Hooked wraps a Storage and lets a test stop or fail one kind of call.
// The embedded Storage serves everything Hooked does not override. Hooked is
// safe for concurrent use.
type Hooked struct {
	Storage

	mu    sync.Mutex
	gates map[Op]*Gate
	fail  map[Op]error
}

// Hook wraps s.
func Hook(s Storage) *Hooked {
	return &Hooked{Storage: s, gates: map[Op]*Gate{}, fail: map[Op]error{}}
}

// Gate is one armed stop: the next call of its Op closes Entered and then
// waits until Release is called (or its ctx ends) before going on to the
// store.
type Gate struct {
	// Entered is closed when a call has arrived and is waiting.
	Entered chan struct{}
	release chan struct{}
	once    sync.Once
}

// Release lets the stopped call proceed. It may be called more than once
// and before the call arrives.
func (g *Gate) Release() { g.once.Do(func() { close(g.release) }) }

// Stop arms a gate for the next call of op, replacing any armed one.
func (h *Hooked) Stop(op Op) *Gate {
	g := &Gate{Entered: make(chan struct{}), release: make(chan struct{})}
	h.mu.Lock()
	h.gates[op] = g
	h.mu.Unlock()
	return g
}

// Fail makes every later call of op fail with an error wrapping err;
// Fail(op, nil) clears it.
func (h *Hooked) Fail(op Op, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if err == nil {
		delete(h.fail, op)
	} else {
		h.fail[op] = err
	}
}

func (h *Hooked) before(ctx context.Context, op Op) error {
	h.mu.Lock()
	g := h.gates[op]
	delete(h.gates, op)
	err := h.fail[op]
	h.mu.Unlock()
	if g != nil {
		close(g.Entered)
		select {
		case <-g.release:
		case <-ctx.Done():
			return fmt.Errorf("cryptodisktest: %s stopped: %w", op, ctx.Err())
		}
	}
	if err != nil {
		return fmt.Errorf("cryptodisktest: injected %s failure: %w", op, err)
	}
	return nil
}

func (h *Hooked) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := h.before(ctx, OpRead); err != nil {
		return err
	}
	return h.Storage.ReadAt(ctx, p, off)
}

func (h *Hooked) WriteAt(ctx context.Context, p []byte, off int64) error {
	if err := h.before(ctx, OpWrite); err != nil {
		return err
	}
	return h.Storage.WriteAt(ctx, p, off)
}

func (h *Hooked) Punch(ctx context.Context, off, length int64) error {
	if err := h.before(ctx, OpPunch); err != nil {
		return err
	}
	return h.Storage.Punch(ctx, off, length)
}

func (h *Hooked) Sync(ctx context.Context) error {
	if err := h.before(ctx, OpSync); err != nil {
		return err
	}
	return h.Storage.Sync(ctx)
}
