package main

import (
	"bytes"
	"encoding/csv"
	"fmt"
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
	if r.Mem.Known() {
		t.Errorf("memory known from a line without it: %+v", r.Mem)
	}
	r, _, err = parseRunLine("1\tcryptnbd\tmem-1m\t6.0\t3.5\t0\tx.json\t0\t0.1\t2202009\t72704\t15360\t2113945")
	if err != nil {
		t.Fatal(err)
	}
	if want := (Mem{RSS: 2202009.0 / 1024, Anon: 71, File: 15, Shmem: 2113945.0 / 1024}); r.Mem != want {
		t.Errorf("memory = %+v, want %+v", r.Mem, want)
	}
	r, _, err = parseRunLine("1\tcryptnbd\tmem-1m\t6.0\t3.5\t0\tx.json\t0\t0.1\t-\t-\t-\t-")
	if err != nil || r.Mem.Known() {
		t.Errorf("unsampled memory: %+v, %v", r.Mem, err)
	}
	for _, bad := range []string{"1\tx\ty", "x\ts\tw\t1\t1\t0\t-\t0\t0", "1\ts\tw\t1\t1\t0\t-\tnope\t0",
		"1\ts\tw\t1\t1\t0\t-\t0\t0\t1\t2\t3", "1\ts\tw\t1\t1\t0\t-\t0\t0\t1\t2\tx\t4"} {
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
	if c.Mem.Known() {
		t.Errorf("memory known where none was sampled: %+v", c.Mem)
	}

	// Memory: the median of the rounds that sampled it, each figure on
	// its own.
	m := []Run{run(1, "cryptnbd", "mem-1m", 100, 1), run(2, "cryptnbd", "mem-1m", 100, 1), run(3, "cryptnbd", "mem-1m", 100, 1), run(4, "cryptnbd", "mem-1m", 100, 1)}
	m[0].Mem = Mem{RSS: 90, Anon: 60, File: 15, Shmem: 15}
	m[1].Mem = Mem{RSS: 50, Anon: 30, File: 10, Shmem: 10}
	m[2].Mem = Mem{RSS: 70, Anon: 10, File: 50, Shmem: 10}
	if c := summarize(m).Cell("cryptnbd", "mem-1m"); c.Mem != (Mem{RSS: 70, Anon: 30, File: 15, Shmem: 10}) {
		t.Errorf("memory medians = %+v", c.Mem)
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
	// A memory workload, where cryptnbd is far behind: no throughput or
	// CPU target may come of it.
	add("cryptnbd", map[string]float64{"mem-1m": 1}, map[string]float64{"mem-1m": 100})
	add("nbdkit", map[string]float64{"mem-1m": 1000}, map[string]float64{"mem-1m": 0.001})
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
	for key := range got {
		if strings.HasSuffix(key, " mem-1m") && !strings.HasPrefix(key, "RSS") {
			t.Errorf("memory workload among the throughput targets: %s", key)
		}
	}
}

func TestMemoryTarget(t *testing.T) {
	with := func(mem Mem) Run {
		r := run(1, "cryptnbd", "mem-1m", 1000, 1)
		r.Mem = mem
		return r
	}
	tests := []struct {
		name     string
		runs     []Run
		measured float64
		met      bool
		note     string
	}{
		{"below", []Run{with(Mem{RSS: 99.9, Anon: 80, File: 19.9})}, 99.9, true, ""},
		{"at the line is not below it", []Run{with(Mem{RSS: 100, Anon: 85, File: 15})}, 100, false, ""},
		{"mapped image said apart", []Run{with(Mem{RSS: 2134, Anon: 71, File: 15, Shmem: 2048})}, 2134, false,
			"2048 MiB of it is the tmpfs image mapped (RssShmem); 86 MiB without it"},
		{"not sampled", []Run{run(1, "cryptnbd", "mem-1m", 1000, 1)}, 0, false, ""},
		{"another server's memory does not count", []Run{run(1, "cryptnbd", "mem-1m", 1000, 1), func() Run {
			r := run(1, "nbdkit", "mem-1m", 1000, 1)
			r.Mem = Mem{RSS: 20, Anon: 10, File: 10}
			return r
		}()}, 0, false, ""},
	}
	// The unmapped build gets its own line.
	nomap := run(1, "cryptnbd-nomap", "mem-1m", 1000, 1)
	nomap.Mem = Mem{RSS: 80, Anon: 65, File: 15}
	var lines []string
	for _, x := range summarize([]Run{with(Mem{RSS: 2134, Anon: 71, File: 15, Shmem: 2048}), nomap}).targets() {
		if x.Unit == "MiB" {
			lines = append(lines, fmt.Sprintf("%s %s %.0f %v", x.Goal, x.Workload, x.Measured, x.Met()))
		}
	}
	if got, want := strings.Join(lines, "; "), "RSS < 100 MiB mem-1m 2134 false; RSS < 100 MiB, --mmap=false mem-1m 80 true"; got != want {
		t.Errorf("memory targets: %s, want %s", got, want)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var tg *Target
			for _, x := range summarize(tt.runs).targets() {
				if x.Goal == "RSS < 100 MiB" && x.Workload == "mem-1m" {
					tg = &x
				}
			}
			if tg == nil {
				t.Fatal("no memory target")
			}
			if !near(tg.Measured, tt.measured) || tg.Met() != tt.met || tg.Note != tt.note {
				t.Errorf("measured %v, met %v, note %q; want %v, %v, %q", tg.Measured, tg.Met(), tg.Note, tt.measured, tt.met, tt.note)
			}
		})
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
	tsv := "round\tserver\tworkload\twall_s\tcpu_s\tbytes\tfio_json\texit\tload1\trss_kib\tanon_kib\tfile_kib\tshmem_kib\n"
	for _, srv := range []string{"cryptnbd", "nbdkit", "nbdkit-luks"} {
		name := srv + ".mixed.r1.json"
		if err := os.WriteFile(filepath.Join(raw, name), mixed, 0o644); err != nil {
			t.Fatal(err)
		}
		tsv += srv + "\tmixed\t2.5\t1.00\t0\t" + name + "\t0\t0.10\t-\t-\t-\t-\n"
		tsv += srv + "\tcopy-in\t2.0\t0.50\t1073741824\t-\t0\t0.10\t-\t-\t-\t-\n"
	}
	tsv += "nbdkit\tcopy-out\t1.0\t0.50\t1073741824\t-\t124\t0.10\t-\t-\t-\t-\n" // timed out
	// The memory workload, with the mapped image in cryptnbd's RSS.
	for srv, mem := range map[string]string{"cryptnbd": "2202009\t72704\t15360\t2113945", "nbdkit": "20480\t10240\t10240\t0"} {
		name := srv + ".mem-1m.r1.json"
		if err := os.WriteFile(filepath.Join(raw, name), mixed, 0o644); err != nil {
			t.Fatal(err)
		}
		tsv += srv + "\tmem-1m\t2.5\t1.00\t0\t" + name + "\t0\t0.10\t" + mem + "\n"
	}
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
		"| cryptnbd (LUKS2, 4096-byte sectors) | 2150 | 71 | 15 | 2064 |",
		"| nbdkit file | 20 | 10 | 10 | 0 |",
		"| RSS < 100 MiB | mem-1m | – | 2150 MiB | **missed** (2064 MiB of it is the tmpfs image mapped (RssShmem); 86 MiB without it) |",
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
	// header + 3 servers × (mixed, copy-in) + nbdkit copy-out + 2 × mem-1m
	if len(rows) != 10 {
		t.Errorf("results.csv has %d rows, want 10", len(rows))
	}
	found := false
	for _, row := range rows {
		if row[0] == "nbdkit" && row[1] == "mem-1m" {
			found = true
			if row[len(row)-4] != "20.0" || row[len(row)-1] != "0.0" {
				t.Errorf("results.csv row %v, want 20.0 MiB RSS, 0.0 shmem", row)
			}
		}
	}
	if !found {
		t.Errorf("results.csv has no nbdkit mem-1m row")
	}
}
