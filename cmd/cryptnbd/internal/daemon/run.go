package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/keys"
	"github.com/cryptnbd/cryptnbd/metrics"
	"github.com/cryptnbd/cryptnbd/nbd"
	"github.com/cryptnbd/cryptnbd/nbd/tlsfiles"
)

// ServeConfig is the daemon's configuration, from flags and CRYPTNBD_* env.
type ServeConfig struct {
	DataDir       string
	Listen        string // TCP address for NBD; empty disables
	Unix          string // Unix socket path for NBD; empty disables
	MetricsListen string // empty disables
	DemoDisk      string // created at start if missing; empty for none
	DemoSize      int64
	SuspendHold   time.Duration
	Logger        *slog.Logger
	// Ready is called once every listener is up, with the addresses bound.
	Ready func(Addrs)
	// PBKDFIterations for new disks (tests lower it); 0 means the default.
	PBKDFIterations int
	// Vault reaches Key Vault for customer-managed keys.
	Vault *VaultConfig
	// Watch configures the revocation watcher.
	Watch keys.WatcherOptions
	// AdminGroup may use the management API besides the daemon's user and
	// root; the socket is then group-accessible. Empty for none.
	AdminGroup string
	// NBD carries the server's TLS mode and configuration and its limits
	// on hostile clients; Logger and OnRefused are filled in here.
	NBD nbd.Options
	// TLS, if set, is reloaded on SIGHUP; NBD.TLSConfig reads from it.
	TLS *tlsfiles.Server
	// APIListen serves the management API over HTTPS too, requiring a
	// client certificate verified by APITLS (which must verify peers).
	APIListen string
	APITLS    *tls.Config
	// Store says where disk images live; nil means files in DataDir.
	Store *StoreConfig
}

// StateOptions open a data directory.
type StateOptions struct {
	DataDir         string
	Logger          *slog.Logger
	Disk            cryptodisk.Options
	PBKDFIterations int
	Vault           *VaultConfig
	Watch           keys.WatcherOptions
	// Metrics, if set, is fed by the disks, connections and key checks.
	Metrics *metrics.Metrics
	// Store says where disk images live. nil means what DATA_DIR/store.json
	// says (files if it does not exist); a non-nil Store is saved there.
	Store *StoreConfig
}

// Addrs are the bound addresses, for callers that asked for port 0.
type Addrs struct {
	NBD     string
	Unix    string
	Metrics string
	API     string
	APITLS  string
}

// State is an open data directory: its lock, keys, audit log and disks.
type State struct {
	DataDir  string
	Manager  *Manager
	Audit    *Audit
	Platform *keys.Platform
	// Store is the kind of store the images are in: file or azblob.
	Store string
	lock  *os.File
}

// OpenState locks dataDir for this process and opens everything in it. A
// second daemon, or a CLI working offline, on the same directory gets a
// clear error instead of corrupting state.
func OpenState(ctx context.Context, o StateOptions) (*State, error) {
	dataDir, log := o.DataDir, o.Logger
	if o.Vault == nil {
		o.Vault = &VaultConfig{}
		if err := o.Vault.Init(); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dataDir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("data dir %s is in use by another cryptnbd process: %w", dataDir, ErrLocked)
	}
	st := &State{DataDir: dataDir, lock: lock}
	if st.Platform, err = keys.OpenPlatform(dataDir); err != nil {
		st.Close(ctx)
		return nil, err
	}
	if st.Audit, err = OpenAudit(filepath.Join(dataDir, "audit.log"), log); err != nil {
		st.Close(ctx)
		return nil, err
	}
	sc := o.Store
	if sc == nil {
		if sc, err = loadStoreConfig(dataDir); err != nil {
			st.Close(ctx)
			return nil, err
		}
	} else if err := saveStoreConfig(dataDir, sc); err != nil {
		st.Close(ctx)
		return nil, fmt.Errorf("data dir: %w", err)
	}
	if err := sc.Check(); err != nil {
		st.Close(ctx)
		return nil, err
	}
	images, id, err := openImages(ctx, dataDir, sc, o.Vault, log)
	if err != nil {
		st.Close(ctx)
		return nil, err
	}
	st.Store = sc.Kind
	st.Manager, err = NewManager(ctx, Config{
		DataDir: dataDir, Logger: log, Audit: st.Audit, Disk: o.Disk, PBKDFIterations: o.PBKDFIterations,
		Providers: map[string]keys.Provider{keys.PlatformName: st.Platform},
		Vault:     o.Vault, Watch: o.Watch, Metrics: o.Metrics,
		Images: images, DaemonID: id, Takeover: sc.Takeover, LeaseDuration: sc.LeaseDuration,
	})
	if err != nil {
		st.Close(ctx)
		return nil, err
	}
	return st, nil
}

// ErrLocked means another process holds the data directory.
var ErrLocked = errors.New("data directory locked")

// AuditPath is where the audit log lives.
func (s *State) AuditPath() string { return filepath.Join(s.DataDir, "audit.log") }

// Close flushes and closes the disks, wipes keys and releases the lock.
func (s *State) Close(ctx context.Context) error {
	var errs []error
	if s.Manager != nil {
		errs = append(errs, s.Manager.Close(ctx))
	}
	if s.Platform != nil {
		s.Platform.Close()
	}
	if s.Audit != nil {
		errs = append(errs, s.Audit.Close())
	}
	s.lock.Close()
	return errors.Join(errs...)
}

// APISocket is the management socket's path in dataDir.
func APISocket(dataDir string) string { return filepath.Join(dataDir, "api.sock") }

// Run serves until ctx is done, then shuts down gracefully: listeners
// close, requests in flight finish (or get ESHUTDOWN), disks are flushed.
func Run(ctx context.Context, cfg ServeConfig) (err error) {
	log := cfg.Logger
	mx := metrics.New()
	if cfg.Watch.Grace > 0 {
		mx.SetKeyGrace(cfg.Watch.Grace)
	}
	st, err := OpenState(ctx, StateOptions{DataDir: cfg.DataDir, Logger: log, Disk: cryptodisk.Options{SuspendHold: cfg.SuspendHold},
		PBKDFIterations: cfg.PBKDFIterations, Vault: cfg.Vault, Watch: cfg.Watch, Metrics: mx, Store: cfg.Store})
	if err != nil {
		return err
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if cerr := st.Close(cctx); cerr != nil && err == nil {
			err = cerr
		}
	}()
	if cfg.DemoDisk != "" {
		if err := st.Manager.Refresh(ctx); err != nil {
			return err
		}
		if _, err := st.Manager.Show(cfg.DemoDisk); errors.Is(err, ErrNotFound) {
			if _, err := st.Manager.Create(ctx, CreateRequest{Name: cfg.DemoDisk, SizeBytes: cfg.DemoSize}); err != nil {
				return fmt.Errorf("demo disk: %w", err)
			}
		}
	}

	var addrs Addrs
	var listeners []net.Listener
	defer func() {
		for _, l := range listeners {
			l.Close()
		}
	}()
	listen := func(network, addr string) (net.Listener, error) {
		if network == "unix" {
			os.Remove(addr) // a stale socket from a crash
		}
		l, err := net.Listen(network, addr)
		if err != nil {
			return nil, fmt.Errorf("listen %s %s: %w", network, addr, err)
		}
		listeners = append(listeners, l)
		return l, nil
	}
	var nbdLs []net.Listener
	if cfg.Listen != "" {
		l, err := listen("tcp", cfg.Listen)
		if err != nil {
			return err
		}
		nbdLs = append(nbdLs, l)
		addrs.NBD = l.Addr().String()
	}
	if cfg.Unix != "" {
		l, err := listen("unix", cfg.Unix)
		if err != nil {
			return err
		}
		nbdLs = append(nbdLs, l)
		addrs.Unix = cfg.Unix
	}
	if len(nbdLs) == 0 {
		return errors.New("nothing to serve on: give --listen or --unix")
	}
	policy, err := NewPeerPolicy(cfg.AdminGroup)
	if err != nil {
		return err
	}
	apiPath := APISocket(cfg.DataDir)
	apiL, err := listen("unix", apiPath)
	if err != nil {
		return err
	}
	// The mode keeps everyone else from connecting at all; the peer check
	// on each request is the second line, and names who was refused.
	mode := os.FileMode(0o600)
	if policy.AdminGID >= 0 {
		mode = 0o660
		if err := os.Chown(apiPath, -1, int(policy.AdminGID)); err != nil {
			return fmt.Errorf("api socket: %w", err)
		}
		// The data directory must let the group reach the socket.
		if err := os.Chmod(cfg.DataDir, 0o710); err != nil {
			return fmt.Errorf("data dir: %w", err)
		}
		if err := os.Chown(cfg.DataDir, -1, int(policy.AdminGID)); err != nil {
			return fmt.Errorf("data dir: %w", err)
		}
	}
	if err := os.Chmod(apiPath, mode); err != nil {
		return fmt.Errorf("api socket: %w", err)
	}
	addrs.API = apiPath
	defer os.Remove(apiPath)

	var apiTLSL net.Listener
	if cfg.APIListen != "" {
		if apiTLSL, err = listen("tcp", cfg.APIListen); err != nil {
			return err
		}
		addrs.APITLS = apiTLSL.Addr().String()
	}
	var metricsL net.Listener
	if cfg.MetricsListen != "" {
		if metricsL, err = listen("tcp", cfg.MetricsListen); err != nil {
			return err
		}
		addrs.Metrics = metricsL.Addr().String()
	}

	nopts := cfg.NBD
	nopts.Logger = log
	nopts.OnRefused = func(reason string, p nbd.Peer) {
		addr := ""
		if p.Addr != nil {
			addr = p.Addr.String()
		}
		st.Audit.Record(AuditEvent{Event: "connection-refused", Result: "denied", Detail: fmt.Sprintf("reason=%s peer=%s tls=%t", reason, addr, p.TLS)})
	}
	srv := nbd.NewServer(st.Manager, nopts)
	if cfg.TLS != nil {
		hup := make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		defer signal.Stop(hup)
		go func() {
			for {
				select {
				case <-ctx.Done():
					return
				case <-hup:
					if err := cfg.TLS.Reload(); err != nil {
						log.Error("TLS certificates not reloaded; the old ones stay in use", "err", err)
					} else {
						log.Info("TLS certificates reloaded")
					}
				}
			}
		}()
	}
	apiSrv := &http.Server{Handler: requirePeer(policy, st.Audit, NewAPI(st.Manager, st.AuditPath())),
		ConnContext: connContext, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	var metricsSrv *http.Server
	if metricsL != nil {
		mx.SetDiskSource(st.Manager.DiskStates)
		metricsSrv = &http.Server{Handler: mx.Handler(st.Manager.Ready), ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	}

	errc := make(chan error, len(nbdLs)+3)
	var wg sync.WaitGroup
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	wg.Go(func() {
		if err := st.Manager.Run(watchCtx); err != nil {
			errc <- fmt.Errorf("key watcher: %w", err)
		}
	})
	for _, l := range nbdLs {
		wg.Go(func() {
			// Serve returns ctx's error when a signal ends the daemon; that
			// is the shutdown asked for, not a listener failing, and must
			// not race ctx.Done in the select below into exit status 1.
			if err := srv.Serve(ctx, l); err != nil && !errors.Is(err, nbd.ErrServerClosed) && ctx.Err() == nil {
				errc <- fmt.Errorf("nbd: %w", err)
			}
		})
	}
	wg.Go(func() {
		if err := apiSrv.Serve(apiL); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("api: %w", err)
		}
	})
	var apiTLSSrv *http.Server
	if apiTLSL != nil {
		// A verified client certificate is the credential here; there is
		// no peer uid to check.
		apiTLSSrv = &http.Server{Handler: NewAPI(st.Manager, st.AuditPath()), TLSConfig: cfg.APITLS,
			ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
		wg.Go(func() {
			if err := apiTLSSrv.ServeTLS(apiTLSL, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("api (https): %w", err)
			}
		})
	}
	if metricsSrv != nil {
		wg.Go(func() {
			if err := metricsSrv.Serve(metricsL); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("metrics: %w", err)
			}
		})
	}
	log.Info("serving", "nbd", addrs.NBD, "unix", addrs.Unix, "metrics", addrs.Metrics, "api", addrs.API, "apiTLS", addrs.APITLS, "disks", len(st.Manager.List()))
	if cfg.Ready != nil {
		cfg.Ready(addrs)
	}

	select {
	case <-ctx.Done():
	case err = <-errc:
		log.Error("listener failed, shutting down", "err", err)
	}
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 20*time.Second)
	defer cancel()
	if serr := srv.Shutdown(sctx); serr != nil {
		log.Warn("nbd shutdown", "err", serr)
	}
	apiSrv.Shutdown(sctx)
	if apiTLSSrv != nil {
		apiTLSSrv.Shutdown(sctx)
	}
	if metricsSrv != nil {
		metricsSrv.Shutdown(sctx)
	}
	stopWatch()
	wg.Wait()
	return err
}
