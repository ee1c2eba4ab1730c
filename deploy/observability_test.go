package deploy_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/cryptnbd/cryptnbd/metrics"
	"github.com/cryptnbd/cryptnbd/metrics/metricstest"
)

const (
	dashboardPath  = "grafana/cryptnbd-dashboard.json"
	alertsPath     = "prometheus/cryptnbd-alerts.yml"
	alertTestsPath = "prometheus/cryptnbd-alerts.test.yml"
)

// seriesNames scrapes a Metrics on which every family was exercised and
// returns the series names it exposes (histograms as _bucket, _sum,
// _count).
func seriesNames(t *testing.T) map[string]bool {
	t.Helper()
	m := metrics.New()
	metricstest.Exercise(m)
	srv := httptest.NewServer(m.Handler(nil))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, line := range strings.Split(string(body), "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		if i := strings.IndexAny(line, "{ "); i > 0 {
			names[line[:i]] = true
		}
	}
	if !names["cryptnbd_disk_state"] {
		t.Fatalf("scrape has no cryptnbd_disk_state: %d names", len(names))
	}
	return names
}

// metricRE finds metric names in PromQL: identifiers with a known prefix
// that are not label names (not followed by = or a comparison inside {}).
var metricRE = regexp.MustCompile(`\b(?:cryptnbd|go|process|promhttp)_[a-zA-Z0-9_]+\b`)

func queriedMetrics(expr string) []string {
	return metricRE.FindAllString(expr, -1)
}

type dashboard struct {
	UID        string  `json:"uid"`
	Title      string  `json:"title"`
	Panels     []panel `json:"panels"`
	Templating struct {
		List []struct {
			Name       string `json:"name"`
			Type       string `json:"type"`
			Definition string `json:"definition"`
		} `json:"list"`
	} `json:"templating"`
}

type panel struct {
	ID      int    `json:"id"`
	Type    string `json:"type"`
	Title   string `json:"title"`
	GridPos struct {
		X, Y, W, H int
	} `json:"gridPos"`
	Targets []struct {
		RefID string `json:"refId"`
		Expr  string `json:"expr"`
	} `json:"targets"`
}

func loadDashboard(t *testing.T) dashboard {
	t.Helper()
	var d dashboard
	if err := json.Unmarshal([]byte(readFile(t, dashboardPath)), &d); err != nil {
		t.Fatalf("%s: %v", dashboardPath, err)
	}
	return d
}

// dashboardExprs returns every query of the dashboard, panels and
// template variables, by where it is.
func dashboardExprs(t *testing.T, d dashboard) map[string]string {
	t.Helper()
	out := map[string]string{}
	ids := map[int]bool{}
	for _, p := range d.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d used twice", p.ID)
		}
		ids[p.ID] = true
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no queries", p.Title)
		}
		if p.GridPos.W <= 0 || p.GridPos.H <= 0 || p.GridPos.X+p.GridPos.W > 24 {
			t.Errorf("panel %q: bad gridPos %+v", p.Title, p.GridPos)
		}
		for _, tg := range p.Targets {
			if strings.TrimSpace(tg.Expr) == "" {
				t.Errorf("panel %q target %s has no expr", p.Title, tg.RefID)
			}
			out[fmt.Sprintf("panel %q target %s", p.Title, tg.RefID)] = tg.Expr
		}
	}
	for _, v := range d.Templating.List {
		if v.Type == "query" {
			// label_values(SELECTOR, label): the selector is PromQL.
			sel, ok := strings.CutPrefix(v.Definition, "label_values(")
			if !ok {
				t.Errorf("variable %s: query %q is not label_values", v.Name, v.Definition)
				continue
			}
			out["variable "+v.Name] = sel[:strings.LastIndex(sel, ",")]
		}
	}
	return out
}

func TestDashboardCoversTheEssentials(t *testing.T) {
	d := loadDashboard(t)
	if d.UID == "" || d.Title == "" {
		t.Errorf("dashboard has no uid or title")
	}
	var all strings.Builder
	for _, e := range dashboardExprs(t, d) {
		all.WriteString(e + "\n")
	}
	for _, want := range []struct{ what, re string }{
		{"throughput", `rate\(cryptnbd_disk_bytes_total`},
		{"IOPS", `rate\(cryptnbd_disk_requests_total`},
		{"p50 latency", `histogram_quantile\(0\.5, sum by \([^)]*le\) \(rate\(cryptnbd_disk_request_duration_seconds_bucket`},
		{"p99 latency", `histogram_quantile\(0\.99, sum by \([^)]*le\) \(rate\(cryptnbd_disk_request_duration_seconds_bucket`},
		{"suspended disks", `cryptnbd_disk_state\{[^}]*state="suspended"`},
		{"Key Vault errors", `cryptnbd_keyvault_requests_total\{[^}]*code!~"2\.\."`},
		{"Key Vault latency", `histogram_quantile\(0\.99, [^\n]*cryptnbd_keyvault_request_duration_seconds_bucket`},
	} {
		if !regexp.MustCompile(want.re).MatchString(all.String()) {
			t.Errorf("dashboard has no %s panel (no query matching %s)", want.what, want.re)
		}
	}
}

// TestDashboardMetricsExist checks every metric the dashboard queries
// against a real scrape, so a renamed metric cannot leave a panel empty.
func TestDashboardMetricsExist(t *testing.T) {
	names := seriesNames(t)
	n := 0
	for where, expr := range dashboardExprs(t, loadDashboard(t)) {
		for _, name := range queriedMetrics(expr) {
			n++
			if !names[name] {
				t.Errorf("%s queries %s, which metrics.New() does not export", where, name)
			}
		}
	}
	if n < 20 {
		t.Errorf("found only %d metric references; is the dashboard parsed right?", n)
	}
}

// TestDashboardPromQLParses gives every dashboard query to promtool as a
// recording rule, Grafana's variables replaced by what they expand to.
func TestDashboardPromQLParses(t *testing.T) {
	promtool := needPromtool(t)
	grafanaVars := strings.NewReplacer(
		"$__rate_interval", "5m", "$__range", "6h", "$__interval", "1m",
		"$instance", ".*", "$disk", ".*", "$job", ".*",
	)
	var rules strings.Builder
	rules.WriteString("groups:\n  - name: dashboard\n    rules:\n")
	i := 0
	for where, expr := range dashboardExprs(t, loadDashboard(t)) {
		i++
		e := grafanaVars.Replace(expr)
		if strings.Contains(e, "$") {
			t.Errorf("%s: unexpanded variable in %q", where, e)
		}
		q, _ := json.Marshal(e) // a JSON string is a YAML string
		fmt.Fprintf(&rules, "      - record: dashboard:query_%d\n        expr: %s\n", i, q)
	}
	p := filepath.Join(t.TempDir(), "dashboard-rules.yml")
	if err := os.WriteFile(p, []byte(rules.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(promtool, "check", "rules", p).CombinedOutput(); err != nil {
		t.Errorf("promtool check rules on the dashboard's queries: %v\n%s", err, out)
	}
}

func needPromtool(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool not installed (Debian package prometheus)")
	}
	return p
}

func TestAlertRulesCheck(t *testing.T) {
	promtool := needPromtool(t)
	if out, err := exec.Command(promtool, "check", "rules", alertsPath).CombinedOutput(); err != nil {
		t.Errorf("promtool check rules: %v\n%s", err, out)
	}
}

// TestAlertRulesFire runs the rule unit tests: each alert fires on the
// series it is meant for, with the labels and text expected.
func TestAlertRulesFire(t *testing.T) {
	promtool := needPromtool(t)
	if out, err := exec.Command(promtool, "test", "rules", alertTestsPath).CombinedOutput(); err != nil {
		t.Errorf("promtool test rules: %v\n%s", err, out)
	}
}

func TestAlertRulesMetricsExist(t *testing.T) {
	names := seriesNames(t)
	names["up"] = true
	text := readFile(t, alertsPath)
	exprs := regexp.MustCompile(`(?ms)^\s+expr: (?:>-\n)?(.*?)\n\s+(?:for|labels):`).FindAllStringSubmatch(text, -1)
	if len(exprs) < 8 {
		t.Fatalf("found %d alert expressions, want at least 8", len(exprs))
	}
	alerts := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^\s+- alert: (\S+)`).FindAllStringSubmatch(text, -1) {
		alerts[m[1]] = true
	}
	for _, want := range []string{"CryptnbdDiskSuspended", "CryptnbdKeyCheckFailing", "CryptnbdKeyGraceRunningOut", "CryptnbdKeyExpiringSoon"} {
		if !alerts[want] {
			t.Errorf("alert %s is missing", want)
		}
	}
	for _, e := range exprs {
		for _, name := range queriedMetrics(e[1]) {
			if !names[name] {
				t.Errorf("alert expression queries %s, which metrics.New() does not export:\n%s", name, e[1])
			}
		}
	}
}
