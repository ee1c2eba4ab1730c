package metrics_test

import (
	"sync"
	"testing"

	"github.com/cryptnbd/cryptnbd/metrics"
)

// diskSource is a settable disk list, as the daemon's Manager.List is.
type diskSource struct {
	mu    sync.Mutex
	disks []metrics.DiskState
}

func (s *diskSource) set(d ...metrics.DiskState) {
	s.mu.Lock()
	s.disks = d
	s.mu.Unlock()
}

func (s *diskSource) list() []metrics.DiskState {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]metrics.DiskState(nil), s.disks...)
}

func TestDiskState(t *testing.T) {
	tests := []struct {
		state, reason string
		wantState     string
		wantReason    string // "" means all reasons 0
	}{
		{"Active", "", "active", ""},
		{"Active", "KeyDisabled", "active", ""}, // a stale reason on an active disk
		{"Suspended", "KeyDisabled", "suspended", "KeyDisabled"},
		{"Suspended", "AccessDenied", "suspended", "AccessDenied"},
		{"Suspended", "KeyNotFound", "suspended", "KeyNotFound"},
		{"Suspended", "ForbiddenByRbac", "suspended", "ForbiddenByRbac"},
		{"Suspended", "ForbiddenByFirewall", "suspended", "ForbiddenByFirewall"},
		{"Suspended", "KeyVaultUnreachable", "suspended", "KeyVaultUnreachable"},
		{"Suspended", "KeyExpired", "suspended", "KeyExpired"},
		{"Suspended", "LeaseLost: blob lease taken by another host", "suspended", "LeaseLost"},
		{"Suspended", "KeyDisabledish", "suspended", "Other"},
		{"Suspended", "operator request", "suspended", "Other"},
		{"Suspended", "", "suspended", "Other"},
		{"Closed", "", "unavailable", ""},
		{"Unavailable", "key not found", "unavailable", ""},
		{"suspended", "KeyExpired", "suspended", "KeyExpired"},
	}
	for _, tt := range tests {
		t.Run(tt.state+"/"+tt.reason, func(t *testing.T) {
			m := metrics.New()
			m.SetDiskSource(func() []metrics.DiskState {
				return []metrics.DiskState{{Name: "d", State: tt.state, Reason: tt.reason, Held: 7}}
			})
			for _, s := range []string{"active", "suspended", "unavailable"} {
				want := 0.0
				if s == tt.wantState {
					want = 1
				}
				if got := mustValue(t, m, "cryptnbd_disk_state", map[string]string{"disk": "d", "state": s}); got != want {
					t.Errorf("disk_state{state=%q} = %v, want %v", s, got, want)
				}
			}
			for _, r := range metrics.SuspendReasons {
				want := 0.0
				if r == tt.wantReason {
					want = 1
				}
				if got := mustValue(t, m, "cryptnbd_disk_suspended", map[string]string{"disk": "d", "reason": r}); got != want {
					t.Errorf("disk_suspended{reason=%q} = %v, want %v", r, got, want)
				}
			}
			if got := mustValue(t, m, "cryptnbd_disk_held_requests", map[string]string{"disk": "d"}); got != 7 {
				t.Errorf("held = %v, want 7", got)
			}
		})
	}
}

func TestDiskSuspendedSecondsAccumulates(t *testing.T) {
	m := metrics.New()
	if _, ok := value(t, m, "cryptnbd_disk_state", nil); ok {
		t.Errorf("disk_state exported before SetDiskSource")
	}
	src := &diskSource{}
	m.SetDiskSource(src.list)
	// Each step is one scrape: the disk's state, how long the current
	// suspension has lasted, and the counter expected.
	steps := []struct {
		state string
		cur   float64
		want  float64
	}{
		{"Active", 0, 0},
		{"Suspended", 10, 10},
		{"Suspended", 25, 25},
		{"Active", 0, 25},    // resumed: 25 s kept
		{"Suspended", 5, 30}, // a second suspension
		{"Suspended", 2, 32}, // resumed and suspended again between scrapes
		{"Unavailable", 0, 32},
		{"Suspended", -3, 32}, // a clock step backwards counts as nothing
	}
	for i, s := range steps {
		src.set(metrics.DiskState{Name: "d", State: s.state, Reason: "KeyDisabled", SuspendedSeconds: s.cur})
		if got := mustValue(t, m, "cryptnbd_disk_suspended_seconds_total", map[string]string{"disk": "d"}); got != s.want {
			t.Errorf("step %d (%s %v): suspended_seconds_total = %v, want %v", i, s.state, s.cur, got, s.want)
		}
	}
	src.set()
	if _, ok := value(t, m, "cryptnbd_disk_state", map[string]string{"disk": "d"}); ok {
		t.Errorf("disk_state still exported for a disk the source no longer lists")
	}
}
