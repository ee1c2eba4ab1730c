package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/cryptnbd/cryptnbd/cmd/cryptnbd/internal/daemon"
)

func cmdSnapshot(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return usagef("snapshot: give a subcommand: create, list, show or delete")
	}
	switch args[0] {
	case "create":
		return snapshotCreate(ctx, args[1:])
	case "list":
		return snapshotList(ctx, args[1:])
	case "show":
		return snapshotShow(ctx, args[1:])
	case "delete":
		return snapshotDelete(ctx, args[1:])
	}
	return usagef("snapshot: unknown subcommand %q", args[0])
}

// oneSnapshot checks that exactly one DISK@SNAP was given.
func oneSnapshot(cmd string, pos []string) (string, error) {
	if len(pos) != 1 {
		return "", usagef("%s: give exactly one snapshot, as DISK@SNAPSHOT", cmd)
	}
	if _, _, err := daemon.SplitSnapshotName(pos[0]); err != nil {
		return "", usagef("%s: %v", cmd, err)
	}
	return pos[0], nil
}

func snapshotCreate(ctx context.Context, args []string) error {
	fs := newFlags("snapshot create", "snapshot create NAME --source DISK [-o table|json]")
	dataDir := dataDirFlag(fs)
	source := fs.String("source", "", "the disk to snapshot")
	out := outputFlag(fs)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("snapshot create: give exactly one snapshot name")
	}
	if err := daemon.ValidateName(pos[0]); err != nil {
		return usagef("snapshot create: %v", err)
	}
	if err := daemon.ValidateName(*source); err != nil {
		return usagef("snapshot create: --source: %v", err)
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	c, done, err := connect(ctx, *dataDir, nil)
	if err != nil {
		return err
	}
	defer done()
	si, err := c.CreateSnapshot(ctx, *source, pos[0])
	if err != nil {
		return err
	}
	return printSnapshots(*out, []daemon.SnapshotInfo{si}, true)
}

func snapshotList(ctx context.Context, args []string) error {
	fs := newFlags("snapshot list", "snapshot list [--source DISK] [-o table|json]")
	dataDir := dataDirFlag(fs)
	source := fs.String("source", "", "only snapshots of this disk")
	out := outputFlag(fs)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("snapshot list takes no arguments")
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	c, done, err := connect(ctx, *dataDir, nil)
	if err != nil {
		return err
	}
	defer done()
	snaps, err := c.ListSnapshots(ctx, *source)
	if err != nil {
		return err
	}
	return printSnapshots(*out, snaps, false)
}

func snapshotShow(ctx context.Context, args []string) error {
	fs := newFlags("snapshot show", "snapshot show DISK@SNAP [-o table|json]")
	dataDir := dataDirFlag(fs)
	out := outputFlag(fs)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	full, err := oneSnapshot("snapshot show", pos)
	if err != nil {
		return err
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	c, done, err := connect(ctx, *dataDir, nil)
	if err != nil {
		return err
	}
	defer done()
	si, err := c.ShowSnapshot(ctx, full)
	if err != nil {
		return err
	}
	return printSnapshots(*out, []daemon.SnapshotInfo{si}, true)
}

func snapshotDelete(ctx context.Context, args []string) error {
	fs := newFlags("snapshot delete", "snapshot delete DISK@SNAP [--force]")
	dataDir := dataDirFlag(fs)
	force := fs.Bool("force", false, "delete even while clients are connected")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	full, err := oneSnapshot("snapshot delete", pos)
	if err != nil {
		return err
	}
	c, done, err := connect(ctx, *dataDir, nil)
	if err != nil {
		return err
	}
	defer done()
	if err := c.DeleteSnapshot(ctx, full, *force); err != nil {
		return err
	}
	fmt.Printf("deleted %s (its header copy crypto-shredded)\n", full)
	return nil
}

func printSnapshots(format string, snaps []daemon.SnapshotInfo, single bool) error {
	if format == "json" {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if single && len(snaps) == 1 {
			return enc.Encode(snaps[0])
		}
		if snaps == nil {
			snaps = []daemon.SnapshotInfo{}
		}
		return enc.Encode(snaps)
	}
	if single && len(snaps) == 1 {
		return printSnapshotDetail(os.Stdout, snaps[0])
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSOURCE\tSIZE\tALLOCATED\tENCRYPTION\tSTATE\tCREATED")
	for _, s := range snaps {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Name, s.Source, daemon.HumanBytes(s.SizeBytes), daemon.HumanBytes(s.AllocatedBytes),
			s.EncryptionType, s.State, s.Created.Format(time.RFC3339))
	}
	return tw.Flush()
}

func printSnapshotDetail(w io.Writer, s daemon.SnapshotInfo) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	row := func(k, v string) { fmt.Fprintf(tw, "%s:\t%s\n", k, v) }
	row("name", s.Name)
	row("source", s.Source)
	row("sizeBytes", strconv.FormatInt(s.SizeBytes, 10)+" ("+daemon.HumanBytes(s.SizeBytes)+")")
	row("allocatedBytes", strconv.FormatInt(s.AllocatedBytes, 10)+" ("+daemon.HumanBytes(s.AllocatedBytes)+")")
	row("sectorSize", strconv.Itoa(s.SectorSize))
	row("encryptionType", s.EncryptionType)
	if s.DES != "" {
		row("des", s.DES)
	}
	row("keyProvider", s.KeyProvider)
	row("keyId", s.KeyID)
	state := s.State
	if s.StateReason != "" {
		state += " (" + s.StateReason + ")"
	}
	row("state", state)
	row("readOnly", strconv.FormatBool(s.ReadOnly))
	row("created", s.Created.Format(time.RFC3339))
	if s.CloneMethod != "" {
		row("cloneMethod", s.CloneMethod)
	}
	row("connections", strconv.FormatInt(s.Connections, 10))
	row("exportName", s.ExportName)
	row("uuid", s.UUID)
	row("path", s.Path)
	return tw.Flush()
}
