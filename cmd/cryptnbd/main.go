// Command cryptnbd serves encrypted virtual disks over NBD and manages them.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

const usage = `cryptnbd serves encrypted virtual disks over NBD.

Usage:
  cryptnbd serve [flags]                      run the daemon
  cryptnbd disk create NAME --size 30G [flags] create an encrypted disk
  cryptnbd disk list                          list disks
  cryptnbd disk show NAME                     show one disk
  cryptnbd disk delete NAME [--force]         crypto-shred and remove a disk
  cryptnbd disk update NAME --allow S --allow-ro S  set who may open it over NBD (CIDR or certificate identity)
  cryptnbd disk resize NAME --size S          grow a disk, online
  cryptnbd disk recovery-secret NAME --out F  write the LUKS2 keyslot secret for cryptsetup
  cryptnbd disk create NAME --source DISK@SNAP [--reencrypt]
                                              a disk with a snapshot's contents (same key
                                              protector; own volume key with --reencrypt)
  cryptnbd disk import NAME --from FILE|nbd://HOST/EXPORT|- [--size S]
                                              encrypt a raw image into a new disk (holes kept)
  cryptnbd disk export NAME|DISK@SNAP --to FILE|nbd://HOST/EXPORT|-
                                              write the plaintext out (audited; sparse file)
  cryptnbd disk attach NAME [--force]         --store azblob: serve a disk here (take over a dead
                                              daemon's after its lease expires; --force breaks it)
  cryptnbd disk detach NAME                   --store azblob: stop serving it and release its lease
  cryptnbd snapshot create NAME --source DISK  crash-consistent, read-only snapshot DISK@NAME
  cryptnbd snapshot list [--source DISK] | show DISK@SNAP | delete DISK@SNAP
  cryptnbd des create NAME --key-url URL [--auto-key-rotation]
                                              create a disk encryption set (customer-managed key)
  cryptnbd des list | show NAME | delete NAME | update NAME --key-url URL | rotate NAME
  cryptnbd keyvault serve [flags]             run a local Key Vault-compatible server
  cryptnbd keyvault key create|show|list-versions|enable|disable|delete|recover|purge|rotate --name K
  cryptnbd keyvault set-policy|delete-policy --object-id ID [--key-permissions get wrapKey unwrapKey]
  cryptnbd tls init --out DIR [--host H] [--client-name N]  a CA, server and client certificates for NBD TLS
  cryptnbd tls client --ca-dir DIR --out DIR2 --client-name N  another client certificate from that CA
  cryptnbd status [-o json]                   disks at a glance: state, key, connections, live MiB/s and IOPS
  cryptnbd audit [--disk NAME] [--since T]    read the key-use audit log
  cryptnbd version

Every command takes --help. Every flag has a CRYPTNBD_* environment
equivalent: --data-dir is CRYPTNBD_DATA_DIR, --metrics-listen is
CRYPTNBD_METRICS_LISTEN, and so on.
`

// exitUsage is the exit status for bad arguments, as for flag.ExitOnError.
const exitUsage = 2

// usageError marks an error in the command line rather than in the work.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{fmt.Sprintf(format, a...)} }

var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return
	}
	fmt.Fprintln(os.Stderr, "cryptnbd:", err)
	var ue usageError
	if errors.As(err, &ue) {
		os.Exit(exitUsage)
	}
	os.Exit(1)
}

func run(ctx context.Context, args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return usagef("no command given")
	}
	switch args[0] {
	case "serve":
		return cmdServe(ctx, args[1:])
	case "disk":
		return cmdDisk(ctx, args[1:])
	case "tls":
		return cmdTLS(ctx, args[1:])
	case "status":
		return cmdStatus(ctx, args[1:])
	case "des":
		return cmdDES(ctx, args[1:])
	case "snapshot":
		return cmdSnapshot(ctx, args[1:])
	case "keyvault":
		return cmdKeyVault(ctx, args[1:])
	case "audit":
		return cmdAudit(ctx, args[1:])
	case "version", "--version":
		fmt.Println("cryptnbd", version)
		return nil
	case "help", "-h", "--help":
		fmt.Print(usage)
		return nil
	}
	return usagef("unknown command %q; run cryptnbd --help", args[0])
}
