package main_test

import (
	"bufio"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// metricsAddr is the bound /metrics address from the daemon's "serving" log.
func (d *testDaemon) metricsAddr(t *testing.T) string {
	t.Helper()
	sc := bufio.NewScanner(strings.NewReader(d.logs.String()))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	addr := ""
	for sc.Scan() {
		var m struct {
			Msg     string `json:"msg"`
			Metrics string `json:"metrics"`
		}
		if json.Unmarshal(sc.Bytes(), &m) == nil && m.Msg == "serving" {
			addr = m.Metrics
		}
	}
	if addr == "" {
		t.Fatal("the daemon logged no metrics address")
	}
	return addr
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// sample returns the value of the series whose line starts with prefix
// (metric name and labels as exposed), or -1.
func sample(scrape, prefix string) float64 {
	for _, line := range strings.Split(scrape, "\n") {
		if strings.HasPrefix(line, prefix+" ") {
			v, err := strconv.ParseFloat(strings.TrimSpace(line[len(prefix):]), 64)
			if err == nil {
				return v
			}
		}
	}
	return -1
}

// TestMetricsAndStatusUnderFio: while fio runs, request, byte and latency
// series move, promtool accepts the scrape, and `cryptnbd status` shows
// live figures.
func TestMetricsAndStatusUnderFio(t *testing.T) {
	need(t, "fio", "fio")
	d := startDaemon(t, daemonOpts{Demo: "demo", DemoSize: "128M", Extra: []string{"--metrics-listen", "127.0.0.1:0"}})
	base := "http://" + d.metricsAddr(t)
	if code, body := httpGet(t, base+"/readyz"); code != 200 {
		t.Errorf("/readyz = %d %q with every disk open, want 200", code, body)
	}
	if code, _ := httpGet(t, base+"/healthz"); code != 200 {
		t.Errorf("/healthz = %d, want 200", code)
	}
	cmd := exec.Command("fio", "--name=load", "--ioengine=nbd", "--uri="+d.URI("demo"), "--rw=randrw", "--bs=4k",
		"--iodepth=16", "--size=32M", "--time_based", "--runtime=6", "--output=/dev/null")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	time.Sleep(1500 * time.Millisecond)
	_, s1 := httpGet(t, base+"/metrics")
	r := d.CLI("status", "-o", "json")
	time.Sleep(1500 * time.Millisecond)
	_, s2 := httpGet(t, base+"/metrics")
	for _, series := range []string{
		`cryptnbd_disk_requests_total{disk="demo",op="read",result="ok"}`,
		`cryptnbd_disk_requests_total{disk="demo",op="write",result="ok"}`,
		`cryptnbd_disk_bytes_total{disk="demo",op="read"}`,
		`cryptnbd_disk_bytes_total{disk="demo",op="write"}`,
		`cryptnbd_disk_request_duration_seconds_count{disk="demo",op="read"}`,
	} {
		if a, b := sample(s1, series), sample(s2, series); a < 0 || b <= a {
			t.Errorf("%s did not move under load: %v -> %v", series, a, b)
		}
	}
	if v := sample(s2, `cryptnbd_disk_connections{disk="demo"}`); v != 1 {
		t.Errorf("connections = %v while fio is connected, want 1", v)
	}
	if r.Code != 0 {
		t.Fatalf("status: %v", r)
	}
	var rows []struct {
		Name      string  `json:"name"`
		ReadIOPS  float64 `json:"readIops"`
		WriteIOPS float64 `json:"writeIops"`
		ReadMiBps float64 `json:"readMiBps"`
	}
	if err := json.Unmarshal([]byte(r.Stdout), &rows); err != nil || len(rows) != 1 {
		t.Fatalf("status -o json: %v %s", err, r.Stdout)
	}
	if rows[0].ReadIOPS <= 0 || rows[0].WriteIOPS <= 0 || rows[0].ReadMiBps <= 0 {
		t.Errorf("status under load shows no I/O: %+v", rows[0])
	}
	if _, err := exec.LookPath("promtool"); err == nil {
		c := exec.Command("promtool", "check", "metrics")
		c.Stdin = strings.NewReader(s2)
		if out, err := c.CombinedOutput(); err != nil {
			t.Errorf("promtool check metrics: %v\n%s", err, out)
		}
	} else {
		t.Log("promtool not installed (apt-get install prometheus): scrape not linted")
	}
}

// TestReadyzAndStateMetricsWithRevocation: a customer-key disk whose key
// cannot be unwrapped at start keeps /readyz at 503 until access is
// granted; a revocation flips the state metric to suspended with the 403s
// counted, and back.
func TestReadyzAndStateMetricsWithRevocation(t *testing.T) {
	c := setupCMK(t, "1h")
	c.d.Stop()
	c.v.mustCLI("keyvault", "delete-policy", "--object-id", c.principal)
	c.d.opts.Extra = append(c.d.opts.Extra, "--metrics-listen", "127.0.0.1:0")
	c.d.Start()
	base := "http://" + c.d.metricsAddr(t)
	if code, body := httpGet(t, base+"/readyz"); code != 503 || !strings.Contains(body, "cmk") {
		t.Errorf("/readyz with an unopened disk = %d %q, want 503 naming cmk", code, body)
	}
	c.v.mustCLI("keyvault", "set-policy", "--object-id", c.principal, "--key-permissions", "get", "wrapKey", "unwrapKey")
	deadline := time.Now().Add(20 * time.Second)
	for {
		code, _ := httpGet(t, base+"/readyz")
		if code == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz still %d after access was granted", code)
		}
		time.Sleep(200 * time.Millisecond)
	}
	version := c.kid[strings.LastIndex(c.kid, "/")+1:]
	c.v.mustCLI("keyvault", "key", "disable", "--name", "dk", "--version", version)
	waitState(t, c.d, "cmk", "Suspended", 15*time.Second)
	_, s := httpGet(t, base+"/metrics")
	if v := sample(s, `cryptnbd_disk_state{disk="cmk",state="suspended"}`); v != 1 {
		t.Errorf("state metric while suspended: %v, want 1", v)
	}
	if !strings.Contains(s, `code="403"`) {
		t.Errorf("no Key Vault 403 series after the key was disabled")
	}
	c.v.mustCLI("keyvault", "key", "enable", "--name", "dk", "--version", version)
	waitState(t, c.d, "cmk", "Active", 20*time.Second)
	_, s = httpGet(t, base+"/metrics")
	if v := sample(s, `cryptnbd_disk_state{disk="cmk",state="active"}`); v != 1 {
		t.Errorf("state metric after resuming: %v, want 1", v)
	}
	if os.Getenv("CRYPTNBD_TEST_VERBOSE") != "" {
		t.Log(s)
	}
}
