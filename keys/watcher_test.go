package keys_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/cryptnbd/cryptnbd/keys"
)

// disk is a fake Target whose Resume re-unwraps its secret through the
// provider, as a real disk does.
type disk struct {
	k       *keys.KeyVault
	kid     string
	alg     string
	wrapped []byte
	secret  []byte

	mu         sync.Mutex
	suspended  bool
	reasons    []string // every Suspend call's reason
	resumes    int      // successful Resume calls
	failResume int      // Resume calls still to fail
}

func newDisk(t *testing.T, k *keys.KeyVault) *disk {
	t.Helper()
	d := &disk{k: k, secret: randBytes(32)}
	var err error
	if d.kid, d.alg, d.wrapped, err = k.Wrap(context.Background(), d.secret, nil); err != nil {
		t.Fatalf("Wrap: %v", err)
	}
	return d
}

func (d *disk) Suspend(reason string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.suspended = true
	d.reasons = append(d.reasons, reason)
}

func (d *disk) Resume(ctx context.Context) error {
	d.mu.Lock()
	fail := d.failResume > 0
	if fail {
		d.failResume--
	}
	d.mu.Unlock()
	if fail {
		return errors.New("injected resume failure")
	}
	got, err := d.k.Unwrap(ctx, d.kid, d.alg, d.wrapped, nil)
	if err != nil {
		return err
	}
	if !bytes.Equal(got, d.secret) {
		return errors.New("unwrapped other bytes")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.suspended = false
	d.resumes++
	return nil
}

// status returns whether d is suspended, its last reason and resume count.
func (d *disk) status() (bool, string, int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	last := ""
	if len(d.reasons) > 0 {
		last = d.reasons[len(d.reasons)-1]
	}
	return d.suspended, last, d.resumes
}

// waitFor polls cond until it holds or a generous deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func waitSuspended(t *testing.T, reason string, ds ...*disk) {
	t.Helper()
	for i, d := range ds {
		waitFor(t, fmt.Sprintf("disk %d suspended with %s", i, reason), func() bool {
			s, r, _ := d.status()
			return s && r == reason
		})
	}
}

func waitResumed(t *testing.T, ds ...*disk) {
	t.Helper()
	for i, d := range ds {
		waitFor(t, fmt.Sprintf("disk %d resumed", i), func() bool {
			s, _, _ := d.status()
			return !s
		})
	}
}

// events records watch events.
type events struct {
	mu  sync.Mutex
	evs []keys.WatchEvent
}

func (e *events) add(ev keys.WatchEvent) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.evs = append(e.evs, ev)
}

func (e *events) count(kind string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := 0
	for _, ev := range e.evs {
		if ev.Kind == kind {
			n++
		}
	}
	return n
}

func (e *events) last(kind string) (keys.WatchEvent, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for i := len(e.evs) - 1; i >= 0; i-- {
		if e.evs[i].Kind == kind {
			return e.evs[i], true
		}
	}
	return keys.WatchEvent{}, false
}

// runWatcher runs w until the test ends.
func runWatcher(t *testing.T, w *keys.Watcher) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}

func wantState(t *testing.T, w *keys.Watcher, kid, status, reason string) {
	t.Helper()
	waitFor(t, "state "+status+"/"+reason, func() bool {
		s, ok := w.State(kid)
		return ok && s.Status == status && s.Reason == reason
	})
}

func TestWatcherRevocation(t *testing.T) {
	t.Parallel()
	v := startVault(t, true)
	des := v.in.NewPrincipal(t, "des", desPermissions...)
	kid := v.createKey(t, "kek", 2048)
	k := v.provider(t, v.in.URL+"/keys/kek", des.ObjectID)
	d1, d2 := newDisk(t, k), newDisk(t, k)
	var ev events
	w := keys.NewWatcher(keys.WatcherOptions{Interval: 100 * time.Millisecond, ProbeInterval: 200 * time.Millisecond, Grace: time.Hour, OnEvent: ev.add})
	w.Watch(kid, k, d1)
	w.Watch(kid, k, d2)
	runWatcher(t, w)
	waitFor(t, "a successful probe", func() bool { e, ok := ev.last(keys.EventProbe); return ok && e.Err == nil })
	if s, _, _ := d1.status(); s {
		t.Fatalf("disk suspended while the key is fine")
	}

	t.Run("disable and enable", func(t *testing.T) {
		v.setEnabled(t, kid, false)
		waitSuspended(t, keys.ReasonKeyDisabled, d1, d2)
		wantState(t, w, kid, keys.WatchRevoked, keys.ReasonKeyDisabled)
		if e, ok := ev.last(keys.EventSuspend); !ok || e.Reason != keys.ReasonKeyDisabled {
			t.Errorf("last suspend event %+v", e)
		}
		d2.mu.Lock()
		d2.failResume = 1 // d2's first Resume fails: it must be retried
		d2.mu.Unlock()
		v.setEnabled(t, kid, true)
		waitResumed(t, d1, d2)
		wantState(t, w, kid, keys.WatchOK, "")
		if e, ok := ev.last(keys.EventResume); !ok || e.Err != nil {
			t.Errorf("last resume event %+v", e)
		}
	})
	t.Run("unwrapKey removed", func(t *testing.T) {
		v.setPolicy(t, des.ObjectID, "get", "wrapKey")
		waitSuspended(t, "AccessDenied", d1, d2)
		s, _ := w.State(kid)
		if s.Status != keys.WatchRevoked || s.LastError == "" {
			t.Errorf("State = %+v", s)
		}
		v.setPolicy(t, des.ObjectID, desPermissions...)
		waitResumed(t, d1, d2)
	})
	t.Run("delete and recover", func(t *testing.T) {
		ctx := context.Background()
		if _, err := v.admin.DeleteKey(ctx, "kek", nil); err != nil {
			t.Fatal(err)
		}
		waitSuspended(t, "KeyNotFound", d1, d2)
		if _, err := v.admin.RecoverDeletedKey(ctx, "kek", nil); err != nil {
			t.Fatal(err)
		}
		waitResumed(t, d1, d2)
	})
	_, _, r1 := d1.status()
	_, _, r2 := d2.status()
	if r1 != 3 || r2 != 3 {
		t.Errorf("successful resumes %d, %d; want 3 each", r1, r2)
	}
}

func TestWatcherGrace(t *testing.T) {
	t.Parallel()
	v := startVault(t, true)
	des := v.in.NewPrincipal(t, "des", desPermissions...)
	kid := v.createKey(t, "kek", 2048)
	k := v.provider(t, kid, des.ObjectID)
	short, long := newDisk(t, k), newDisk(t, k)
	var shortEv, longEv events
	ws := keys.NewWatcher(keys.WatcherOptions{Interval: 100 * time.Millisecond, ProbeInterval: 100 * time.Millisecond, Grace: 300 * time.Millisecond, OnEvent: shortEv.add})
	wl := keys.NewWatcher(keys.WatcherOptions{Interval: 100 * time.Millisecond, ProbeInterval: 100 * time.Millisecond, Grace: time.Hour, OnEvent: longEv.add})
	ws.Watch(kid, k, short)
	wl.Watch(kid, k, long)
	runWatcher(t, ws)
	runWatcher(t, wl)
	waitFor(t, "first checks", func() bool { return shortEv.count(keys.EventCheck) > 0 && longEv.count(keys.EventCheck) > 0 })

	ctx := context.Background()
	if err := v.in.Admin.SetOutage(ctx, true); err != nil {
		t.Fatal(err)
	}
	waitSuspended(t, keys.ReasonKeyVaultUnreachable, short)
	wantState(t, ws, kid, keys.WatchUnreachable, keys.ReasonKeyVaultUnreachable)
	if s, _ := ws.State(kid); s.GraceRemaining != 0 || s.LastError == "" {
		t.Errorf("short-grace State = %+v, want no grace left and the error", s)
	}
	// With an hour of grace the disk serves through the outage.
	waitFor(t, "three transient failures", func() bool { return longEv.count(keys.EventTransient) >= 3 })
	if s, _, _ := long.status(); s {
		t.Errorf("disk suspended within its grace period")
	}
	s, _ := wl.State(kid)
	if s.Status != keys.WatchUnreachable || s.Reason != "" || s.GraceRemaining <= 0 || s.GraceRemaining > time.Hour {
		t.Errorf("long-grace State = %+v", s)
	}
	if e, _ := longEv.last(keys.EventTransient); keys.Classify(e.Err) != keys.ClassTransient || e.GraceRemaining <= 0 {
		t.Errorf("transient event %+v", e)
	}

	if err := v.in.Admin.SetOutage(ctx, false); err != nil {
		t.Fatal(err)
	}
	waitResumed(t, short)
	wantState(t, ws, kid, keys.WatchOK, "")
	wantState(t, wl, kid, keys.WatchOK, "")
	if _, reason, _ := long.status(); reason != "" {
		t.Errorf("long-grace disk was suspended (%s)", reason)
	}
}

func TestWatcherNewVersionAndRecheck(t *testing.T) {
	t.Parallel()
	v := startVault(t, true)
	des := v.in.NewPrincipal(t, "des", desPermissions...)
	kid := v.createKey(t, "kek", 2048)
	k := v.provider(t, v.in.URL+"/keys/kek", des.ObjectID)
	d := newDisk(t, k)
	var ev events
	var mu sync.Mutex
	var seen [][2]string
	// An interval of an hour: only Recheck makes checks after the first.
	w := keys.NewWatcher(keys.WatcherOptions{Interval: time.Hour, OnEvent: ev.add, OnNewVersion: func(kid, latest string) {
		mu.Lock()
		defer mu.Unlock()
		seen = append(seen, [2]string{kid, latest})
	}})
	stop := w.Watch(kid, k, d)
	runWatcher(t, w)
	waitFor(t, "first check", func() bool { return ev.count(keys.EventProbe) >= 1 })

	latest := v.rotate(t, "kek")
	n := ev.count(keys.EventCheck)
	w.Recheck(kid)
	waitFor(t, "OnNewVersion", func() bool { mu.Lock(); defer mu.Unlock(); return len(seen) == 1 })
	w.Recheck(kid)
	waitFor(t, "another check", func() bool { return ev.count(keys.EventCheck) >= n+2 })
	mu.Lock()
	if len(seen) != 1 || seen[0] != [2]string{kid, latest} {
		t.Errorf("OnNewVersion calls %v, want one (%s, %s)", seen, kid, latest)
	}
	mu.Unlock()
	if e, ok := ev.last(keys.EventNewVersion); !ok || e.Reason != latest {
		t.Errorf("new-version event %+v", e)
	}

	v.setEnabled(t, kid, false)
	w.Recheck(kid)
	waitSuspended(t, keys.ReasonKeyDisabled, d)

	stop()
	stop()
	if _, ok := w.State(kid); ok {
		t.Errorf("State still known after the last disk was unregistered")
	}
	v.setEnabled(t, kid, true)
	w.Recheck(kid) // unknown now: ignored
	time.Sleep(200 * time.Millisecond)
	if _, _, r := d.status(); r != 0 {
		t.Errorf("%d resumes of an unregistered disk", r)
	}

	// Registering again starts afresh with a check.
	n = ev.count(keys.EventCheck)
	w.Watch(kid, k, newDisk(t, k))
	waitFor(t, "a check of the re-registered key", func() bool { return ev.count(keys.EventCheck) > n })
	wantState(t, w, kid, keys.WatchOK, "")
}

func TestWatcherExpiry(t *testing.T) {
	t.Parallel()
	v := startVault(t, true)
	des := v.in.NewPrincipal(t, "des", desPermissions...)
	kid := v.createKey(t, "kek", 2048)
	k := v.provider(t, kid, des.ObjectID)
	alert, strict := newDisk(t, k), newDisk(t, k)
	var alertEv events
	wa := keys.NewWatcher(keys.WatcherOptions{Interval: 100 * time.Millisecond, OnEvent: alertEv.add})
	wsx := keys.NewWatcher(keys.WatcherOptions{Interval: 100 * time.Millisecond, SuspendOnExpiry: true})
	wa.Watch(kid, k, alert)
	wsx.Watch(kid, k, strict)
	runWatcher(t, wa)
	runWatcher(t, wsx)

	setExp := func(exp time.Time) {
		t.Helper()
		_, err := v.admin.UpdateKey(context.Background(), "kek", versionOf(kid), azkeys.UpdateKeyParameters{
			KeyAttributes: &azkeys.KeyAttributes{Expires: &exp},
		}, nil)
		if err != nil {
			t.Fatal(err)
		}
	}
	setExp(time.Now().Add(-time.Minute))
	waitSuspended(t, keys.ReasonKeyExpired, strict)
	wantState(t, wsx, kid, keys.WatchExpired, keys.ReasonKeyExpired)
	wantState(t, wa, kid, keys.WatchExpired, "")
	waitFor(t, "expired event", func() bool { return alertEv.count(keys.EventExpired) == 1 })
	if s, _, _ := alert.status(); s {
		t.Errorf("expiry suspended a disk outside strict mode")
	}

	setExp(time.Now().Add(time.Hour))
	waitResumed(t, strict)
	wantState(t, wsx, kid, keys.WatchOK, "")
	wantState(t, wa, kid, keys.WatchOK, "")
	if n := alertEv.count(keys.EventExpired); n != 1 {
		t.Errorf("%d expired events, want 1", n)
	}
}

// checkerFunc is a Checker for tests of the watcher's own logic.
type checkerFunc struct {
	status func() (keys.KeyStatus, error)
}

func (c checkerFunc) Status(context.Context, string) (keys.KeyStatus, error) { return c.status() }
func (c checkerFunc) Probe(context.Context, string) error                    { return nil }

func TestWatcherRun(t *testing.T) {
	t.Parallel()
	w := keys.NewWatcher(keys.WatcherOptions{Interval: 10 * time.Millisecond})
	var mu sync.Mutex
	calls := 0
	c := checkerFunc{status: func() (keys.KeyStatus, error) {
		mu.Lock()
		defer mu.Unlock()
		calls++
		return keys.KeyStatus{Enabled: true}, nil
	}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	// Registered after Run started: checked all the same.
	w.Watch("kid-a", c, &disk{})
	waitFor(t, "checks", func() bool { mu.Lock(); defer mu.Unlock(); return calls >= 3 })
	waitFor(t, "second Run refused", func() bool { return w.Run(context.Background()) != nil })
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run = %v", err)
	}
	mu.Lock()
	n := calls
	mu.Unlock()
	time.Sleep(50 * time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	if calls != n {
		t.Errorf("checks continued after Run returned: %d → %d", n, calls)
	}
}
