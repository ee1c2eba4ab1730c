package metrics

import (
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// DiskState is one disk as the scrape-time collector sees it.
type DiskState struct {
	Name string
	// State is the disk's state in any case: Active, Suspended, or
	// anything else (Closed, Unavailable), which is exported as
	// unavailable.
	State string
	// Reason is why the disk is suspended; it is folded into
	// SuspendReasons (a reason that starts with one of them followed by
	// ':' or ' ' counts as that one, anything else as Other).
	Reason string
	// SuspendedSeconds is how long the disk has been in its current
	// suspension, 0 when it is not suspended. The collector adds finished
	// suspensions up itself, as last seen at a scrape.
	SuspendedSeconds float64
	// Held is the number of requests waiting at the disk's suspend gate.
	Held int64
}

// Disk states as exported in cryptnbd_disk_state.
var diskStates = []string{"active", "suspended", "unavailable"}

// SuspendReasons are the values of cryptnbd_disk_suspended's reason label.
var SuspendReasons = []string{
	"KeyDisabled", "AccessDenied", "KeyNotFound", "ForbiddenByRbac",
	"ForbiddenByFirewall", "KeyVaultUnreachable", "KeyExpired", "LeaseLost", "Other",
}

// suspendReason folds a free-form reason into SuspendReasons.
func suspendReason(r string) string {
	for _, known := range SuspendReasons[:len(SuspendReasons)-1] {
		if rest, ok := strings.CutPrefix(r, known); ok && (rest == "" || rest[0] == ':' || rest[0] == ' ') {
			return known
		}
	}
	return "Other"
}

func diskStateLabel(s string) string {
	switch strings.ToLower(s) {
	case "active":
		return "active"
	case "suspended":
		return "suspended"
	}
	return "unavailable"
}

// SetDiskSource sets the function the disk state families are read from
// at each scrape (Manager.List, adapted). It is called from the scrape's
// goroutine, must be safe for concurrent use and should be quick. Before
// it is set, or when it is nil, the families are empty.
func (m *Metrics) SetDiskSource(src func() []DiskState) { m.state.setSource(src) }

var (
	descDiskState = prometheus.NewDesc(namespace+"_disk_state",
		"1 for the disk's current state (active, suspended or unavailable), 0 for the others.",
		[]string{"disk", "state"}, nil)
	descDiskSuspended = prometheus.NewDesc(namespace+"_disk_suspended",
		"1 for the reason the disk is suspended, 0 for the other reasons; all 0 when not suspended.",
		[]string{"disk", "reason"}, nil)
	descDiskSuspendedSeconds = prometheus.NewDesc(namespace+"_disk_suspended_seconds_total",
		"Time the disk has spent suspended since the process started, finished suspensions counted as last seen at a scrape.",
		[]string{"disk"}, nil)
	descDiskHeld = prometheus.NewDesc(namespace+"_disk_held_requests",
		"Requests waiting at the suspended disk's gate.",
		[]string{"disk"}, nil)
)

// diskStateCollector reads disk states at scrape time. Its mutex guards
// the source and the suspension bookkeeping; scrapes are serialised by it,
// which also keeps the counter monotonic.
type diskStateCollector struct {
	mu  sync.Mutex
	src func() []DiskState
	acc map[string]*suspendAcc
}

// suspendAcc adds a disk's suspensions up across scrapes.
type suspendAcc struct {
	done float64 // finished suspensions
	cur  float64 // the current suspension as last seen
}

func newDiskStateCollector() *diskStateCollector {
	return &diskStateCollector{acc: map[string]*suspendAcc{}}
}

func (c *diskStateCollector) setSource(src func() []DiskState) {
	c.mu.Lock()
	c.src = src
	c.mu.Unlock()
}

func (c *diskStateCollector) forget(disk string) {
	c.mu.Lock()
	delete(c.acc, disk)
	c.mu.Unlock()
}

func (c *diskStateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descDiskState
	ch <- descDiskSuspended
	ch <- descDiskSuspendedSeconds
	ch <- descDiskHeld
}

func (c *diskStateCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.src == nil {
		return
	}
	for _, d := range c.src() {
		state := diskStateLabel(d.State)
		for _, s := range diskStates {
			ch <- prometheus.MustNewConstMetric(descDiskState, prometheus.GaugeValue, bool01(s == state), d.Name, s)
		}
		reason := ""
		if state == "suspended" {
			reason = suspendReason(d.Reason)
		}
		for _, r := range SuspendReasons {
			ch <- prometheus.MustNewConstMetric(descDiskSuspended, prometheus.GaugeValue, bool01(r == reason), d.Name, r)
		}
		a := c.acc[d.Name]
		if a == nil {
			a = &suspendAcc{}
			c.acc[d.Name] = a
		}
		cur := 0.0
		if state == "suspended" {
			cur = max(d.SuspendedSeconds, 0)
		}
		if cur < a.cur { // that suspension ended (and maybe a new one began)
			a.done += a.cur
		}
		a.cur = cur
		ch <- prometheus.MustNewConstMetric(descDiskSuspendedSeconds, prometheus.CounterValue, a.done+a.cur, d.Name)
		ch <- prometheus.MustNewConstMetric(descDiskHeld, prometheus.GaugeValue, float64(d.Held), d.Name)
	}
}

func bool01(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
