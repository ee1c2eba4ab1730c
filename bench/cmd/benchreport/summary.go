package main

import (
	"fmt"
	"math"
	"slices"
	"sort"
)

type workloadInfo struct {
	Name, Desc string
	IOPS       bool // its headline figure is IOPS, not MiB/s
	// Memory workloads measure the server's memory under the most
	// requests in flight; they are not among the throughput and CPU
	// targets.
	Memory bool
}

// Workload names as bench/run.sh writes them, in report order, with what
// each one does.
var workloads = []workloadInfo{
	{Name: "seq-read", Desc: "fio sequential read, 1 MiB blocks, QD 8"},
	{Name: "seq-write", Desc: "fio sequential write, 1 MiB blocks, QD 8"},
	{Name: "rand-read", Desc: "fio random read, 4 KiB, QD 32", IOPS: true},
	{Name: "rand-write", Desc: "fio random write, 4 KiB, QD 32", IOPS: true},
	{Name: "mixed", Desc: "fio random 70/30 read/write, 4 KiB, 4 connections × QD 16", IOPS: true},
	{Name: "copy-out", Desc: "nbdcopy export → null:"},
	{Name: "copy-in", Desc: "nbdcopy file → export (also fills the image)"},
	{Name: "mem-1m", Desc: "fio random read, 1 MiB, 4 connections × QD 128 (memory)", Memory: true},
	{Name: "mem-4k", Desc: "fio random read, 4 KiB, 4 connections × QD 128 (memory)", IOPS: true, Memory: true},
}

func workload(name string) workloadInfo {
	if i := slices.IndexFunc(workloads, func(w workloadInfo) bool { return w.Name == name }); i >= 0 {
		return workloads[i]
	}
	return workloadInfo{Name: name}
}

// isFio reports whether a workload is a fio run (with IOPS and latency).
func isFio(wl string) bool { return wl != "copy-out" && wl != "copy-in" }

// isRandom reports whether a workload's headline figure is IOPS.
func isRandom(wl string) bool { return workload(wl).IOPS }

// isMemory reports whether a workload is one of the memory workloads.
func isMemory(wl string) bool { return workload(wl).Memory }

type serverInfo struct {
	Name, Label, Short string
	Plain              string // for an encrypted peer, its plain counterpart
	Encrypted          bool
}

// Servers as bench/run.sh names them, in report order.
var servers = []serverInfo{
	{"cryptnbd", "cryptnbd (LUKS2, 4096-byte sectors)", "cryptnbd", "", true},
	// The same disk over STARTTLS: its ratio to cryptnbd is what TLS costs.
	{"cryptnbd-tls", "cryptnbd over TLS (STARTTLS, no client certificate)", "cryptnbd+tls", "cryptnbd", true},
	// Azurite is an emulator, not a speed reference: this row shows the
	// page-blob path under load, not what Azure Storage does.
	{"cryptnbd-azblob", "cryptnbd on Azurite page blobs (emulator)", "cryptnbd+azurite", "cryptnbd", true},
	// The same disk read and written with pread/pwrite (--mmap=false):
	// the other side of mapping images, lower RSS at lower speed.
	{"cryptnbd-nomap", "cryptnbd with --mmap=false (pread and pwrite)", "cryptnbd-nomap", "cryptnbd", true},
	{"nbdkit", "nbdkit file", "nbdkit", "", false},
	{"nbdkit-luks", "nbdkit file + luks (LUKS1, 512-byte sectors)", "nbdkit+luks", "nbdkit", true},
	{"qemu-nbd", "qemu-nbd raw", "qemu-nbd", "", false},
	{"qemu-nbd-luks", "qemu-nbd luks (LUKS1, 512-byte sectors)", "qemu+luks", "qemu-nbd", true},
	{"nbd-server", "nbd-server raw", "nbd-server", "", false},
}

func serverIndex(name string) int {
	return slices.IndexFunc(servers, func(s serverInfo) bool { return s.Name == name })
}

func label(name string) string {
	if i := serverIndex(name); i >= 0 {
		return servers[i].Label
	}
	return name
}

func short(name string) string {
	if i := serverIndex(name); i >= 0 {
		return servers[i].Short
	}
	return name
}

// isPlain reports whether a server is a known peer without encryption.
func isPlain(name string) bool {
	i := serverIndex(name)
	return i >= 0 && !servers[i].Encrypted
}

// Cell is the median over rounds of one server × workload.
type Cell struct {
	Server, Workload string
	Rounds, Failed   int
	MiBps, IOPS      float64
	P99us, CPUPerGiB float64
	ClientCPUPerGiB  float64 // fio's CPU per GiB; 0 for nbdcopy runs
	MinMiBps         float64 // spread over the rounds, for the chart
	MaxMiBps         float64
	Mem              Mem // medians of the rounds' peaks; zero if never sampled
}

// CPUPerIO is server CPU µs per request, from the mean request size.
func (c *Cell) CPUPerIO() float64 {
	if c.IOPS == 0 {
		return 0
	}
	bytesPerIO := c.MiBps * (1 << 20) / c.IOPS
	return c.CPUPerGiB * 1e6 * bytesPerIO / (1 << 30)
}

// Summary holds every cell, keyed by server then workload, and the order
// in which servers and workloads appeared.
type Summary struct {
	Servers, Workloads []string
	Cells              map[string]map[string]*Cell
}

// Cell returns the cell, or nil if nothing was measured.
func (s *Summary) Cell(server, wl string) *Cell {
	c := s.Cells[server][wl]
	if c == nil || c.Rounds == 0 {
		return nil
	}
	return c
}

// summarize takes per-figure medians over the successful rounds. Servers
// and workloads are put in report order; unknown ones go last.
func summarize(runs []Run) *Summary {
	s := &Summary{Cells: map[string]map[string]*Cell{}}
	type key struct{ server, wl string }
	groups := map[key][]Run{}
	for _, r := range runs {
		if s.Cells[r.Server] == nil {
			s.Cells[r.Server] = map[string]*Cell{}
			s.Servers = append(s.Servers, r.Server)
		}
		if !slices.Contains(s.Workloads, r.Workload) {
			s.Workloads = append(s.Workloads, r.Workload)
		}
		k := key{r.Server, r.Workload}
		groups[k] = append(groups[k], r)
	}
	for k, rs := range groups {
		c := &Cell{Server: k.server, Workload: k.wl}
		var mib, iops, p99, cpu, ccpu []float64
		var mem [4][]float64
		for _, r := range rs {
			if !r.OK() {
				c.Failed++
				continue
			}
			c.Rounds++
			mib = append(mib, r.MiBps)
			iops = append(iops, r.IOPS)
			p99 = append(p99, r.P99us)
			cpu = append(cpu, r.CPUPerGiB())
			ccpu = append(ccpu, r.ClientCPUPerGiB())
			if r.Mem.Known() {
				for i, v := range []float64{r.Mem.RSS, r.Mem.Anon, r.Mem.File, r.Mem.Shmem} {
					mem[i] = append(mem[i], v)
				}
			}
		}
		if c.Rounds > 0 {
			c.MiBps, c.IOPS, c.P99us, c.CPUPerGiB = median(mib), median(iops), median(p99), median(cpu)
			c.ClientCPUPerGiB = median(ccpu)
			c.MinMiBps, c.MaxMiBps = slices.Min(mib), slices.Max(mib)
		}
		if len(mem[0]) > 0 {
			c.Mem = Mem{RSS: median(mem[0]), Anon: median(mem[1]), File: median(mem[2]), Shmem: median(mem[3])}
		}
		s.Cells[k.server][k.wl] = c
	}
	order := func(list []string, rank func(string) int) {
		sort.SliceStable(list, func(i, j int) bool { return rank(list[i]) < rank(list[j]) })
	}
	order(s.Servers, func(n string) int {
		if i := serverIndex(n); i >= 0 {
			return i
		}
		return len(servers)
	})
	order(s.Workloads, func(n string) int {
		if i := slices.IndexFunc(workloads, func(w workloadInfo) bool { return w.Name == n }); i >= 0 {
			return i
		}
		return len(workloads)
	})
	return s
}

// median of a non-empty slice; the mean of the middle two for even lengths.
func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// bestPlain returns the plain peer with the highest throughput on wl, or
// "" if none was measured.
func (s *Summary) bestPlain(wl string) string {
	best := ""
	for _, srv := range s.Servers {
		c := s.Cell(srv, wl)
		if !isPlain(srv) || c == nil {
			continue
		}
		if best == "" || c.MiBps > s.Cell(best, wl).MiBps {
			best = srv
		}
	}
	return best
}

// leanestPlain returns the plain peer with the least CPU per GiB on wl.
func (s *Summary) leanestPlain(wl string) string {
	best := ""
	for _, srv := range s.Servers {
		c := s.Cell(srv, wl)
		if !isPlain(srv) || c == nil || c.CPUPerGiB <= 0 {
			continue
		}
		if best == "" || c.CPUPerGiB < s.Cell(best, wl).CPUPerGiB {
			best = srv
		}
	}
	return best
}

// ratio is a.MiBps / b.MiBps, or 0 if either is missing.
func (s *Summary) ratio(a, b, wl string) float64 {
	ca, cb := s.Cell(a, wl), s.Cell(b, wl)
	if ca == nil || cb == nil || cb.MiBps == 0 {
		return 0
	}
	return ca.MiBps / cb.MiBps
}

// Target is one performance goal for cryptnbd, checked on one workload.
type Target struct {
	Goal     string // human statement
	Workload string
	Against  string // server compared with
	Measured float64
	Want     float64
	AtMost   bool   // Measured must be ≤ Want (CPU), else ≥ Want
	Unit     string // "" for a ratio, else the unit of Measured
	Note     string // said beside the status
}

// Met reports whether the target holds; a missing measurement is not met.
func (t Target) Met() bool {
	if t.Measured == 0 {
		return false
	}
	if t.AtMost {
		return t.Measured <= t.Want
	}
	return t.Measured >= t.Want
}

// targets evaluates the project's goals for cryptnbd (docs/performance.md):
// against the encrypted peers on sequential and random I/O, against the
// best plain peer on every fio workload, and CPU per GiB against the
// leanest plain peer.
func (s *Summary) targets() []Target {
	const me = "cryptnbd"
	var ts []Target
	add := func(goal, wl, against string, want float64) {
		ts = append(ts, Target{Goal: goal, Workload: wl, Against: against, Measured: s.ratio(me, against, wl), Want: want})
	}
	for _, wl := range []string{"seq-read", "seq-write"} {
		add("≥ 2.0× nbdkit+luks", wl, "nbdkit-luks", 2.0)
		add("≥ 3× qemu-nbd+luks", wl, "qemu-nbd-luks", 3.0)
	}
	for _, wl := range []string{"rand-read", "rand-write"} {
		add("≥ 1.5× nbdkit+luks", wl, "nbdkit-luks", 1.5)
		add("≥ 1.5× qemu-nbd+luks", wl, "qemu-nbd-luks", 1.5)
	}
	for _, wl := range s.Workloads {
		if isFio(wl) && !isMemory(wl) {
			add("≥ 0.9× best plain peer", wl, s.bestPlain(wl), 0.9)
		}
	}
	for _, wl := range s.Workloads {
		if !isFio(wl) || isMemory(wl) {
			continue
		}
		t := Target{Goal: "CPU/GiB ≤ 1.3× leanest plain peer", Workload: wl, Against: s.leanestPlain(wl), Want: 1.3, AtMost: true}
		if c, p := s.Cell(me, wl), s.Cell(t.Against, wl); c != nil && p != nil {
			t.Measured = c.CPUPerGiB / p.CPUPerGiB
		}
		ts = append(ts, t)
	}
	for _, wl := range s.Workloads {
		if !isMemory(wl) {
			continue
		}
		ts = append(ts, s.memoryTarget("RSS < 100 MiB", me, wl))
		if s.Cells["cryptnbd-nomap"] != nil {
			ts = append(ts, s.memoryTarget("RSS < 100 MiB, --mmap=false", "cryptnbd-nomap", wl))
		}
	}
	return ts
}

// memoryTarget checks server's peak VmRSS on wl against 100 MiB, saying
// how much of a miss is the image mapped from tmpfs.
func (s *Summary) memoryTarget(goal, server, wl string) Target {
	// Want is the largest figure strictly below 100.
	t := Target{Goal: goal, Workload: wl, Want: math.Nextafter(100, 0), AtMost: true, Unit: "MiB"}
	if c := s.Cell(server, wl); c != nil && c.Mem.Known() {
		t.Measured = c.Mem.RSS
		if own := c.Mem.RSS - c.Mem.Shmem; !t.Met() && c.Mem.Shmem > 0 {
			t.Note = fmt.Sprintf("%.0f MiB of it is the tmpfs image mapped (RssShmem); %.0f MiB without it", c.Mem.Shmem, own)
		}
	}
	return t
}
