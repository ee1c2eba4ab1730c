package metrics_test

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/cryptnbd/cryptnbd/metrics"
	"github.com/cryptnbd/cryptnbd/metrics/metricstest"
)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp.StatusCode, string(b)
}

func TestHandlerHealthAndReadiness(t *testing.T) {
	var readyErr atomic.Pointer[error]
	notYet := errors.New("disk db1 is Unavailable: key not found")
	readyErr.Store(&notYet)
	srv := httptest.NewServer(metrics.New().Handler(func() error { return *readyErr.Load() }))
	defer srv.Close()

	if code, body := get(t, srv.URL+"/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("/healthz = %d %q, want 200 \"ok\\n\"", code, body)
	}
	code, body := get(t, srv.URL+"/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, notYet.Error()) {
		t.Errorf("/readyz before ready = %d %q, want 503 with %q", code, body, notYet)
	}
	var none error
	readyErr.Store(&none)
	if code, body := get(t, srv.URL+"/readyz"); code != 200 {
		t.Errorf("/readyz when ready = %d %q, want 200", code, body)
	}
	if code, _ := get(t, srv.URL+"/nope"); code != http.StatusNotFound {
		t.Errorf("/nope = %d, want 404", code)
	}
	resp, err := http.Post(srv.URL+"/metrics", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /metrics = %d, want 405", resp.StatusCode)
	}

	// A nil ready func is always ready.
	srv2 := httptest.NewServer(metrics.New().Handler(nil))
	defer srv2.Close()
	if code, _ := get(t, srv2.URL+"/readyz"); code != 200 {
		t.Errorf("/readyz with nil ready = %d, want 200", code)
	}
}

func TestScrapeHasEveryFamily(t *testing.T) {
	m := metrics.New()
	metricstest.Exercise(m)
	out := scrape(t, m)
	for _, f := range append(metricstest.Families, "go_goroutines", "process_resident_memory_bytes") {
		if !strings.Contains(out, "\n# TYPE "+f+" ") {
			t.Errorf("scrape has no family %s", f)
		}
	}
	// Every cryptnbd family in the scrape is one Families knows about, so
	// the list (which the deploy tests check dashboards against) stays
	// complete.
	known := map[string]bool{}
	for _, f := range metricstest.Families {
		known[f] = true
	}
	for _, line := range strings.Split(out, "\n") {
		if f, ok := strings.CutPrefix(line, "# TYPE cryptnbd_"); ok {
			name := "cryptnbd_" + strings.Fields(f)[0]
			if !known[name] {
				t.Errorf("family %s is missing from metricstest.Families", name)
			}
		}
	}
	// Two Metrics share nothing.
	if other := scrape(t, metrics.New()); strings.Contains(other, `disk="test"`) {
		t.Errorf("a fresh Metrics shows another's series")
	}
}

// TestPromtoolCheckMetrics lints a full scrape with Prometheus's own
// checker: naming, units, _total on counters, help text.
func TestPromtoolCheckMetrics(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool not installed (Debian package prometheus)")
	}
	m := metrics.New()
	metricstest.Exercise(m)
	out := scrape(t, m)
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = strings.NewReader(out)
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Run(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, stderr.String())
	}
	if strings.Contains(stderr.String(), "cryptnbd_") {
		t.Errorf("promtool complains about cryptnbd metrics:\n%s", stderr.String())
	}
}
