// Command profserve serves one cryptnbd disk with the daemon's hot path
// (nbd.Server over a cryptodisk.Disk on a filestore.File, platform key) and
// records CPU profiles on demand, because the daemon has no pprof endpoint.
// It leaves out what is not on the request path: the disk manager, the API
// socket, metrics, the audit log and the key watcher.
//
//	cryptnbd disk create bench --size 2G --data-dir D
//	profserve -data-dir D -disk bench -listen 127.0.0.1:10899 -cpuprofile /tmp/cpu
//
// SIGUSR1 starts a profile, SIGUSR2 stops it and writes PREFIX.N.pprof
// (N counts from 1; the file appears complete, by rename). SIGINT or
// SIGTERM stops the server. bench/run.sh drives it with PROFILE=1.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"syscall"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/filestore"
	"github.com/cryptnbd/cryptnbd/keys"
	"github.com/cryptnbd/cryptnbd/nbd"
)

func main() {
	dataDir := flag.String("data-dir", "", "cryptnbd data directory holding the platform key and disks/")
	disk := flag.String("disk", "bench", "disk name, also the export name")
	listen := flag.String("listen", "127.0.0.1:10899", "TCP address for NBD")
	prefix := flag.String("cpuprofile", "cpu", "profile path prefix")
	flag.Parse()
	if *dataDir == "" {
		fmt.Fprintln(os.Stderr, "profserve: -data-dir is required")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "profserve:", err)
		os.Exit(1)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGUSR1, syscall.SIGUSR2)
	if err := run(ctx, l, *dataDir, *disk, sig, *prefix); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// run serves the disk on l until ctx is done. SIGUSR1 on sig starts a
// profile, SIGUSR2 writes it.
func run(ctx context.Context, l net.Listener, dataDir, name string, sig <-chan os.Signal, prefix string) error {
	defer l.Close()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	platform, err := keys.OpenPlatform(dataDir)
	if err != nil {
		return fmt.Errorf("profserve: %w", err)
	}
	defer platform.Close()
	store, err := filestore.Open(filepath.Join(dataDir, "disks", name+".luks"), false)
	if err != nil {
		return fmt.Errorf("profserve: %w", err)
	}
	store.Map(filestore.NewAddressBudget(filestore.DefaultAddressBudget)) // as the daemon does by default
	d, err := cryptodisk.Open(ctx, store, platform, cryptodisk.Options{Logger: log})
	if err != nil {
		store.Close()
		return fmt.Errorf("profserve: %w", err)
	}
	defer d.Close()

	srv := nbd.NewServer(catalog{name: name, disk: d}, nbd.Options{Logger: log})
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	defer func() { cancel(); <-done }()
	go func() {
		defer close(done)
		profileOnSignal(ctx, sig, prefix, log)
	}()
	if err := srv.Serve(ctx, l); err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, nbd.ErrServerClosed) {
		return fmt.Errorf("profserve: %w", err)
	}
	return nil
}

// profileOnSignal toggles the CPU profile on SIGUSR1/SIGUSR2 until ctx is
// done, writing any profile still running. It is the only goroutine
// touching the profiler.
func profileOnSignal(ctx context.Context, sig <-chan os.Signal, prefix string, log *slog.Logger) {
	var (
		f *os.File
		n int
	)
	for {
		select {
		case <-ctx.Done():
			if f != nil {
				pprof.StopCPUProfile()
				f.Close()
				os.Rename(f.Name(), fmt.Sprintf("%s.%d.pprof", prefix, n))
			}
			return
		case s := <-sig:
			switch {
			case s == syscall.SIGUSR1 && f == nil:
				n++
				var err error
				if f, err = os.Create(fmt.Sprintf("%s.%d.pprof.tmp", prefix, n)); err != nil {
					log.Error("profserve: create profile", "err", err)
					continue
				}
				if err := pprof.StartCPUProfile(f); err != nil {
					log.Error("profserve: start profile", "err", err)
					f.Close()
					f = nil
				}
			case s == syscall.SIGUSR2 && f != nil:
				pprof.StopCPUProfile()
				err := f.Close()
				if err == nil {
					err = os.Rename(f.Name(), fmt.Sprintf("%s.%d.pprof", prefix, n))
				}
				if err != nil {
					log.Error("profserve: write profile", "err", err)
				}
				f = nil
			}
		}
	}
}

// catalog serves one disk under one name; it is immutable and so safe for
// concurrent use.
type catalog struct {
	name string
	disk *cryptodisk.Disk
}

func (c catalog) Export(_ context.Context, name string) (*nbd.Export, error) {
	if name != c.name && name != "" {
		return nil, fmt.Errorf("profserve: %w: %q", nbd.ErrUnknownExport, name)
	}
	return &nbd.Export{ExportInfo: c.info(), Backend: c.disk}, nil
}

func (c catalog) Exports(context.Context) ([]nbd.ExportInfo, error) {
	return []nbd.ExportInfo{c.info()}, nil
}

// info advertises the same block sizes as the daemon.
func (c catalog) info() nbd.ExportInfo {
	return nbd.ExportInfo{Name: c.name, MinBlock: 512, PreferredBlock: uint32(c.disk.SectorSize()), MaxBlock: 32 << 20}
}
