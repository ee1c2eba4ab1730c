package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/cryptnbd/cryptnbd/cmd/cryptnbd/internal/daemon"
)

// diskStatus is one row of `cryptnbd status`.
type diskStatus struct {
	Name        string  `json:"name"`
	State       string  `json:"state"`
	StateReason string  `json:"stateReason,omitempty"`
	KeyID       string  `json:"keyId"`
	Connections int64   `json:"connections"`
	ReadMiBps   float64 `json:"readMiBps"`
	WriteMiBps  float64 `json:"writeMiBps"`
	ReadIOPS    float64 `json:"readIops"`
	WriteIOPS   float64 `json:"writeIops"`
}

func cmdStatus(ctx context.Context, args []string) error {
	fs := newFlags("status", "status [--interval 1s] [-o table|json]")
	dataDir := dataDirFlag(fs)
	interval := fs.Duration("interval", time.Second, "how long to sample I/O counters for the rates")
	out := outputFlag(fs)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("status takes no arguments")
	}
	if *interval <= 0 || *interval > time.Minute {
		return usagef("--interval must be between 0 and 1m")
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	sock := daemon.APISocket(*dataDir)
	c, ok := dial(sock)
	if !ok {
		return fmt.Errorf("no daemon answers on %s: status shows a running daemon (start it with cryptnbd serve)", sock)
	}
	first, err := c.ListDisks(ctx)
	if err != nil {
		return err
	}
	start := time.Now()
	select {
	case <-time.After(*interval):
	case <-ctx.Done():
		return ctx.Err()
	}
	second, err := c.ListDisks(ctx)
	if err != nil {
		return err
	}
	secs := time.Since(start).Seconds()
	prev := map[string]daemon.DiskInfo{}
	for _, d := range first {
		prev[d.Name] = d
	}
	rate := func(now, before uint64) float64 {
		if now < before {
			return 0
		}
		return float64(now-before) / secs
	}
	rows := make([]diskStatus, 0, len(second))
	for _, d := range second {
		p := prev[d.Name]
		rows = append(rows, diskStatus{
			Name: d.Name, State: d.State, StateReason: d.StateReason, KeyID: d.KeyID, Connections: d.Connections,
			ReadMiBps: rate(d.ReadBytes, p.ReadBytes) / (1 << 20), WriteMiBps: rate(d.WriteBytes, p.WriteBytes) / (1 << 20),
			ReadIOPS: rate(d.ReadOps, p.ReadOps), WriteIOPS: rate(d.WriteOps, p.WriteOps),
		})
	}
	if *out == "json" {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rows)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "DISK\tSTATE\tCONNS\tREAD MiB/s\tWRITE MiB/s\tREAD IOPS\tWRITE IOPS\tKEY")
	for _, r := range rows {
		state := r.State
		if r.StateReason != "" {
			state += " (" + r.StateReason + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%.1f\t%.1f\t%.0f\t%.0f\t%s\n", r.Name, state, r.Connections, r.ReadMiBps, r.WriteMiBps, r.ReadIOPS, r.WriteIOPS, r.KeyID)
	}
	return tw.Flush()
}
