package keys

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"
)

// Target is what the watcher suspends and resumes: a disk, adapted by the
// daemon. Suspend must be idempotent; it may be called again with a new
// reason while suspended. Resume re-unwraps the disk's key and returns an
// error if that fails, in which case the disk stays suspended and Resume is
// tried again at the next check. The watcher never calls one Target
// concurrently with itself.
type Target interface {
	Suspend(reason string)
	Resume(ctx context.Context) error
}

// Checker is the key service seen by the watcher; *KeyVault satisfies it.
// Status is a cheap metadata read; Probe is a real unwrap, the only check
// that sees a removed unwrap permission.
type Checker interface {
	Status(ctx context.Context, kid string) (KeyStatus, error)
	Probe(ctx context.Context, kid string) error
}

// Watch statuses, as in KeyWatchState.Status.
const (
	WatchOK          = "OK"
	WatchRevoked     = "Revoked"
	WatchUnreachable = "Unreachable"
	WatchExpired     = "Expired"
)

// Suspend reasons the watcher makes up itself; the others are Key Vault's
// error codes (KeyDisabled, AccessDenied, KeyNotFound, ForbiddenByRbac...).
const (
	ReasonKeyDisabled         = "KeyDisabled"
	ReasonKeyVaultUnreachable = "KeyVaultUnreachable"
	ReasonKeyExpired          = "KeyExpired"
)

// Watch event kinds.
const (
	EventCheck      = "check"
	EventProbe      = "probe"
	EventSuspend    = "suspend"
	EventResume     = "resume"
	EventExpired    = "expired"
	EventNewVersion = "new-version"
	EventTransient  = "transient"
)

const (
	defaultCheckInterval = 30 * time.Second
	defaultProbeInterval = 5 * time.Minute
	defaultGrace         = time.Hour
	// checkTimeout only guards against a Checker that hangs; KeyVault
	// bounds each of its calls by its own CallTimeout.
	checkTimeout = 2 * time.Minute
)

// WatcherOptions configure a Watcher.
//
// Throttling budget: checks are per key version (vault/key/version), not
// per disk, so a host with any number of disks on one version costs one
// GET (plus one version listing or latest-version GET) per Interval and one
// unwrapKey per ProbeInterval. With the defaults that is well under one
// request per second per version, against Key Vault's per-vault limits of
// thousands of requests per 10 seconds; a throttled check (429) waits at
// least the Retry-After it was given.
type WatcherOptions struct {
	// Interval between GETs of each key version (--key-check-interval);
	// default 30s.
	Interval time.Duration
	// ProbeInterval between real unwraps of each key version; default 5m.
	// While a version's disks are suspended every check probes.
	ProbeInterval time.Duration
	// Grace is how long transient failures are tolerated since the last
	// successful check before the disks fail closed (suspend with reason
	// KeyVaultUnreachable); default 1h.
	Grace time.Duration
	// SuspendOnExpiry is strict mode: an expired key version suspends its
	// disks (reason KeyExpired). Otherwise expiry only alerts (a log and an
	// "expired" event), since Key Vault still unwraps with expired keys.
	SuspendOnExpiry bool
	// Logger receives state changes at Warn/Info and checks at Debug.
	Logger *slog.Logger
	// OnEvent, if set, receives every check result and state change, for
	// audit and metrics. It is called from the checking goroutines and must
	// be fast and safe for concurrent use.
	OnEvent func(e WatchEvent)
	// OnNewVersion, if set, is called once for each newer enabled version
	// seen (latest differs from kid), for automatic rotation. Same rules as
	// OnEvent.
	OnNewVersion func(kid, latest string)
}

// WatchEvent is one check result or state change of a key version.
type WatchEvent struct {
	KeyID string
	// Kind is check, probe, suspend, resume, expired, new-version or
	// transient.
	Kind string
	// Reason is the suspend reason (suspend, transient), or the new
	// version's kid (new-version).
	Reason string
	// Err is the failure of a check, probe or Resume; nil on success.
	Err error
	// Latency of the check or probe.
	Latency time.Duration
	// GraceRemaining is how long disks keep serving through transient
	// failures (transient events).
	GraceRemaining time.Duration
}

// KeyWatchState is the watcher's view of one key version.
type KeyWatchState struct {
	// Status is OK, Revoked, Unreachable (transient failures; disks serve
	// until GraceRemaining is zero) or Expired.
	Status string
	// Reason is the suspend reason while disks are suspended, else "".
	Reason      string
	LastSuccess time.Time
	// GraceRemaining is the full Grace while checks succeed, what is left
	// of it during transient failures, and zero once disks are suspended.
	GraceRemaining time.Duration
	// LastError is the last failure of a check, probe or Resume, if the
	// last check was not a clean success.
	LastError string
}

// Watcher periodically checks the key versions that disks are wrapped
// under and suspends the disks when access to their key is revoked, or
// unreachable for longer than the grace period, and resumes them when
// checks succeed again. All its methods are safe for concurrent use.
// While Run runs, each watched key version has one goroutine with a timer;
// it exits when the last disk under the version is unregistered or Run's
// context ends.
type Watcher struct {
	o   WatcherOptions
	log *slog.Logger

	mu      sync.Mutex // guards kids, running and each watchedKey's shared fields
	kids    map[string]*watchedKey
	running bool
	wake    chan struct{} // cap 1: a key version was added while running
	nextID  uint64
}

// watchedKey is one key version and its disks.
type watchedKey struct {
	kid     string
	checker Checker
	recheck chan struct{} // cap 1
	done    chan struct{} // closed when the last target is removed

	// Guarded by Watcher.mu.
	targets     map[uint64]*watchTarget
	started     bool
	state       KeyWatchState
	lastSuccess time.Time

	// Owned by the key's goroutine.
	lastProbe     time.Time
	lastLatest    string
	expiredSeen   bool
	suspendReason string // "" while serving
}

// watchTarget serialises calls into one Target; removed is set under mu by
// the stop function so that no call starts after it returns.
type watchTarget struct {
	t         Target
	mu        sync.Mutex
	removed   bool
	suspended bool
	reason    string
}

// NewWatcher returns a Watcher; call Run to start checking.
func NewWatcher(o WatcherOptions) *Watcher {
	if o.Interval <= 0 {
		o.Interval = defaultCheckInterval
	}
	if o.ProbeInterval <= 0 {
		o.ProbeInterval = defaultProbeInterval
	}
	if o.Grace <= 0 {
		o.Grace = defaultGrace
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return &Watcher{o: o, log: o.Logger, kids: map[string]*watchedKey{}, wake: make(chan struct{}, 1)}
}

// Watch registers a disk t wrapped under the versioned key kid, checked
// with c (the first Checker registered for a kid is the one used). The
// key version is checked immediately if Run is running. stop unregisters
// the disk: no Suspend or Resume starts after it returns (it waits for one
// in flight, so do not call it from inside them). stop is idempotent.
func (w *Watcher) Watch(kid string, c Checker, t Target) (stop func()) {
	wt := &watchTarget{t: t}
	w.mu.Lock()
	e := w.kids[kid]
	existed := e != nil
	if e == nil {
		e = &watchedKey{
			kid: kid, checker: c, recheck: make(chan struct{}, 1), done: make(chan struct{}),
			targets: map[uint64]*watchTarget{}, lastSuccess: time.Now(),
		}
		e.state = KeyWatchState{Status: WatchOK, LastSuccess: e.lastSuccess}
		w.kids[kid] = e
	}
	w.nextID++
	id := w.nextID
	e.targets[id] = wt
	w.mu.Unlock()
	if existed {
		w.signal(e) // a new key version is checked at once anyway
	} else {
		w.wakeRun()
	}

	var once sync.Once
	return func() {
		once.Do(func() {
			wt.mu.Lock()
			wt.removed = true
			wt.mu.Unlock()
			w.mu.Lock()
			defer w.mu.Unlock()
			delete(e.targets, id)
			if len(e.targets) == 0 && w.kids[kid] == e {
				delete(w.kids, kid)
				close(e.done)
			}
		})
	}
}

// signal asks for an immediate check of e, and wakes Run to start e's
// goroutine if needed.
func (w *Watcher) signal(e *watchedKey) {
	select {
	case e.recheck <- struct{}{}:
	default:
	}
	w.wakeRun()
}

// wakeRun makes Run look for key versions without a goroutine.
func (w *Watcher) wakeRun() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// Recheck checks the key version kid now, probe included, e.g. after a
// 403 or 404 seen on the data path or on an admin's request. It does not
// wait for the check; an unknown kid is ignored.
func (w *Watcher) Recheck(kid string) {
	w.mu.Lock()
	e := w.kids[kid]
	w.mu.Unlock()
	if e != nil {
		w.signal(e)
	}
}

// State returns the watcher's view of kid, and false if no disk is
// registered under it.
func (w *Watcher) State(kid string) (KeyWatchState, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	e := w.kids[kid]
	if e == nil {
		return KeyWatchState{}, false
	}
	s := e.state
	switch {
	case e.suspendReason != "":
		s.GraceRemaining = 0
	case s.Status == WatchUnreachable:
		s.GraceRemaining = max(0, w.o.Grace-time.Since(e.lastSuccess))
	default:
		s.GraceRemaining = w.o.Grace
	}
	return s, true
}

var errWatcherRunning = errors.New("keys: watcher is already running")

// Run checks every registered key version until ctx is done, then waits
// for its goroutines and returns nil. It may be called again after it
// returns, but not concurrently.
func (w *Watcher) Run(ctx context.Context) error {
	w.mu.Lock()
	if w.running {
		w.mu.Unlock()
		return errWatcherRunning
	}
	w.running = true
	w.mu.Unlock()
	var wg sync.WaitGroup
	defer func() {
		wg.Wait()
		w.mu.Lock()
		defer w.mu.Unlock()
		w.running = false
		for _, e := range w.kids {
			e.started = false
		}
	}()
	for {
		w.mu.Lock()
		for _, e := range w.kids {
			if !e.started {
				e.started = true
				wg.Go(func() { w.loop(ctx, e) })
			}
		}
		w.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil
		case <-w.wake:
		}
	}
}

// loop checks one key version at once and then on its timer or on
// Recheck, until the version is unregistered or ctx is done.
func (w *Watcher) loop(ctx context.Context, e *watchedKey) {
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		forced := false
		select {
		case <-ctx.Done():
			return
		case <-e.done:
			return
		case <-timer.C:
		case <-e.recheck:
			forced = true
		}
		timer.Reset(w.check(ctx, e, forced))
	}
}

// reasonOf is the suspend reason for a revoked-class error.
func reasonOf(err error) string {
	var ve *VaultError
	switch {
	case errors.As(err, &ve):
		return ve.Reason()
	case errors.Is(err, ErrKeyDisabled):
		return ReasonKeyDisabled
	case errors.Is(err, ErrKeyNotFound):
		return "KeyNotFound"
	}
	return "AccessDenied"
}

// check runs one check of e and acts on it; it returns the delay until the
// next one.
func (w *Watcher) check(ctx context.Context, e *watchedKey, forced bool) time.Duration {
	ctx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()
	log := w.log.With("kid", e.kid)

	start := time.Now()
	st, err := e.checker.Status(ctx, e.kid)
	w.event(WatchEvent{KeyID: e.kid, Kind: EventCheck, Err: err, Latency: time.Since(start)})
	if ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return w.o.Interval // shutting down
	}
	revoked := ""
	switch {
	case err != nil:
		if Classify(err) == ClassRevoked {
			revoked = reasonOf(err)
		}
	case !st.Enabled:
		revoked, err = ReasonKeyDisabled, ErrKeyDisabled
	case forced || e.suspendReason != "" || time.Since(e.lastProbe) >= w.o.ProbeInterval:
		start := time.Now()
		err = e.checker.Probe(ctx, e.kid)
		w.event(WatchEvent{KeyID: e.kid, Kind: EventProbe, Err: err, Latency: time.Since(start)})
		if err == nil {
			e.lastProbe = time.Now()
		} else if Classify(err) == ClassRevoked {
			revoked = reasonOf(err)
		}
	}
	if ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return w.o.Interval
	}
	log.Debug("key check", "err", err, "revoked", revoked)

	switch {
	case revoked != "":
		w.suspendAll(ctx, e, WatchRevoked, revoked, err)
		return w.o.Interval
	case err != nil:
		return w.failed(ctx, e, err)
	}

	now := time.Now()
	expired := !st.Expires.IsZero() && !now.Before(st.Expires)
	if expired && !e.expiredSeen {
		log.Warn("key version expired; Key Vault still unwraps with it, rotate the key", "expires", st.Expires, "suspend", w.o.SuspendOnExpiry)
		w.event(WatchEvent{KeyID: e.kid, Kind: EventExpired, Reason: ReasonKeyExpired})
	}
	e.expiredSeen = expired
	if st.Latest != "" && st.Latest != e.kid && st.Latest != e.lastLatest {
		e.lastLatest = st.Latest
		log.Info("newer key version available", "latest", st.Latest)
		w.event(WatchEvent{KeyID: e.kid, Kind: EventNewVersion, Reason: st.Latest})
		if w.o.OnNewVersion != nil {
			w.o.OnNewVersion(e.kid, st.Latest)
		}
	}
	w.mu.Lock()
	e.lastSuccess, e.state.LastSuccess = now, now
	w.mu.Unlock()
	if expired && w.o.SuspendOnExpiry {
		w.suspendAll(ctx, e, WatchExpired, ReasonKeyExpired, nil)
		return w.o.Interval
	}
	status := WatchOK
	if expired {
		status = WatchExpired
	}
	w.resumeAll(ctx, e, status)
	return w.o.Interval
}

// failed handles a transient (or unclassified) failure: disks keep serving
// until Grace has passed since the last success. A revoked or expired
// verdict stands until a check succeeds.
func (w *Watcher) failed(ctx context.Context, e *watchedKey, err error) time.Duration {
	w.mu.Lock()
	remaining := max(0, w.o.Grace-time.Since(e.lastSuccess))
	if e.suspendReason != "" && e.suspendReason != ReasonKeyVaultUnreachable {
		e.state.LastError = err.Error()
		w.mu.Unlock()
		return w.o.Interval
	}
	e.state.Status, e.state.LastError = WatchUnreachable, err.Error()
	w.mu.Unlock()
	w.event(WatchEvent{KeyID: e.kid, Kind: EventTransient, Reason: ReasonKeyVaultUnreachable, Err: err, GraceRemaining: remaining})
	if remaining == 0 {
		w.suspendAll(ctx, e, WatchUnreachable, ReasonKeyVaultUnreachable, err)
		return w.retryDelay(w.o.Interval, err)
	}
	w.log.Debug("key vault unreachable; serving on grace", "kid", e.kid, "graceRemaining", remaining, "err", err)
	return w.retryDelay(min(w.o.Interval, remaining), err)
}

// retryDelay stretches d to a Retry-After the vault asked for.
func (w *Watcher) retryDelay(d time.Duration, err error) time.Duration {
	var ve *VaultError
	if errors.As(err, &ve) && ve.RetryAfter > d {
		return ve.RetryAfter
	}
	return d
}

// targets snapshots e's targets.
func (w *Watcher) targets(e *watchedKey) []*watchTarget {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make([]*watchTarget, 0, len(e.targets))
	for _, t := range e.targets {
		out = append(out, t)
	}
	return out
}

// suspendAll suspends every target of e with reason.
func (w *Watcher) suspendAll(_ context.Context, e *watchedKey, status, reason string, cause error) {
	changed := false
	for _, t := range w.targets(e) {
		t.mu.Lock()
		if !t.removed && (!t.suspended || t.reason != reason) {
			t.t.Suspend(reason)
			t.suspended, t.reason = true, reason
			changed = true
		}
		t.mu.Unlock()
	}
	w.mu.Lock()
	e.suspendReason = reason
	e.state.Status, e.state.Reason = status, reason
	if cause != nil {
		e.state.LastError = cause.Error()
	} else {
		e.state.LastError = ""
	}
	w.mu.Unlock()
	if changed {
		w.log.Warn("disks suspended: key unavailable", "kid", e.kid, "reason", reason, "err", cause)
		w.event(WatchEvent{KeyID: e.kid, Kind: EventSuspend, Reason: reason, Err: cause})
	}
}

// resumeAll resumes every suspended target of e after a successful check
// and probe; a target whose Resume fails stays suspended for the next check.
func (w *Watcher) resumeAll(ctx context.Context, e *watchedKey, status string) {
	var firstErr error
	resumed := 0
	for _, t := range w.targets(e) {
		t.mu.Lock()
		if !t.removed && t.suspended {
			if err := t.t.Resume(ctx); err != nil {
				w.event(WatchEvent{KeyID: e.kid, Kind: EventResume, Reason: t.reason, Err: err})
				if firstErr == nil {
					firstErr = err
				}
			} else {
				t.suspended, t.reason = false, ""
				resumed++
			}
		}
		t.mu.Unlock()
	}
	w.mu.Lock()
	wasReason := e.suspendReason
	if firstErr != nil {
		// The key is fine but some disks are still down: keep probing.
		e.state.Status, e.state.LastError = status, "resume: "+firstErr.Error()
		w.mu.Unlock()
		w.log.Warn("disk resume failed; retrying at the next check", "kid", e.kid, "err", firstErr)
		return
	}
	e.suspendReason = ""
	e.state.Status, e.state.Reason, e.state.LastError = status, "", ""
	w.mu.Unlock()
	if wasReason != "" || resumed > 0 {
		w.log.Info("disks resumed: key available again", "kid", e.kid, "was", wasReason, "disks", resumed)
		w.event(WatchEvent{KeyID: e.kid, Kind: EventResume, Reason: wasReason})
	}
}

func (w *Watcher) event(ev WatchEvent) {
	if w.o.OnEvent != nil {
		w.o.OnEvent(ev)
	}
}
