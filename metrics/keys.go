package metrics

import (
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// PlatformVault is the vault label of platform-managed keys.
const PlatformVault = "platform"

// KeyLabels returns the vault and key labels for a key id:
// https://{vault}/keys/{name}[/{version}] gives the lower-cased host and
// the name, platform:keys/{name}/{version} gives "platform" and the name.
// Versions are dropped so that rotation does not add series. Anything
// else gives "unknown", "unknown".
func KeyLabels(kid string) (vault, key string) {
	if rest, ok := strings.CutPrefix(kid, PlatformVault+":keys/"); ok {
		name, _, _ := strings.Cut(rest, "/")
		if name != "" {
			return PlatformVault, name
		}
		return "unknown", "unknown"
	}
	u, err := url.Parse(kid)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return "unknown", "unknown"
	}
	segs := strings.Split(strings.Trim(u.Path, "/"), "/")
	if len(segs) < 2 || segs[0] != "keys" || segs[1] == "" {
		return "unknown", "unknown"
	}
	return strings.ToLower(u.Host), segs[1]
}

// VaultObserver returns a hook for keys.KeyVaultOptions.Observe that
// counts each Key Vault operation of one key by op and final HTTP status
// and records its duration. Give each disk encryption set (vault, key)
// its own.
func (m *Metrics) VaultObserver(vault, key string) func(op string, status int, d time.Duration) {
	return func(op string, status int, d time.Duration) {
		m.kvRequests.WithLabelValues(vault, key, op, strconv.Itoa(status)).Inc()
		m.kvDuration.WithLabelValues(vault, key, op).Observe(d.Seconds())
	}
}

// DEKUnwrapped counts one unwrap of a disk's key under (vault, key), when a
// disk is opened or resumed. Platform keys use vault PlatformVault.
func (m *Metrics) DEKUnwrapped(vault, key string) {
	m.unwraps.WithLabelValues(vault, key).Inc()
}

// Key statuses as exported in cryptnbd_key_status.
const (
	keyOK          = "ok"
	keyRevoked     = "revoked"
	keyUnreachable = "unreachable"
	keyExpired     = "expired"
)

var keyStatuses = []string{keyOK, keyRevoked, keyUnreachable, keyExpired}

// Watcher event kinds and suspend reasons that KeyEvent understands
// (keys.Event*, keys.Reason*), repeated here so as not to import keys.
const (
	eventCheck     = "check"
	eventProbe     = "probe"
	eventSuspend   = "suspend"
	eventResume    = "resume"
	eventExpired   = "expired"
	eventTransient = "transient"

	reasonUnreachable = "KeyVaultUnreachable"
	reasonExpired     = "KeyExpired"
)

// KeyEvent feeds one revocation watcher event (keys.WatchEvent: Kind,
// Reason, GraceRemaining, Err) for the key (vault, key) into
// cryptnbd_key_status, cryptnbd_key_last_success_timestamp_seconds and
// cryptnbd_key_grace_remaining_seconds:
//
//   - check or probe without error: a success; the status becomes ok (or
//     expired) unless the key's disks are suspended.
//   - transient: unreachable, serving on grace for graceRemaining more.
//   - suspend: revoked, or unreachable (reason KeyVaultUnreachable) or
//     expired (reason KeyExpired); grace is 0 until a resume.
//   - resume without error: ok (or expired) again.
//   - expired: the key version has expired (Key Vault still unwraps).
//
// Other kinds, and failed checks, probes and resumes (which the watcher
// follows with a transient or suspend event), change nothing.
func (m *Metrics) KeyEvent(vault, key string, kind, reason string, graceRemaining time.Duration, err error) {
	m.keys.event(time.Now(), vault, key, kind, reason, graceRemaining, err)
}

// KeyExpiry sets when (vault, key)'s current version expires, as
// cryptnbd_key_expiry_timestamp_seconds; the zero time means it never
// does. A time in the future also clears an expired status, since the
// watcher does not report un-expiring.
func (m *Metrics) KeyExpiry(vault, key string, t time.Time) {
	m.keys.expiry(time.Now(), vault, key, t)
}

// SetKeyGrace tells the collector the watcher's grace period
// (--key-grace), which cryptnbd_key_grace_remaining_seconds shows while a
// key is healthy. Without it the gauge is exported only while a key is
// unreachable or suspended.
func (m *Metrics) SetKeyGrace(grace time.Duration) {
	m.keys.mu.Lock()
	m.keys.grace = grace
	m.keys.mu.Unlock()
}

var (
	descKeyStatus = prometheus.NewDesc(namespace+"_key_status",
		"1 for the key's status as the revocation watcher sees it (ok, revoked, unreachable, expired), 0 for the others.",
		[]string{"vault", "key", "status"}, nil)
	descKeyLastSuccess = prometheus.NewDesc(namespace+"_key_last_success_timestamp_seconds",
		"Unix time of the key's last successful check, probe or resume.",
		[]string{"vault", "key"}, nil)
	descKeyGrace = prometheus.NewDesc(namespace+"_key_grace_remaining_seconds",
		"How much longer the key's disks keep serving while Key Vault is unreachable; 0 once they are suspended.",
		[]string{"vault", "key"}, nil)
	descKeyExpiry = prometheus.NewDesc(namespace+"_key_expiry_timestamp_seconds",
		"Unix time at which the key's current version expires; absent when it never does.",
		[]string{"vault", "key"}, nil)
)

type keyLabels struct{ vault, key string }

// keyState is what the watcher's events told about one key.
type keyState struct {
	status      string // "" until the first event that decides it
	suspended   bool   // its disks are suspended
	expired     bool
	lastSuccess time.Time
	deadline    time.Time // grace runs out, while unreachable and serving
	expiry      time.Time
}

// keyCollector turns key events into gauges at scrape time, so the grace
// gauge counts down between events. Its mutex guards everything in it;
// events are rare (one per check), so one lock is plenty.
type keyCollector struct {
	mu    sync.Mutex
	grace time.Duration
	keys  map[keyLabels]*keyState
}

func newKeyCollector() *keyCollector {
	return &keyCollector{keys: map[keyLabels]*keyState{}}
}

func (c *keyCollector) stateLocked(vault, key string) *keyState {
	k := keyLabels{vault, key}
	s := c.keys[k]
	if s == nil {
		s = &keyState{}
		c.keys[k] = s
	}
	return s
}

// healthy is the status of a key that checks fine.
func (s *keyState) healthy() string {
	if s.expired {
		return keyExpired
	}
	return keyOK
}

func (c *keyCollector) event(now time.Time, vault, key, kind, reason string, grace time.Duration, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.stateLocked(vault, key)
	switch kind {
	case eventCheck, eventProbe:
		if err != nil || s.suspended {
			return
		}
		s.status, s.lastSuccess = s.healthy(), now
	case eventTransient:
		if s.suspended {
			return
		}
		s.status, s.deadline = keyUnreachable, now.Add(max(grace, 0))
	case eventSuspend:
		s.suspended = true
		switch reason {
		case reasonUnreachable:
			s.status = keyUnreachable
		case reasonExpired:
			s.status, s.expired = keyExpired, true
		default:
			s.status = keyRevoked
		}
	case eventResume:
		if err != nil {
			return
		}
		s.suspended = false
		s.status, s.lastSuccess = s.healthy(), now
	case eventExpired:
		s.expired = true
		if !s.suspended {
			s.status = keyExpired
		}
	}
}

func (c *keyCollector) expiry(now time.Time, vault, key string, t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.stateLocked(vault, key)
	s.expiry = t
	s.expired = !t.IsZero() && !now.Before(t)
	if !s.suspended && (s.status == keyOK || s.status == keyExpired) {
		s.status = s.healthy()
	}
}

func (c *keyCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descKeyStatus
	ch <- descKeyLastSuccess
	ch <- descKeyGrace
	ch <- descKeyExpiry
}

func (c *keyCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	for k, s := range c.keys {
		if s.status != "" {
			for _, st := range keyStatuses {
				ch <- prometheus.MustNewConstMetric(descKeyStatus, prometheus.GaugeValue, bool01(st == s.status), k.vault, k.key, st)
			}
		}
		if !s.lastSuccess.IsZero() {
			ch <- prometheus.MustNewConstMetric(descKeyLastSuccess, prometheus.GaugeValue, unixSeconds(s.lastSuccess), k.vault, k.key)
		}
		switch {
		case s.suspended:
			ch <- prometheus.MustNewConstMetric(descKeyGrace, prometheus.GaugeValue, 0, k.vault, k.key)
		case s.status == keyUnreachable:
			ch <- prometheus.MustNewConstMetric(descKeyGrace, prometheus.GaugeValue, max(s.deadline.Sub(now).Seconds(), 0), k.vault, k.key)
		case s.status != "" && c.grace > 0:
			ch <- prometheus.MustNewConstMetric(descKeyGrace, prometheus.GaugeValue, c.grace.Seconds(), k.vault, k.key)
		}
		if !s.expiry.IsZero() {
			ch <- prometheus.MustNewConstMetric(descKeyExpiry, prometheus.GaugeValue, unixSeconds(s.expiry), k.vault, k.key)
		}
	}
}

func unixSeconds(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }
