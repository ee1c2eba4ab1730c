package main

import (
	"encoding/csv"
	"fmt"
	"io"
	"strconv"
	"strings"
)

func fmtMiB(v float64) string { return strconv.FormatFloat(v, 'f', 0, 64) }

func fmtIOPS(v float64) string {
	if v >= 1000 {
		return strconv.FormatFloat(v/1000, 'f', 1, 64) + "k"
	}
	return strconv.FormatFloat(v, 'f', 0, 64)
}

func fmtRatio(v float64) string {
	if v == 0 {
		return "–"
	}
	return strconv.FormatFloat(v, 'f', 2, 64) + "×"
}

// headline is a cell's main figure: IOPS for random workloads, MiB/s else.
func headline(c *Cell) string {
	switch {
	case c == nil:
		return "–"
	case isRandom(c.Workload):
		return fmtIOPS(c.IOPS)
	default:
		return fmtMiB(c.MiBps)
	}
}

func unit(wl string) string {
	if isRandom(wl) {
		return "IOPS"
	}
	return "MiB/s"
}

// writeMarkdown writes the whole report: machine, headline table, one
// table per workload, ratios and targets.
func writeMarkdown(w io.Writer, s *Summary, machine []string, chart string) {
	p := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }
	p("# cryptnbd against peer NBD servers\n\n")
	p("Medians over rounds; every server on 127.0.0.1 with its image in tmpfs, one server at a time.\n\n")
	if len(machine) > 0 {
		p("## Machine\n\n")
		for _, l := range machine {
			p("- %s\n", l)
		}
		p("\n")
	}
	if chart != "" {
		p("![throughput per workload](%s)\n\n", chart)
	}

	p("## Headline\n\n")
	writeHeadline(w, s)

	p("\n## Per workload\n\nMiB/s and IOPS count both directions; p99 is the 99th percentile of total latency (the worse direction for mixed); CPU is the server's user+system seconds per GiB moved, and per request; client CPU is fio's own.\n")
	for _, wl := range s.Workloads {
		p("\n### %s: %s\n\n", wl, desc(wl))
		cols := 4
		if isFio(wl) {
			cols = 8
		}
		if isFio(wl) {
			p("| server | MiB/s | IOPS | p99 µs | CPU s/GiB | CPU µs/IO | client CPU s/GiB | rounds |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")
		} else {
			p("| server | MiB/s | CPU s/GiB | rounds |\n|---|---:|---:|---:|\n")
		}
		for _, srv := range s.Servers {
			c := s.Cells[srv][wl]
			if c == nil {
				continue
			}
			rounds := strconv.Itoa(c.Rounds)
			if c.Failed > 0 {
				rounds += fmt.Sprintf(" (%d failed)", c.Failed)
			}
			if c.Rounds == 0 {
				p("| %s | failed |%s %s |\n", label(srv), strings.Repeat("  |", cols-3), rounds)
				continue
			}
			if isFio(wl) {
				p("| %s | %s | %s | %.0f | %.2f | %.1f | %.2f | %s |\n", label(srv), fmtMiB(c.MiBps), fmtIOPS(c.IOPS), c.P99us, c.CPUPerGiB, c.CPUPerIO(), c.ClientCPUPerGiB, rounds)
			} else {
				p("| %s | %s | %.2f | %s |\n", label(srv), fmtMiB(c.MiBps), c.CPUPerGiB, rounds)
			}
		}
	}

	p("\n## Ratios\n\n### cryptnbd ÷ each peer (throughput)\n\n")
	ratioHeader(w, s)
	for _, srv := range s.Servers {
		if srv == "cryptnbd" {
			continue
		}
		p("| %s |", short(srv))
		for _, wl := range s.Workloads {
			p(" %s |", fmtRatio(s.ratio("cryptnbd", srv, wl)))
		}
		p("\n")
	}

	p("\n### Encrypted ÷ plain (throughput)\n\n")
	ratioHeader(w, s)
	for _, sv := range servers {
		if sv.Plain == "" || s.Cells[sv.Name] == nil || s.Cells[sv.Plain] == nil {
			continue
		}
		p("| %s ÷ %s |", sv.Short, short(sv.Plain))
		for _, wl := range s.Workloads {
			p(" %s |", fmtRatio(s.ratio(sv.Name, sv.Plain, wl)))
		}
		p("\n")
	}
	if s.Cells["cryptnbd"] != nil {
		p("| cryptnbd ÷ best plain |")
		for _, wl := range s.Workloads {
			p(" %s |", fmtRatio(s.ratio("cryptnbd", s.bestPlain(wl), wl)))
		}
		p("\n")
	}

	p("\n### Server CPU per GiB ÷ cryptnbd's\n\nAbove 1 means the peer spends more CPU than cryptnbd for the same bytes.\n\n")
	ratioHeader(w, s)
	for _, srv := range s.Servers {
		if srv == "cryptnbd" {
			continue
		}
		p("| %s |", short(srv))
		for _, wl := range s.Workloads {
			me, c := s.Cell("cryptnbd", wl), s.Cell(srv, wl)
			v := 0.0
			if me != nil && c != nil && me.CPUPerGiB > 0 {
				v = c.CPUPerGiB / me.CPUPerGiB
			}
			p(" %s |", fmtRatio(v))
		}
		p("\n")
	}

	writeCPUBudget(w, s)
	writeMemory(w, s)

	p("\n## Targets\n\n")
	writeTargets(w, s.targets())
}

// writeCPUBudget writes server + client CPU per GiB for the fio workloads,
// and the cores the two kept busy together. Client and server share the
// machine, so where that comes near the core count the sum, not either
// side alone, is what bounds throughput.
func writeCPUBudget(w io.Writer, s *Summary) {
	var wls []string
	for _, wl := range s.Workloads {
		if isFio(wl) {
			wls = append(wls, wl)
		}
	}
	if len(wls) == 0 {
		return
	}
	fmt.Fprintf(w, "\n### CPU per GiB: server + client (cores busy)\n\n")
	fmt.Fprintf(w, "Both run on this machine: at most cores ÷ (server + client) GiB/s gets through, whatever the server does with the rest of its time. In brackets, the cores the two kept busy together (the server's process tree and fio; nothing else, such as Azurite, is counted).\n\n| |")
	for _, wl := range wls {
		fmt.Fprintf(w, " %s |", wl)
	}
	fmt.Fprintf(w, "\n|---|%s\n", strings.Repeat("---:|", len(wls)))
	for _, srv := range s.Servers {
		fmt.Fprintf(w, "| %s |", short(srv))
		for _, wl := range wls {
			c := s.Cell(srv, wl)
			if c == nil || c.ClientCPUPerGiB == 0 {
				fmt.Fprintf(w, " – |")
				continue
			}
			total := c.CPUPerGiB + c.ClientCPUPerGiB
			fmt.Fprintf(w, " %.2f + %.2f (%.2f) |", c.CPUPerGiB, c.ClientCPUPerGiB, total*c.MiBps/1024)
		}
		fmt.Fprintf(w, "\n")
	}
}

func desc(wl string) string {
	for _, w := range workloads {
		if w.Name == wl {
			return w.Desc
		}
	}
	return wl
}

func ratioHeader(w io.Writer, s *Summary) {
	fmt.Fprintf(w, "| |")
	for _, wl := range s.Workloads {
		fmt.Fprintf(w, " %s |", wl)
	}
	fmt.Fprintf(w, "\n|---|%s\n", strings.Repeat("---:|", len(s.Workloads)))
}

// writeHeadline writes one row per server, one column per workload.
func writeHeadline(w io.Writer, s *Summary) {
	fmt.Fprintf(w, "| server |")
	for _, wl := range s.Workloads {
		fmt.Fprintf(w, " %s %s |", wl, unit(wl))
	}
	fmt.Fprintf(w, "\n|---|%s\n", strings.Repeat("---:|", len(s.Workloads)))
	for _, srv := range s.Servers {
		fmt.Fprintf(w, "| %s |", short(srv))
		for _, wl := range s.Workloads {
			fmt.Fprintf(w, " %s |", headline(s.Cell(srv, wl)))
		}
		fmt.Fprintf(w, "\n")
	}
}

func writeTargets(w io.Writer, ts []Target) {
	fmt.Fprintf(w, "| target | workload | against | measured | status |\n|---|---|---|---:|---|\n")
	for _, t := range ts {
		status := "met"
		switch {
		case t.Measured == 0:
			status = "not measured"
		case !t.Met():
			status = "**missed**"
		}
		if t.Note != "" {
			status += " (" + t.Note + ")"
		}
		against := short(t.Against)
		if against == "" {
			against = "–"
		}
		measured := fmtRatio(t.Measured)
		if t.Unit != "" && t.Measured != 0 {
			measured = fmt.Sprintf("%.0f %s", t.Measured, t.Unit)
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s |\n", t.Goal, t.Workload, against, measured, status)
	}
}

// writeMemory writes each server's peak memory under the memory workloads.
func writeMemory(w io.Writer, s *Summary) {
	p := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }
	var wls []string
	for _, wl := range s.Workloads {
		if isMemory(wl) {
			wls = append(wls, wl)
		}
	}
	if len(wls) == 0 {
		return
	}
	p("\n## Memory\n\nPeak resident memory of the server (summed over its processes) while the workload ran, sampled from `/proc/PID/status` five times a second; MiB, medians over rounds. VmRSS = RssAnon (heap, stacks, buffers) + RssFile (mapped files: the binary) + RssShmem (mapped tmpfs files). cryptnbd's RssShmem is its image, mapped (`--mmap`): the image's own tmpfs pages, which exist whether mapped or not, so they count in its VmRSS but do not add to the machine's memory in use.\n")
	for _, wl := range wls {
		p("\n### %s: %s\n\n| server | VmRSS | RssAnon | RssFile | RssShmem |\n|---|---:|---:|---:|---:|\n", wl, desc(wl))
		for _, srv := range s.Servers {
			c := s.Cell(srv, wl)
			if c == nil || !c.Mem.Known() {
				continue
			}
			p("| %s | %.0f | %.0f | %.0f | %.0f |\n", label(srv), c.Mem.RSS, c.Mem.Anon, c.Mem.File, c.Mem.Shmem)
		}
	}
}

// writeSummaryCSV writes one row per server × workload with the medians.
func writeSummaryCSV(w io.Writer, s *Summary) error {
	cw := csv.NewWriter(w)
	cw.Write([]string{"server", "workload", "rounds", "failed", "mib_per_s", "iops", "p99_us", "server_cpu_s_per_gib", "min_mib_per_s", "max_mib_per_s", "client_cpu_s_per_gib",
		"rss_mib", "anon_mib", "file_mib", "shmem_mib"})
	for _, srv := range s.Servers {
		for _, wl := range s.Workloads {
			c := s.Cells[srv][wl]
			if c == nil {
				continue
			}
			f := func(v float64, prec int) string { return strconv.FormatFloat(v, 'f', prec, 64) }
			cw.Write([]string{srv, wl, strconv.Itoa(c.Rounds), strconv.Itoa(c.Failed),
				f(c.MiBps, 1), f(c.IOPS, 0), f(c.P99us, 0), f(c.CPUPerGiB, 3), f(c.MinMiBps, 1), f(c.MaxMiBps, 1), f(c.ClientCPUPerGiB, 3),
				f(c.Mem.RSS, 1), f(c.Mem.Anon, 1), f(c.Mem.File, 1), f(c.Mem.Shmem, 1)})
		}
	}
	cw.Flush()
	return cw.Error()
}

// writeRunsCSV writes every run, one row each.
func writeRunsCSV(w io.Writer, runs []Run) error {
	cw := csv.NewWriter(w)
	cw.Write([]string{"round", "server", "workload", "exit", "wall_s", "bytes", "mib_per_s", "iops", "p99_us", "server_cpu_s", "server_cpu_s_per_gib", "load1", "client_cpu_s",
		"rss_mib", "anon_mib", "file_mib", "shmem_mib"})
	for _, r := range runs {
		f := func(v float64, prec int) string { return strconv.FormatFloat(v, 'f', prec, 64) }
		cw.Write([]string{strconv.Itoa(r.Round), r.Server, r.Workload, strconv.Itoa(r.Exit), f(r.WallS, 3),
			strconv.FormatInt(r.Bytes, 10), f(r.MiBps, 1), f(r.IOPS, 0), f(r.P99us, 0), f(r.CPUS, 2), f(r.CPUPerGiB(), 3), r.Load1, f(r.ClientCPUS, 2),
			f(r.Mem.RSS, 1), f(r.Mem.Anon, 1), f(r.Mem.File, 1), f(r.Mem.Shmem, 1)})
	}
	cw.Flush()
	return cw.Error()
}
