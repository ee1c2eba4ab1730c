package main

import (
	"bytes"
	"encoding/csv"
	"image/png"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func near(got, want float64) bool { return math.Abs(got-want) <= 1e-6*math.Max(1, math.Abs(want)) }

// testdata/*.json are fio 3.33 outputs of bench/run.sh's mixed and seq-read
// workloads against nbdkit.
func TestParseFio(t *testing.T) {
	mixed, err := os.ReadFile("testdata/mixed.json")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		in      string
		want    fioResult
		wantErr bool
	}{
		{name: "mixed sums both directions, worst p99", in: string(mixed), want: fioResult{
			Bytes: 291860480 + 124993536,
			MiBps: (145421265.0 + 62278792.0) / (1 << 20),
			IOPS:  35503.238665 + 15204.783259,
			P99us: 11337.728,
			// usr_cpu + sys_cpu = 17.80497 % of job_runtime 8009 ms.
			CPUS: 0.1780497 * 8.009,
		}},
		{name: "banner before the JSON", in: "connected to NBD server\n" + string(mixed), want: fioResult{
			Bytes: 291860480 + 124993536, MiBps: (145421265.0 + 62278792.0) / (1 << 20),
			IOPS: 35503.238665 + 15204.783259, P99us: 11337.728, CPUS: 0.1780497 * 8.009,
		}},
		{name: "clat when no lat percentiles", in: `{"jobs":[{"read":{"io_bytes":4096,"bw_bytes":1048576,"iops":256,"clat_ns":{"percentile":{"99.000000":2000}}}}]}`,
			want: fioResult{Bytes: 4096, MiBps: 1, IOPS: 256, P99us: 2}},
		{name: "jobs summed", in: `{"jobs":[{"usr_cpu":10,"sys_cpu":40,"job_runtime":2000,"write":{"io_bytes":10,"bw_bytes":1048576,"iops":1}},{"usr_cpu":25,"job_runtime":4000,"write":{"io_bytes":20,"bw_bytes":2097152,"iops":2}}]}`,
			want: fioResult{Bytes: 30, MiBps: 3, IOPS: 3, CPUS: 0.5*2 + 0.25*4}},
		{name: "no jobs", in: `{"jobs":[]}`, wantErr: true},
		{name: "job error", in: `{"jobs":[{"error":5}]}`, wantErr: true},
		{name: "not JSON", in: "fio: engine nbd not loadable", wantErr: true},
		{name: "truncated", in: string(mixed[:len(mixed)/2]), wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseFio(strings.NewReader(tt.in))
			if (err != nil) != tt.wantErr {
				t.Fatalf("parseFio() error = %v, wantErr %v", err, tt.wantErr)
			}
			if got.Bytes != tt.want.Bytes || !near(got.MiBps, tt.want.MiBps) || !near(got.IOPS, tt.want.IOPS) || !near(got.P99us, tt.want.P99us) || !near(got.CPUS, tt.want.CPUS) {
				t.Errorf("parseFio() = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestMedian(t *testing.T) {
	tests := []struct {
		in   []float64
		want float64
	}{
		{[]float64{5}, 5},
		{[]float64{3, 1, 2}, 2},
		{[]float64{4, 1, 3, 2}, 2.5},
		{[]float64{9, 9, 1}, 9},
	}
	for _, tt := range tests {
		if got := median(tt.in); got != tt.want {
			t.Errorf("median(%v) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestParseRunLine(t *testing.T) {
	r, js, err := parseRunLine("2\tnbdkit\tseq-read\t6.012\t3.50\t0\tnbdkit.seq-read.r2.json\t0\t0.42")
	if err != nil {
		t.Fatal(err)
	}
	if r.Round != 2 || r.Server != "nbdkit" || r.Workload != "seq-read" || r.WallS != 6.012 || r.CPUS != 3.5 || r.Load1 != "0.42" || js != "nbdkit.seq-read.r2.json" {
		t.Errorf("parseRunLine() = %+v, %q", r, js)
	}
	for _, bad := range []string{"1\tx\ty", "x\ts\tw\t1\t1\t0\t-\t0\t0", "1\ts\tw\t1\t1\t0\t-\tnope\t0"} {
		if _, _, err := parseRunLine(bad); err == nil {
			t.Errorf("parseRunLine(%q) succeeded", bad)
		}
	}
}

// run builds a successful run moving mib MiB/s for one second with cpu
// server seconds.
func run(round int, server, wl string, mib, cpu float64) Run {
	return Run{Round: round, Server: server, Workload: wl, WallS: 1, CPUS: cpu, Bytes: int64(mib * (1 << 20)), MiBps: mib, IOPS: mib * 256}
}

func TestSummarize(t *testing.T) {
	failed := run(3, "cryptnbd", "seq-read", 9999, 1)
	failed.Exit = 1
	runs := []Run{
		run(1, "nbd-server", "seq-read", 100, 1),
		run(1, "cryptnbd", "seq-read", 300, 1),
		run(2, "cryptnbd", "seq-read", 100, 1),
		failed,
		run(1, "cryptnbd", "copy-in", 50, 1),
		run(1, "mystery", "seq-read", 1, 1),
	}
	s := summarize(runs)
	if got, want := strings.Join(s.Servers, ","), "cryptnbd,nbd-server,mystery"; got != want {
		t.Errorf("servers = %s, want %s", got, want)
	}
	if got, want := strings.Join(s.Workloads, ","), "seq-read,copy-in"; got != want {
		t.Errorf("workloads = %s, want %s", got, want)
	}
	c := s.Cell("cryptnbd", "seq-read")
	if c == nil {
		t.Fatal("no cryptnbd seq-read cell")
	}
	if c.Rounds != 2 || c.Failed != 1 || c.MiBps != 200 || c.MinMiBps != 100 || c.MaxMiBps != 300 {
		t.Errorf("cell = %+v, want 2 rounds, 1 failed, median 200 MiB/s in [100, 300]", c)
	}
	// 1 CPU second per 300 MiB and per 100 MiB: median of 3.41 and 10.24.
	if want := (1/(300.0/1024) + 1/(100.0/1024)) / 2; !near(c.CPUPerGiB, want) {
		t.Errorf("CPUPerGiB = %v, want %v", c.CPUPerGiB, want)
	}
	// 256 IOPS per MiB/s: 4 KiB requests, 262144 of them per GiB.
	if want := c.CPUPerGiB * 1e6 / 262144; !near(c.CPUPerIO(), want) {
		t.Errorf("CPUPerIO = %v, want %v", c.CPUPerIO(), want)
	}
	if s.Cell("nbd-server", "copy-in") != nil {
		t.Errorf("cell for an unmeasured pair")
	}
}

func TestTargets(t *testing.T) {
	var runs []Run
	add := func(server string, mib, cpu map[string]float64) {
		for wl, v := range mib {
			runs = append(runs, run(1, server, wl, v, cpu[wl]))
		}
	}
	all := func(v float64) map[string]float64 {
		return map[string]float64{"seq-read": v, "seq-write": v, "rand-read": v, "rand-write": v, "mixed": v}
	}
	add("cryptnbd", map[string]float64{"seq-read": 2000, "seq-write": 2000, "rand-read": 140, "rand-write": 160, "mixed": 100}, all(1))
	add("nbdkit-luks", all(100), all(1))
	add("qemu-nbd-luks", map[string]float64{"seq-read": 1000, "seq-write": 500, "rand-read": 100, "rand-write": 100, "mixed": 100}, all(1))
	add("nbdkit", map[string]float64{"seq-read": 2000, "seq-write": 2000, "rand-read": 150, "rand-write": 150, "mixed": 90}, all(1))
	add("qemu-nbd", all(10), all(0.004)) // slow but lean: the CPU yardstick
	s := summarize(runs)
	got := map[string]Target{}
	for _, tg := range s.targets() {
		got[tg.Goal+" "+tg.Workload] = tg
	}
	tests := []struct {
		key      string
		against  string
		measured float64
		met      bool
	}{
		{"≥ 2.0× nbdkit+luks seq-read", "nbdkit-luks", 20, true},
		{"≥ 3× qemu-nbd+luks seq-read", "qemu-nbd-luks", 2, false},
		{"≥ 3× qemu-nbd+luks seq-write", "qemu-nbd-luks", 4, true},
		{"≥ 1.5× nbdkit+luks rand-read", "nbdkit-luks", 1.4, false},
		{"≥ 1.5× nbdkit+luks rand-write", "nbdkit-luks", 1.6, true},
		{"≥ 0.9× best plain peer rand-read", "nbdkit", 140.0 / 150, true},
		{"≥ 0.9× best plain peer mixed", "nbdkit", 100.0 / 90, true},
		{"CPU/GiB ≤ 1.3× leanest plain peer seq-read", "qemu-nbd", (1 / (2000.0 / 1024)) / (0.004 / (10.0 / 1024)), true},
		{"CPU/GiB ≤ 1.3× leanest plain peer rand-read", "qemu-nbd", (1 / (140.0 / 1024)) / (0.004 / (10.0 / 1024)), false},
	}
	for _, tt := range tests {
		tg, ok := got[tt.key]
		if !ok {
			t.Errorf("no target %q", tt.key)
			continue
		}
		if tg.Against != tt.against || !near(tg.Measured, tt.measured) || tg.Met() != tt.met {
			t.Errorf("%s: against %s, measured %v, met %v; want %s, %v, %v", tt.key, tg.Against, tg.Measured, tg.Met(), tt.against, tt.measured, tt.met)
		}
	}
	if (Target{Want: 1}).Met() || (Target{Want: 1, AtMost: true}).Met() {
		t.Errorf("a target with no measurement counts as met")
	}
}

// TestReport runs the whole command on a results directory laid out as
// bench/run.sh leaves it.
func TestReport(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "raw")
	if err := os.Mkdir(raw, 0o755); err != nil {
		t.Fatal(err)
	}
	mixed, err := os.ReadFile("testdata/mixed.json")
	if err != nil {
		t.Fatal(err)
	}
	tsv := "round\tserver\tworkload\twall_s\tcpu_s\tbytes\tfio_json\texit\tload1\n"
	for _, srv := range []string{"cryptnbd", "nbdkit", "nbdkit-luks"} {
		name := srv + ".mixed.r1.json"
		if err := os.WriteFile(filepath.Join(raw, name), mixed, 0o644); err != nil {
			t.Fatal(err)
		}
		tsv += srv + "\tmixed\t2.5\t1.00\t0\t" + name + "\t0\t0.10\n"
		tsv += srv + "\tcopy-in\t2.0\t0.50\t1073741824\t-\t0\t0.10\n"
	}
	tsv += "nbdkit\tcopy-out\t1.0\t0.50\t1073741824\t-\t124\t0.10\n" // timed out
	tsv = strings.ReplaceAll("1\t"+strings.ReplaceAll(strings.TrimSuffix(tsv, "\n"), "\n", "\n1\t"), "1\tround", "round") + "\n"
	if err := os.WriteFile(filepath.Join(raw, "runs.tsv"), []byte(tsv), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "machine.txt"), []byte("cpu: Test CPU\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := report(dir); err != nil {
		t.Fatalf("report: %v", err)
	}

	b, err := os.ReadFile(filepath.Join(dir, "chart.png"))
	if err != nil {
		t.Fatal(err)
	}
	if img, err := png.Decode(bytes.NewReader(b)); err != nil || img.Bounds().Dx() < 400 {
		t.Errorf("chart.png: err %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "chart.svg")); err != nil || !bytes.Contains(b, []byte("<svg")) {
		t.Errorf("chart.svg: err %v", err)
	}

	md, err := os.ReadFile(filepath.Join(dir, "report.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"- cpu: Test CPU",
		"| cryptnbd | 50.7k | – | 512 |", // headline: mixed IOPS, copy-out, copy-in MiB/s
		"| nbdkit+luks ÷ nbdkit | 1.00× | – | 1.00× |",
		"| nbdkit file | failed |  | 0 (1 failed) |", // copy-out
		"| ≥ 0.9× best plain peer | mixed | nbdkit | 1.00× | met |",
		// 1.00 s of server CPU and 1.426 s of fio's over 0.388 GiB, at 198 MiB/s.
		"| nbdkit file | 198 | 50.7k | 11338 | 2.58 | 9.8 | 3.67 | 1 |",
		"| cryptnbd | 2.58 + 3.67 (1.21) |",
		"| ≥ 2.0× nbdkit+luks | seq-read | nbdkit+luks | – | not measured |",
	} {
		if !bytes.Contains(md, []byte(want)) {
			t.Errorf("report.md lacks %q:\n%s", want, md)
		}
	}

	f, err := os.Open(filepath.Join(dir, "results.csv"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	// header + 3 servers × (mixed, copy-in) + nbdkit copy-out
	if len(rows) != 8 {
		t.Errorf("results.csv has %d rows, want 8", len(rows))
	}
}
