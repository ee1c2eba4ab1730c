package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Run is one timed workload against one server in one round, as recorded
// in raw/runs.tsv by bench/run.sh, completed from its fio JSON.
type Run struct {
	Round    int
	Server   string
	Workload string
	WallS    float64 // wall-clock seconds of the whole client run
	CPUS     float64 // server CPU seconds (user+system) over the run
	Bytes    int64   // bytes moved, both directions
	Exit     int     // client exit status; non-zero runs are left out
	Load1    string  // 1-minute load average when the run started

	Mem Mem // the server's peak memory during the run; zero if not sampled

	MiBps      float64 // throughput
	IOPS       float64 // 0 for nbdcopy runs
	P99us      float64 // 99th percentile latency in µs, 0 for nbdcopy runs
	ClientCPUS float64 // fio's own CPU seconds (user+system), 0 for nbdcopy runs
}

// Mem is a server's peak resident memory in MiB, from /proc/PID/status
// summed over its processes, each figure its own peak. RSS is VmRSS, the
// sum of the other three: Anon (heap, stacks, buffers), File (mapped
// files: the binary, and images mapped from a disk filesystem) and Shmem
// (mapped tmpfs files, such as an image in /dev/shm).
type Mem struct{ RSS, Anon, File, Shmem float64 }

// Known reports whether memory was sampled.
func (m Mem) Known() bool { return m.RSS > 0 }

// OK reports whether the run finished and moved data.
func (r Run) OK() bool { return r.Exit == 0 && r.Bytes > 0 && r.MiBps > 0 }

// CPUPerGiB is server CPU seconds per GiB moved.
func (r Run) CPUPerGiB() float64 {
	if r.Bytes == 0 {
		return 0
	}
	return r.CPUS / (float64(r.Bytes) / (1 << 30))
}

// ClientCPUPerGiB is the client's CPU seconds per GiB moved, 0 where the
// client's CPU was not measured. Client and server share the machine's
// cores, so the two together bound throughput.
func (r Run) ClientCPUPerGiB() float64 {
	if r.Bytes == 0 {
		return 0
	}
	return r.ClientCPUS / (float64(r.Bytes) / (1 << 30))
}

// loadRuns reads dir/raw/runs.tsv and the fio JSON files it names.
func loadRuns(dir string) ([]Run, error) {
	raw := filepath.Join(dir, "raw")
	f, err := os.Open(filepath.Join(raw, "runs.tsv"))
	if err != nil {
		return nil, fmt.Errorf("benchreport: %w", err)
	}
	defer f.Close()
	var runs []Run
	sc := bufio.NewScanner(f)
	for line := 1; sc.Scan(); line++ {
		if line == 1 || strings.TrimSpace(sc.Text()) == "" {
			continue // header
		}
		r, jsonName, err := parseRunLine(sc.Text())
		if err != nil {
			return nil, fmt.Errorf("benchreport: runs.tsv line %d: %w", line, err)
		}
		if jsonName != "-" && r.Exit == 0 {
			fr, err := readFioFile(filepath.Join(raw, jsonName))
			if err != nil {
				return nil, fmt.Errorf("benchreport: %w", err)
			}
			r.Bytes, r.MiBps, r.IOPS, r.P99us, r.ClientCPUS = fr.Bytes, fr.MiBps, fr.IOPS, fr.P99us, fr.CPUS
		} else if r.WallS > 0 {
			r.MiBps = float64(r.Bytes) / (1 << 20) / r.WallS
		}
		runs = append(runs, r)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("benchreport: %w", err)
	}
	return runs, nil
}

// parseRunLine parses round, server, workload, wall_s, cpu_s, bytes,
// fio_json, exit and load1, tab-separated, and then the peak rss_kib,
// anon_kib, file_kib and shmem_kib, "-" where they were not sampled.
// Results from before memory was sampled have the first nine only.
func parseRunLine(s string) (Run, string, error) {
	f := strings.Split(s, "\t")
	if len(f) != 9 && len(f) != 13 {
		return Run{}, "", fmt.Errorf("%d fields, want 9 or 13", len(f))
	}
	var (
		r    = Run{Server: f[1], Workload: f[2], Load1: f[8]}
		errs []error
		err  error
	)
	r.Round, err = strconv.Atoi(f[0])
	errs = append(errs, err)
	r.WallS, err = strconv.ParseFloat(f[3], 64)
	errs = append(errs, err)
	r.CPUS, err = strconv.ParseFloat(f[4], 64)
	errs = append(errs, err)
	r.Bytes, err = strconv.ParseInt(f[5], 10, 64)
	errs = append(errs, err)
	r.Exit, err = strconv.Atoi(f[7])
	errs = append(errs, err)
	if len(f) == 13 && f[9] != "-" {
		var kib [4]int64
		for i := range kib {
			kib[i], err = strconv.ParseInt(f[9+i], 10, 64)
			errs = append(errs, err)
		}
		const perMiB = 1024
		r.Mem = Mem{RSS: float64(kib[0]) / perMiB, Anon: float64(kib[1]) / perMiB, File: float64(kib[2]) / perMiB, Shmem: float64(kib[3]) / perMiB}
	}
	for _, err := range errs {
		if err != nil {
			return Run{}, "", err
		}
	}
	return r, f[6], nil
}

// fioResult is what the report takes from one fio JSON output.
type fioResult struct {
	Bytes              int64
	MiBps, IOPS, P99us float64
	CPUS               float64 // fio's user+system CPU seconds, all jobs
}

type fioDir struct {
	IOBytes int64   `json:"io_bytes"`
	BWBytes float64 `json:"bw_bytes"`
	IOPS    float64 `json:"iops"`
	LatNS   fioLat  `json:"lat_ns"`
	ClatNS  fioLat  `json:"clat_ns"`
}

type fioLat struct {
	Percentile map[string]float64 `json:"percentile"`
}

func (d fioDir) p99ns() float64 {
	if v, ok := d.LatNS.Percentile["99.000000"]; ok {
		return v
	}
	return d.ClatNS.Percentile["99.000000"]
}

func readFioFile(path string) (fioResult, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return fioResult{}, err
	}
	r, err := parseFio(bytes.NewReader(b))
	if err != nil {
		return fioResult{}, fmt.Errorf("%s: %w", filepath.Base(path), err)
	}
	return r, nil
}

// parseFio sums throughput and IOPS over fio's jobs and both directions and
// takes the worst p99 latency of any direction that did I/O. Anything
// before the first '{' (fio's nbd engine may print a line) is skipped.
func parseFio(rd io.Reader) (fioResult, error) {
	b, err := io.ReadAll(rd)
	if err != nil {
		return fioResult{}, err
	}
	i := bytes.IndexByte(b, '{')
	if i < 0 {
		return fioResult{}, fmt.Errorf("no JSON object")
	}
	var out struct {
		Jobs []struct {
			Error int    `json:"error"`
			Read  fioDir `json:"read"`
			Write fioDir `json:"write"`
			// usr_cpu and sys_cpu are percentages of job_runtime (ms).
			// With group_reporting job_runtime is summed over the
			// group's jobs and the percentages averaged, so their
			// product is still the group's CPU time.
			UsrCPU    float64 `json:"usr_cpu"`
			SysCPU    float64 `json:"sys_cpu"`
			RuntimeMS float64 `json:"job_runtime"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal(b[i:], &out); err != nil {
		return fioResult{}, err
	}
	if len(out.Jobs) == 0 {
		return fioResult{}, fmt.Errorf("no jobs")
	}
	var r fioResult
	for _, j := range out.Jobs {
		if j.Error != 0 {
			return fioResult{}, fmt.Errorf("fio job error %d", j.Error)
		}
		r.CPUS += (j.UsrCPU + j.SysCPU) / 100 * j.RuntimeMS / 1000
		for _, d := range []fioDir{j.Read, j.Write} {
			if d.IOBytes == 0 {
				continue
			}
			r.Bytes += d.IOBytes
			r.MiBps += d.BWBytes / (1 << 20)
			r.IOPS += d.IOPS
			r.P99us = max(r.P99us, d.p99ns()/1000)
		}
	}
	return r, nil
}
