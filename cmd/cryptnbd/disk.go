package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/cryptnbd/cryptnbd/cmd/cryptnbd/internal/daemon"
	"github.com/cryptnbd/cryptnbd/nbd/tlsfiles"
)

// connect returns a client for the daemon on dataDir. With no daemon
// running it opens the data directory in-process, so disks can be managed
// before the daemon first starts.
func connect(ctx context.Context, dataDir string, vault *daemon.VaultConfig) (*daemon.Client, func(), error) {
	if u := os.Getenv("CRYPTNBD_API_URL"); u != "" {
		return remoteClient(u)
	}
	sock := daemon.APISocket(dataDir)
	if c, ok := dial(sock); ok {
		return c, func() {}, nil
	}
	if socketDenied(sock) {
		return nil, nil, fmt.Errorf("permission denied on %s: run as the daemon's user or root, or as a member of its --admin-group", sock)
	}
	if vault != nil {
		if err := vault.Init(); err != nil {
			return nil, nil, err
		}
	}
	log, _ := newLogger("warn", "auto")
	st, err := daemon.OpenState(ctx, daemon.StateOptions{DataDir: dataDir, Logger: log, Vault: vault})
	if err != nil {
		if errors.Is(err, daemon.ErrLocked) {
			return nil, nil, fmt.Errorf("%w, but its API socket %s does not answer", err, sock)
		}
		return nil, nil, err
	}
	return daemon.NewLocalClient(daemon.NewAPI(st.Manager, st.AuditPath())), func() { st.Close(context.WithoutCancel(ctx)) }, nil
}

// remoteClient reaches a daemon's --api-listen: CRYPTNBD_API_URL names it
// and CRYPTNBD_API_TLS_DIR holds ca-cert.pem, client-cert.pem and
// client-key.pem, as `cryptnbd tls init` lays them out.
func remoteClient(u string) (*daemon.Client, func(), error) {
	dir := os.Getenv("CRYPTNBD_API_TLS_DIR")
	if dir == "" {
		return nil, nil, usagef("CRYPTNBD_API_URL needs CRYPTNBD_API_TLS_DIR: a directory with ca-cert.pem, client-cert.pem and client-key.pem")
	}
	pu, err := url.Parse(u)
	if err != nil || pu.Scheme != "https" {
		return nil, nil, usagef("CRYPTNBD_API_URL %q: want https://HOST:PORT", u)
	}
	tc, err := tlsfiles.LoadClient(dir, pu.Hostname())
	if err != nil {
		return nil, nil, err
	}
	return daemon.NewRemoteClient(u, tc), func() {}, nil
}

func dial(sock string) (*daemon.Client, bool) {
	c, err := net.DialTimeout("unix", sock, 2*time.Second)
	if err != nil {
		return nil, false
	}
	c.Close()
	return daemon.NewClient(sock), true
}

// socketDenied reports a management socket that exists but that this user
// may not open, which must not be mistaken for "no daemon running".
func socketDenied(sock string) bool {
	_, err := net.DialTimeout("unix", sock, 2*time.Second)
	return errors.Is(err, syscall.EACCES) || errors.Is(err, os.ErrPermission)
}

func outputFlag(fs *flag.FlagSet) *string {
	return fs.String("o", "table", "output format: table or json")
}

func checkOutput(o string) error {
	if o != "table" && o != "json" {
		return usagef("-o %q: use table or json", o)
	}
	return nil
}

func cmdDisk(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return usagef("disk: give a subcommand: create, list, show, delete, resize, recovery-secret, import or export")
	}
	switch args[0] {
	case "create":
		return diskCreate(ctx, args[1:])
	case "list":
		return diskList(ctx, args[1:])
	case "show":
		return diskShow(ctx, args[1:])
	case "delete":
		return diskDelete(ctx, args[1:])
	case "resize":
		return diskResize(ctx, args[1:])
	case "recovery-secret":
		return diskRecoverySecret(ctx, args[1:])
	case "update":
		return diskUpdate(ctx, args[1:])
	case "import":
		return diskImport(ctx, args[1:])
	case "export":
		return diskExport(ctx, args[1:])
	case "attach":
		return diskAttach(ctx, args[1:], true)
	case "detach":
		return diskAttach(ctx, args[1:], false)
	}
	return usagef("disk: unknown subcommand %q", args[0])
}

// oneName checks that exactly one valid disk name was given.
func oneName(cmd string, pos []string) (string, error) {
	if len(pos) != 1 {
		return "", usagef("%s: give exactly one disk name", cmd)
	}
	if err := daemon.ValidateName(pos[0]); err != nil {
		return "", usagef("%s: %v", cmd, err)
	}
	return pos[0], nil
}

func diskCreate(ctx context.Context, args []string) error {
	fs := newFlags("disk create", "disk create NAME --size 30G [--sector-size 4096|512] [--encryption-type EncryptionAtRestWithPlatformKey]")
	dataDir := dataDirFlag(fs)
	size := fs.String("size", "", "disk size, e.g. 30G (binary units)")
	sector := fs.Int("sector-size", 4096, "encryption sector size: 4096 or 512")
	encType := fs.String("encryption-type", "", "EncryptionAtRestWithPlatformKey (the default) or EncryptionAtRestWithCustomerKey")
	des := fs.String("des", "", "disk encryption set for a customer-managed key")
	source := fs.String("source", "", "snapshot DISK@SNAP to copy (size and key protector come from it)")
	reencrypt := fs.Bool("reencrypt", false, "with --source: give the new disk its own volume key and copy the plaintext")
	vault := vaultFlags(fs)
	allow, allowRO := accessFlags(fs)
	out := outputFlag(fs)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	name, err := oneName("disk create", pos)
	if err != nil {
		return err
	}
	if *source != "" || *reencrypt {
		return createFromSnapshot(ctx, fs, name, *source, *reencrypt, *size, *sector, *encType, *des, vault, *out, *dataDir)
	}
	if *size == "" {
		return usagef("disk create: --size is required")
	}
	n, err := daemon.ParseSize(*size)
	if err != nil {
		return usagef("disk create: --size: %v", err)
	}
	if *sector != 512 && *sector != 4096 {
		return usagef("disk create: --sector-size %d: use 4096 or 512", *sector)
	}
	if n%int64(*sector) != 0 {
		return usagef("disk create: --size %s is not a multiple of the %d-byte sector", *size, *sector)
	}
	if *encType == "" {
		*encType = daemon.EncryptionPlatformKey
		if *des != "" {
			*encType = daemon.EncryptionCustomerKey
		}
	}
	switch {
	case *encType != daemon.EncryptionPlatformKey && *encType != daemon.EncryptionCustomerKey:
		return usagef("disk create: --encryption-type %q: use %s or %s", *encType, daemon.EncryptionPlatformKey, daemon.EncryptionCustomerKey)
	case *encType == daemon.EncryptionCustomerKey && *des == "":
		return usagef("disk create: %s needs --des NAME", daemon.EncryptionCustomerKey)
	case *encType == daemon.EncryptionPlatformKey && *des != "":
		return usagef("disk create: --des is for --encryption-type %s", daemon.EncryptionCustomerKey)
	}
	if *des != "" {
		if err := daemon.ValidateName(*des); err != nil {
			return usagef("disk create: --des: %v", err)
		}
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	c, done, err := connect(ctx, *dataDir, vault)
	if err != nil {
		return err
	}
	defer done()
	di, err := c.CreateDisk(ctx, daemon.CreateRequest{Name: name, SizeBytes: n, SectorSize: *sector, EncryptionType: *encType, DES: *des})
	if err != nil {
		return err
	}
	if len(*allow)+len(*allowRO) > 0 {
		if di, err = c.SetAccess(ctx, name, daemon.Access{Allow: *allow, AllowReadOnly: *allowRO}); err != nil {
			return fmt.Errorf("disk %s was created, but its access rules were not set: %w", name, err)
		}
	}
	return printDisks(*out, []daemon.DiskInfo{di}, true)
}

func diskList(ctx context.Context, args []string) error {
	fs := newFlags("disk list", "disk list [-o table|json]")
	dataDir := dataDirFlag(fs)
	out := outputFlag(fs)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("disk list takes no arguments")
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	c, done, err := connect(ctx, *dataDir, nil)
	if err != nil {
		return err
	}
	defer done()
	disks, err := c.ListDisks(ctx)
	if err != nil {
		return err
	}
	return printDisks(*out, disks, false)
}

func diskShow(ctx context.Context, args []string) error {
	fs := newFlags("disk show", "disk show NAME [-o table|json]")
	dataDir := dataDirFlag(fs)
	out := outputFlag(fs)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	name, err := oneName("disk show", pos)
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
	di, err := c.ShowDisk(ctx, name)
	if err != nil {
		return err
	}
	return printDisks(*out, []daemon.DiskInfo{di}, true)
}

func diskDelete(ctx context.Context, args []string) error {
	fs := newFlags("disk delete", "disk delete NAME [--force]")
	dataDir := dataDirFlag(fs)
	force := fs.Bool("force", false, "delete even while clients are connected")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	name, err := oneName("disk delete", pos)
	if err != nil {
		return err
	}
	c, done, err := connect(ctx, *dataDir, nil)
	if err != nil {
		return err
	}
	defer done()
	if err := c.DeleteDisk(ctx, name, *force); err != nil {
		return err
	}
	fmt.Printf("deleted %s (header and keyslots crypto-shredded)\n", name)
	return nil
}

func diskResize(ctx context.Context, args []string) error {
	fs := newFlags("disk resize", "disk resize NAME --size S")
	dataDir := dataDirFlag(fs)
	size := fs.String("size", "", "new size, larger than the current one")
	out := outputFlag(fs)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	name, err := oneName("disk resize", pos)
	if err != nil {
		return err
	}
	n, err := daemon.ParseSize(*size)
	if err != nil {
		return usagef("disk resize: --size: %v", err)
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	c, done, err := connect(ctx, *dataDir, nil)
	if err != nil {
		return err
	}
	defer done()
	di, err := c.ResizeDisk(ctx, name, n)
	if err != nil {
		return err
	}
	return printDisks(*out, []daemon.DiskInfo{di}, true)
}

func diskRecoverySecret(ctx context.Context, args []string) error {
	fs := newFlags("disk recovery-secret", "disk recovery-secret NAME --out FILE")
	dataDir := dataDirFlag(fs)
	outPath := fs.String("out", "", "file to write the secret to (mode 0600; must not exist)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	name, err := oneName("disk recovery-secret", pos)
	if err != nil {
		return err
	}
	if *outPath == "" {
		return usagef("disk recovery-secret: --out is required")
	}
	f, err := os.OpenFile(*outPath, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("recovery secret: %w", err)
	}
	c, done, err := connect(ctx, *dataDir, nil)
	if err != nil {
		f.Close()
		os.Remove(*outPath)
		return err
	}
	defer done()
	b64, err := c.RecoverySecret(ctx, name)
	if err != nil {
		f.Close()
		os.Remove(*outPath)
		return err
	}
	sec, err := base64.StdEncoding.DecodeString(b64)
	if err == nil {
		_, err = f.Write(sec)
		clear(sec)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(*outPath)
		return fmt.Errorf("recovery secret: %w", err)
	}
	fmt.Fprintf(os.Stderr, "wrote the keyslot secret of %s to %s; open the image with:\n  cryptsetup open --key-file %s IMAGE NAME\n", name, *outPath, *outPath)
	return nil
}

func printDisks(format string, disks []daemon.DiskInfo, single bool) error {
	if format == "json" {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if single && len(disks) == 1 {
			return enc.Encode(disks[0])
		}
		if disks == nil {
			disks = []daemon.DiskInfo{}
		}
		return enc.Encode(disks)
	}
	if single && len(disks) == 1 {
		return printDiskDetail(os.Stdout, disks[0])
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	shared := false
	for _, d := range disks {
		shared = shared || d.LeaseState != ""
	}
	if shared {
		fmt.Fprintln(tw, "NAME\tSIZE\tSECTOR\tENCRYPTION\tSTATE\tSERVED BY\tCONNS\tKEY")
	} else {
		fmt.Fprintln(tw, "NAME\tSIZE\tSECTOR\tENCRYPTION\tSTATE\tCONNS\tKEY")
	}
	for _, d := range disks {
		state := d.State
		if d.StateReason != "" {
			state += " (" + d.StateReason + ")"
		}
		if shared {
			served := d.ServedBy
			if served == "" {
				served = "-"
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%d\t%s\n", d.Name, daemon.HumanBytes(d.SizeBytes), d.SectorSize, d.EncryptionType, state, served, d.Connections, d.KeyID)
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%d\t%s\n", d.Name, daemon.HumanBytes(d.SizeBytes), d.SectorSize, d.EncryptionType, state, d.Connections, d.KeyID)
	}
	return tw.Flush()
}

func printDiskDetail(w io.Writer, d daemon.DiskInfo) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	row := func(k, v string) { fmt.Fprintf(tw, "%s:\t%s\n", k, v) }
	row("name", d.Name)
	row("sizeBytes", strconv.FormatInt(d.SizeBytes, 10)+" ("+daemon.HumanBytes(d.SizeBytes)+")")
	row("sectorSize", strconv.Itoa(d.SectorSize))
	row("encryptionType", d.EncryptionType)
	row("cipher", d.Cipher)
	row("keyProvider", d.KeyProvider)
	row("keyId", d.KeyID)
	state := d.State
	if d.StateReason != "" {
		state += " (" + d.StateReason + ")"
	}
	row("state", state)
	if d.LeaseState != "" {
		row("servedBy", d.ServedBy)
		row("leaseState", d.LeaseState)
	}
	row("connections", strconv.FormatInt(d.Connections, 10))
	row("exportName", d.ExportName)
	if len(d.Allow) > 0 {
		row("allow", strings.Join(d.Allow, ", "))
	}
	if len(d.AllowReadOnly) > 0 {
		row("allowReadOnly", strings.Join(d.AllowReadOnly, ", "))
	}
	row("uuid", d.UUID)
	if len(d.SharesVolumeKeyWith) > 0 {
		row("sharesVolumeKeyWith", strings.Join(d.SharesVolumeKeyWith, ", "))
	}
	row("path", d.Path)
	return tw.Flush()
}

func splitHostPort(addr string) (string, string) {
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		return addr, "10809"
	}
	return h, p
}

func cmdAudit(ctx context.Context, args []string) error {
	fs := newFlags("audit", "audit [--disk NAME] [--since RFC3339|DURATION] [-o table|json]")
	dataDir := dataDirFlag(fs)
	disk := fs.String("disk", "", "only events of this disk")
	since := fs.String("since", "", "only events at or after this time (2026-01-02T15:04:05Z) or this long ago (1h)")
	out := outputFlag(fs)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("audit takes no arguments")
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	var t time.Time
	if *since != "" {
		if d, derr := time.ParseDuration(*since); derr == nil {
			t = time.Now().Add(-d)
		} else if t, err = time.Parse(time.RFC3339, *since); err != nil {
			return usagef("audit: --since %q: give an RFC 3339 time or a duration like 1h", *since)
		}
	}
	c, done, err := connect(ctx, *dataDir, nil)
	if err != nil {
		return err
	}
	defer done()
	evs, err := c.Audit(ctx, *disk, t)
	if err != nil {
		return err
	}
	if *out == "json" {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(evs)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TIME\tEVENT\tDISK\tKEY\tPRINCIPAL\tRESULT\tLATENCY")
	for _, e := range evs {
		res := e.Result
		if e.Error != "" {
			res += ": " + e.Error
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%.1fms\n", e.Time.Format(time.RFC3339), e.Event, e.Disk, e.KeyID, e.Principal, res, e.LatencyMS)
	}
	return tw.Flush()
}

// diskAttach is `disk attach` (on) and `disk detach` (off): which daemon
// serves a disk of a shared store (--store azblob).
func diskAttach(ctx context.Context, args []string, on bool) error {
	cmd, force := "disk detach", "detach even while clients are connected"
	if on {
		cmd, force = "disk attach", "break the lease of a daemon that still serves the disk (its writes then fail and it suspends the disk)"
	}
	fs := newFlags(cmd, cmd+" NAME [--force] [--no-wait]")
	dataDir := dataDirFlag(fs)
	forceFlag := fs.Bool("force", false, force)
	noWait := fs.Bool("no-wait", false, "attach: refuse at once if the disk is leased, instead of waiting up to one lease duration for a dead holder's lease to expire")
	out := outputFlag(fs)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	name, err := oneName(cmd, pos)
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
	var di daemon.DiskInfo
	if on {
		di, err = c.AttachDisk(ctx, name, *forceFlag, !*noWait)
	} else {
		di, err = c.DetachDisk(ctx, name, *forceFlag)
	}
	if err != nil {
		return err
	}
	return printDisks(*out, []daemon.DiskInfo{di}, true)
}
