package metrics

import (
	"net/http"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

const namespace = "cryptnbd"

// latencyBuckets resolve 10 µs to 10 s in 1-2.5-5 steps: a page-cache hit
// on a RAM-backed disk is tens of microseconds, a request held by a
// suspended disk is seconds.
var latencyBuckets = []float64{
	10e-6, 25e-6, 50e-6,
	100e-6, 250e-6, 500e-6,
	1e-3, 2.5e-3, 5e-3,
	10e-3, 25e-3, 50e-3,
	100e-3, 250e-3, 500e-3,
	1, 2.5, 5,
	10,
}

// Metrics holds cryptnbd's registry and every metric in it. Build one in
// main with New and hand its methods to the layers as hooks. All methods
// are safe for concurrent use.
type Metrics struct {
	reg *prometheus.Registry

	requests *prometheus.CounterVec   // disk, op, result
	bytes    *prometheus.CounterVec   // disk, op
	duration *prometheus.HistogramVec // disk, op
	inFlight *prometheus.GaugeVec     // disk
	conns    *prometheus.GaugeVec     // disk

	kvRequests *prometheus.CounterVec   // vault, key, op, code
	kvDuration *prometheus.HistogramVec // vault, key, op
	unwraps    *prometheus.CounterVec   // vault, key

	// mu guards disks, the per-disk label children resolved once so that
	// the I/O path only touches atomics.
	mu    sync.Mutex
	disks map[string]*diskIO

	state *diskStateCollector
	keys  *keyCollector
}

// New returns a Metrics with its own registry holding the Go runtime and
// process collectors and every cryptnbd family.
func New() *Metrics {
	m := &Metrics{
		reg:   prometheus.NewRegistry(),
		disks: map[string]*diskIO{},
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "disk", Name: "requests_total",
			Help: "NBD requests completed by the disk backend, by operation and result (ok or error).",
		}, []string{"disk", "op", "result"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "disk", Name: "bytes_total",
			Help: "Bytes of successful requests: data moved for read and write, range length for trim, zero and cache.",
		}, []string{"disk", "op"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "disk", Name: "request_duration_seconds",
			Help:    "Time the disk backend took per request, including time held by a suspended disk.",
			Buckets: latencyBuckets,
		}, []string{"disk", "op"}),
		inFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Subsystem: "disk", Name: "requests_in_flight",
			Help: "Requests inside the disk backend right now.",
		}, []string{"disk"}),
		conns: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Subsystem: "disk", Name: "connections",
			Help: "Open NBD connections to the disk.",
		}, []string{"disk"}),
		kvRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "keyvault", Name: "requests_total",
			Help: "Key Vault operations after the SDK's retries, by final HTTP status code (0: no response).",
		}, []string{"vault", "key", "op", "code"}),
		kvDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "keyvault", Name: "request_duration_seconds",
			Help:    "Duration of Key Vault operations, SDK retries included.",
			Buckets: prometheus.ExponentialBucketsRange(0.005, 30, 12),
		}, []string{"vault", "key", "op"}),
		unwraps: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "dek_unwraps_total",
			Help: "Disk keys unwrapped (disk opened or resumed), by key; platform keys have vault=\"platform\".",
		}, []string{"vault", "key"}),
		state: newDiskStateCollector(),
		keys:  newKeyCollector(),
	}
	m.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.requests, m.bytes, m.duration, m.inFlight, m.conns,
		m.kvRequests, m.kvDuration, m.unwraps,
		m.state, m.keys,
	)
	return m
}

// Registry returns the registry, for tests and for callers that add
// collectors of their own.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves GET /metrics from the registry, /healthz (200 while the
// process can answer at all) and /readyz: 503 with ready's error text
// until ready returns nil, then 200. A nil ready is always ready. ready is
// called once per /readyz request and must be safe for concurrent use.
func (m *Metrics) Handler(ready func() error) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		Registry: m.reg, // counts promhttp's own errors
	}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if ready != nil {
			if err := ready(); err != nil {
				http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Write([]byte("ready\n"))
	})
	return mux
}
