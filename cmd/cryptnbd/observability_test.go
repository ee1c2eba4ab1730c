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

// keyVaultRequests sums every cryptnbd_keyvault_requests_total series of
// the given op ("" for all).
func keyVaultRequests(scrape, op string) float64 {
	total := 0.0
	for _, line := range strings.Split(scrape, "\n") {
		if !strings.HasPrefix(line, "cryptnbd_keyvault_requests_total{") || (op != "" && !strings.Contains(line, `op="`+op+`"`)) {
			continue
		}
		if i := strings.LastIndexByte(line, ' '); i > 0 {
			if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
				total += v
			}
		}
	}
	return total
}

// TestKeyVaultOffTheDataPath: thousands of I/Os to a customer-key disk
// make no Key Vault call of their own; the only calls are the watcher's
// periodic checks, which depend on time, not on I/O.
func TestKeyVaultOffTheDataPath(t *testing.T) {
	c := setupCMK(t, "1h", "--metrics-listen", "127.0.0.1:0", "--key-check-interval", "2s", "--key-probe-interval", "5m")
	base := "http://" + c.d.metricsAddr(t)
	// Creating the disk validated the key with a test unwrap, and the
	// watcher probes a key version once when its first disk registers;
	// take the baseline after both.
	deadline := time.Now().Add(30 * time.Second)
	var before string
	for {
		_, before = httpGet(t, base+"/metrics")
		if keyVaultRequests(before, "unwrapKey") >= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the watcher never probed the key")
		}
		time.Sleep(100 * time.Millisecond)
	}
	start := time.Now()
	jobs := runFio(t, c.d.URI("cmk"), "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=16M", "--verify_state_save=0")
	elapsed := time.Since(start)
	_, after := httpGet(t, base+"/metrics")
	ios := sample(after, `cryptnbd_disk_requests_total{disk="cmk",op="write",result="ok"}`) +
		sample(after, `cryptnbd_disk_requests_total{disk="cmk",op="read",result="ok"}`) -
		sample(before, `cryptnbd_disk_requests_total{disk="cmk",op="write",result="ok"}`) -
		sample(before, `cryptnbd_disk_requests_total{disk="cmk",op="read",result="ok"}`)
	if len(jobs) != 1 || jobs[0].Error != 0 || ios < 8000 {
		t.Fatalf("fio: %+v, %v I/Os", jobs, ios)
	}
	calls := keyVaultRequests(after, "") - keyVaultRequests(before, "")
	wrapUnwrap := keyVaultRequests(after, "wrapKey") + keyVaultRequests(after, "unwrapKey") -
		keyVaultRequests(before, "wrapKey") - keyVaultRequests(before, "unwrapKey")
	// One GET per 2 s interval (plus the first), whatever the I/O count.
	maxCalls := elapsed.Seconds()/2 + 3
	t.Logf("%v I/Os in %v made %v Key Vault calls (%v wrap/unwrap)", ios, elapsed.Round(time.Millisecond), calls, wrapUnwrap)
	if calls > maxCalls || wrapUnwrap != 0 {
		t.Errorf("%v I/Os made %v Key Vault calls (%v wrap/unwrap); want at most %v periodic checks and no wrap/unwrap", ios, calls, wrapUnwrap, maxCalls)
	}
}

// TestGoMemoryLimit: the Go heap's soft limit follows --max-inflight-total
// (plus 32 MiB), and GOMEMLIMIT, when set, wins.
func TestGoMemoryLimit(t *testing.T) {
	for _, tt := range []struct {
		name  string
		extra []string
		env   []string
		want  float64
	}{
		{"default", nil, nil, 64 << 20},
		{"from the total", []string{"--max-inflight-total", "96M"}, nil, 128 << 20},
		{"GOMEMLIMIT wins", []string{"--max-inflight-total", "96M"}, []string{"GOMEMLIMIT=200MiB"}, 200 << 20},
	} {
		t.Run(tt.name, func(t *testing.T) {
			d := startDaemon(t, daemonOpts{Extra: append([]string{"--metrics-listen", "127.0.0.1:0"}, tt.extra...), Env: tt.env})
			_, s := httpGet(t, "http://"+d.metricsAddr(t)+"/metrics")
			if got := sample(s, "go_gc_gomemlimit_bytes"); got != tt.want {
				t.Errorf("go_gc_gomemlimit_bytes = %v, want %v", got, tt.want)
			}
		})
	}
}
