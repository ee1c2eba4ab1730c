// Command benchreport turns a bench/run.sh results directory into a report:
// it reads raw/runs.tsv (one line per timed run, with the server's CPU
// seconds) and the raw fio JSON files it names, takes the median of each
// figure over the rounds, and writes into the same directory
//
//	report.md    tables, ratios (cryptnbd ÷ each peer, encrypted ÷ plain)
//	             and the targets with their status
//	results.csv  medians, one row per server × workload
//	runs.csv     every run
//	chart.png, chart.svg
//
// Usage: benchreport -dir bench/results/<timestamp>
//
// It is its own module so the daemon's go.mod does not carry the plotting
// library.
package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

func main() {
	dir := flag.String("dir", "", "results directory written by bench/run.sh")
	flag.Parse()
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "usage: benchreport -dir bench/results/<timestamp>")
		os.Exit(2)
	}
	if err := report(*dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// report reads dir and writes every output file into it.
func report(dir string) error {
	runs, err := loadRuns(dir)
	if err != nil {
		return err
	}
	if len(runs) == 0 {
		return fmt.Errorf("benchreport: no runs in %s", dir)
	}
	s := summarize(runs)
	machine, err := readMachine(filepath.Join(dir, "machine.txt"))
	if err != nil {
		return err
	}
	outputs := []struct {
		name  string
		write func(io.Writer) error
	}{
		{"chart.png", func(w io.Writer) error { return writeChart(w, s, "png") }},
		{"chart.svg", func(w io.Writer) error { return writeChart(w, s, "svg") }},
		{"results.csv", func(w io.Writer) error { return writeSummaryCSV(w, s) }},
		{"runs.csv", func(w io.Writer) error { return writeRunsCSV(w, runs) }},
		{"report.md", func(w io.Writer) error { writeMarkdown(w, s, machine, "chart.png"); return nil }},
	}
	for _, o := range outputs {
		var b bytes.Buffer
		if err := o.write(&b); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, o.name), b.Bytes(), 0o644); err != nil {
			return fmt.Errorf("benchreport: %w", err)
		}
	}
	return nil
}

// readMachine returns machine.txt's non-empty lines; a missing file gives
// none.
func readMachine(path string) ([]string, error) {
	f, err := os.Open(path)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("benchreport: %w", err)
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); l != "" {
			lines = append(lines, l)
		}
	}
	return lines, sc.Err()
}
