package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"os"
	"runtime/debug"
	"time"

	"github.com/cryptnbd/cryptnbd/cmd/cryptnbd/internal/daemon"
	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/keys"
	"github.com/cryptnbd/cryptnbd/nbd"
	"github.com/cryptnbd/cryptnbd/nbd/tlsfiles"
)

func cmdServe(ctx context.Context, args []string) error {
	fs := newFlags("serve", "serve [flags]")
	dataDir := dataDirFlag(fs)
	listen := fs.String("listen", "127.0.0.1:10809", "TCP address for NBD (empty to disable)")
	unixPath := fs.String("unix", "", "Unix socket path for NBD (empty to disable)")
	metrics := fs.String("metrics-listen", "127.0.0.1:9090", "address for /metrics, /healthz and /readyz (empty to disable)")
	demo := fs.String("demo-disk", "", "create this disk at start if it does not exist (make run uses \"demo\")")
	demoSize := fs.String("demo-size", "1G", "size of the demo disk")
	hold := fs.Duration("suspend-hold", cryptodisk.DefaultSuspendHold, "how long I/O to a suspended disk is held before it fails with EIO; keep it below the client's request timeout (Linux nbd: 30s)")
	vault := vaultFlags(fs)
	checkEvery := fs.Duration("key-check-interval", 30*time.Second, "how often each customer-managed key version is checked (a GET)")
	probeEvery := fs.Duration("key-probe-interval", 5*time.Minute, "how often each key version gets a real unwrap, which alone catches a removed unwrapKey permission")
	grace := fs.Duration("key-grace", time.Hour, "how long disks keep serving with their cached key while Key Vault is unreachable, before failing closed")
	strictExpiry := fs.Bool("suspend-on-expiry", false, "suspend disks whose key has expired (Key Vault still unwraps expired keys; by default expiry only alerts)")
	tlsMode := nbd.TLSOff
	fs.TextVar(&tlsMode, "tls", nbd.TLSOff, "NBD TLS: off, on (clients choose) or require (no export or list before STARTTLS)")
	tlsCert := fs.String("tls-cert", "", "server certificate (PEM); `cryptnbd tls init` makes one")
	tlsKey := fs.String("tls-key", "", "server private key (PEM)")
	tlsCA := fs.String("tls-ca", "", "CA that client certificates are verified against")
	tlsVerify := fs.Bool("tls-verify-peer", false, "require a client certificate that verifies against --tls-ca")
	handshake := fs.Duration("handshake-timeout", 10*time.Second, "drop a client that has not finished the NBD handshake in this time")
	maxConns := fs.Int("max-conns", 1024, "most NBD connections open at once (0: no limit)")
	maxPerAddr := fs.Int("max-conns-per-addr", 64, "most NBD connections open at once from one source address (0: no limit)")
	inflight := fs.String("max-inflight-bytes", "16M", "per connection: request payload bytes held at once; past it the server stops reading from that client (one request is always admitted, so 32 MiB requests still pass)")
	inflightTotal := fs.String("max-inflight-total", "32M", "all connections together: request payload bytes held at once, most of the daemon's memory under load; past it connections wait (one holding nothing is still admitted one request). The Go heap's soft limit is set to this plus 32M unless GOMEMLIMIT is set")
	loSndbuf := fs.String("loopback-send-buffer", "0", "cap on the socket send buffer of NBD connections from this host (0: the kernel's autotuning)")
	mmap := fs.Bool("mmap", true, "with --store file: let the cipher read and write image pages already in the page cache through a shared mapping (writes only on tmpfs), saving a copy per request of 64K or more; those pages then count in the daemon's RSS (images beyond 32 TiB of address space in all are served unmapped)")
	idle := fs.Duration("idle-timeout", 0, "close an NBD connection idle this long with nothing in flight (0: never)")
	apiListen := fs.String("api-listen", "", "also serve the management API over HTTPS on this address, requiring a client certificate verified against --tls-ca (with --tls-cert and --tls-key)")
	adminGroup := fs.String("admin-group", "", "group whose members may use the management API (api.sock) besides the daemon's user and root")
	store := fs.String("store", daemon.StoreFile, "where disk images live: file (sparse files in --data-dir) or azblob (page blobs in an Azure storage container, shared by many daemons)")
	azURL := fs.String("azblob-account-url", "", "with --store azblob: the storage account, https://ACCOUNT.blob.core.windows.net/, reached with the azidentity chain (managed or workload identity, Azure CLI; role Storage Blob Data Contributor)")
	azContainer := fs.String("azblob-container", "", "with --store azblob: the container holding the disks (created if missing)")
	azConnStr := fs.String("azblob-connection-string", "", "with --store azblob: an account-key or SAS connection string instead of --azblob-account-url (Azurite, shared-key accounts); prefer the CRYPTNBD_AZBLOB_CONNECTION_STRING variable")
	leaseDuration := fs.Duration("lease-duration", 30*time.Second, "with --store azblob: the blob lease a daemon holds on each disk it serves, 15s to 60s; a dead daemon's disks can be taken over after it")
	takeover := fs.Bool("takeover", false, "with --store azblob: attach, without being asked, disks whose holder's lease expired or was broken (a dead daemon's)")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	format := fs.String("log-format", "auto", "auto (text on a terminal, JSON otherwise), text or json")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("serve takes no arguments, got %q", pos)
	}
	size, err := daemon.ParseSize(*demoSize)
	if err != nil {
		return usagef("--demo-size: %v", err)
	}
	if *demo != "" {
		if err := daemon.ValidateName(*demo); err != nil {
			return usagef("--demo-disk: %v", err)
		}
	}
	if *hold <= 0 {
		return usagef("--suspend-hold must be positive")
	}
	inflightBytes, err := daemon.ParseSize(*inflight)
	if err != nil || inflightBytes < 1<<20 {
		return usagef("--max-inflight-bytes %q: give a size of at least 1M", *inflight)
	}
	inflightTotalBytes, err := daemon.ParseSize(*inflightTotal)
	if err != nil || inflightTotalBytes < 1<<20 {
		return usagef("--max-inflight-total %q: give a size of at least 1M", *inflightTotal)
	}
	var loBytes int64 // nbd.Options: 0 leaves the buffer to the kernel
	if *loSndbuf != "0" {
		loBytes, err = daemon.ParseSize(*loSndbuf)
		if err != nil || loBytes < 64<<10 || loBytes > 1<<30 {
			return usagef("--loopback-send-buffer %q: give 0 or a size from 64K to 1G", *loSndbuf)
		}
	}
	var tlsSrv *tlsfiles.Server
	nopts := nbd.Options{TLSMode: tlsMode, HandshakeTimeout: *handshake, MaxConns: *maxConns, MaxConnsPerAddr: *maxPerAddr,
		IdleTimeout: *idle, MaxInflightBytes: inflightBytes, MaxInflightBytesTotal: inflightTotalBytes, LoopbackSendBuffer: int(loBytes)}
	switch {
	case tlsMode == nbd.TLSOff && *tlsVerify:
		return usagef("--tls-verify-peer needs --tls on or --tls require")
	case tlsMode == nbd.TLSOff && *apiListen == "" && (*tlsCert != "" || *tlsKey != ""):
		return usagef("--tls-cert and --tls-key need --tls on, --tls require or --api-listen")
	case tlsMode != nbd.TLSOff && (*tlsCert == "" || *tlsKey == ""):
		return usagef("--tls %s needs --tls-cert and --tls-key (make them with cryptnbd tls init)", tlsMode)
	case *tlsVerify && *tlsCA == "":
		return usagef("--tls-verify-peer needs --tls-ca")
	case *handshake <= 0 || *maxConns < 0 || *maxPerAddr < 0 || *idle < 0:
		return usagef("--handshake-timeout must be positive, and the connection limits and --idle-timeout not negative")
	}
	if tlsMode != nbd.TLSOff {
		var err error
		tlsSrv, err = tlsfiles.LoadServer(tlsfiles.ServerFiles{Cert: *tlsCert, Key: *tlsKey, CA: *tlsCA, VerifyPeer: *tlsVerify})
		if err != nil {
			return err
		}
		nopts.TLSConfig = tlsSrv.Config()
	}
	var apiTLS *tls.Config
	if *apiListen != "" {
		if *tlsCert == "" || *tlsKey == "" || *tlsCA == "" {
			return usagef("--api-listen needs --tls-cert, --tls-key and --tls-ca: remote management requires a client certificate")
		}
		apiCreds, err := tlsfiles.LoadServer(tlsfiles.ServerFiles{Cert: *tlsCert, Key: *tlsKey, CA: *tlsCA, VerifyPeer: true})
		if err != nil {
			return err
		}
		apiTLS = apiCreds.Config()
	}
	if *checkEvery <= 0 || *probeEvery <= 0 || *grace <= 0 {
		return usagef("--key-check-interval, --key-probe-interval and --key-grace must be positive")
	}
	sc := &daemon.StoreConfig{Kind: *store, NoMap: !*mmap}
	if *store == daemon.StoreAzblob {
		sc.AccountURL, sc.Container, sc.ConnectionString = *azURL, *azContainer, *azConnStr
		sc.LeaseDuration, sc.Takeover = *leaseDuration, *takeover
	} else if *azURL != "" || *azContainer != "" || *azConnStr != "" || *takeover {
		return usagef("--azblob-*, and --takeover, need --store azblob")
	}
	if err := sc.Check(); err != nil {
		return usagef("%v", err)
	}
	log, err := newLogger(*level, *format)
	if err != nil {
		return err
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		// Buffers are pooled per size class, and the pools are only
		// emptied by a collection, which a request path that does not
		// allocate never triggers. So after a change of workload the
		// idle buffers of the old sizes would stay beside the new ones,
		// and the heap would be left to double. A soft limit just above
		// the request payloads' bound makes the collector return them.
		debug.SetMemoryLimit(inflightTotalBytes + 32<<20)
	}
	if err := vault.Init(); err != nil {
		return err
	}
	return daemon.Run(ctx, daemon.ServeConfig{
		Vault: vault, AdminGroup: *adminGroup, NBD: nopts, TLS: tlsSrv, APIListen: *apiListen, APITLS: apiTLS,
		Watch:   keys.WatcherOptions{Interval: *checkEvery, ProbeInterval: *probeEvery, Grace: *grace, SuspendOnExpiry: *strictExpiry},
		DataDir: *dataDir, Listen: *listen, Unix: *unixPath, MetricsListen: *metrics,
		DemoDisk: *demo, DemoSize: size, SuspendHold: *hold, Logger: log, Store: sc,
		Ready: func(a daemon.Addrs) { printAttach(ctx, a, *dataDir) },
	})
}

// printAttach tells a new user how to reach the disks just served.
func printAttach(ctx context.Context, a daemon.Addrs, dataDir string) {
	c := daemon.NewClient(a.API)
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	disks, _ := c.ListDisks(cctx)
	name := "DISK"
	if len(disks) > 0 {
		name = disks[0].Name
	}
	w := os.Stdout
	fmt.Fprintf(w, "cryptnbd is serving %d disk(s) from %s\n", len(disks), dataDir)
	for _, d := range disks {
		state := d.State
		if d.ServedBy != "" {
			state += ", served by " + d.ServedBy
		}
		fmt.Fprintf(w, "  %-20s %s  %s\n", d.Name, daemon.HumanBytes(d.SizeBytes), state)
	}
	if a.NBD != "" {
		uri := fmt.Sprintf("nbd://%s/%s", a.NBD, name)
		host, port := splitHostPort(a.NBD)
		fmt.Fprintf(w, "\nAttach it:\n")
		fmt.Fprintf(w, "  nbdinfo %s\n", uri)
		fmt.Fprintf(w, "  sudo modprobe nbd && sudo nbd-client %s %s /dev/nbd0 -N %s -b 4096\n", host, port, name)
		fmt.Fprintf(w, "  qemu-system-x86_64 ... -drive file=%s,format=raw,if=virtio\n", uri)
		fmt.Fprintf(w, "  mkdir -p /tmp/%s && nbdfuse /tmp/%s/disk %s &\n", name, name, uri)
		fmt.Fprintf(w, "  fio --ioengine=nbd --uri=%s --rw=randrw --bs=4k --iodepth=32 --name=t --output=/dev/null\n", uri)
	}
	if a.Unix != "" {
		fmt.Fprintf(w, "  nbdinfo 'nbd+unix:///%s?socket=%s'\n", name, a.Unix)
	}
	if a.Metrics != "" {
		fmt.Fprintf(w, "Metrics: http://%s/metrics\n", a.Metrics)
	}
	fmt.Fprintf(w, "Manage disks: cryptnbd disk list --data-dir %s\n", dataDir)
}
