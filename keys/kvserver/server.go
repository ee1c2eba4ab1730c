package kvserver

import (
	"context"
	"crypto/rsa"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// DefaultListen is the address ListenAndServe binds when Options.Listen is empty.
const DefaultListen = "127.0.0.1:8443"

// Options configure a Server.
type Options struct {
	// DataDir holds the CA, certificates, secrets and vault state. It is
	// created (mode 0700) if missing. Required.
	DataDir string
	// Listen is the TCP address Listen binds; empty means DefaultListen.
	// Use "127.0.0.1:0" for an ephemeral port.
	Listen string
	// PurgeProtection refuses purge of soft-deleted keys (403); they are
	// purged automatically after the retention period.
	PurgeProtection bool
	// SoftDeleteRetentionDays is 7–90; zero means 90.
	SoftDeleteRetentionDays int
	// Logger receives start-up and error logs; nil discards them.
	Logger *slog.Logger
	// ExtraHosts are added to the server certificate's SANs next to
	// 127.0.0.1, ::1 and localhost (host names or IP addresses).
	ExtraHosts []string
	// PageSize is the number of items per list page before a nextLink;
	// zero means 25, as Key Vault.
	PageSize int
}

// Server is a local Key Vault-compatible HTTPS server: the keys data plane
// of api-version 2025-07-01, an App Service style managed-identity token
// endpoint, and admin endpoints for access policies, principals and fault
// injection. All its methods are safe for concurrent use. One mutex guards
// the vault state and is held across each mutation and its atomic save, so
// the file on disk always matches a state some client has observed.
type Server struct {
	opts     Options
	log      *slog.Logger
	secrets  *secrets
	sealer   *sealer
	tenantID string
	caPEM    []byte
	httpSrv  *http.Server
	clock    func() time.Time // time.Now; tests may replace it before serving

	mu           sync.Mutex
	st           *state
	priv         map[string]*rsa.PrivateKey // "name/version" → unsealed key
	url          string                     // set by Listen or Serve
	throttleLeft int                        // requests still to answer 429
	throttleSecs int
	throttleMS   int
	outage       bool
}

// New opens or initialises the vault in o.DataDir: on first start it creates
// the CA (DIR/ca.pem), server certificate, secrets, an administrator
// principal and an empty vault. It does not listen.
func New(o Options) (*Server, error) {
	if o.DataDir == "" {
		return nil, errors.New("kvserver: Options.DataDir is required")
	}
	if o.Listen == "" {
		o.Listen = DefaultListen
	}
	if o.SoftDeleteRetentionDays == 0 {
		o.SoftDeleteRetentionDays = 90
	}
	if o.SoftDeleteRetentionDays < 7 || o.SoftDeleteRetentionDays > 90 {
		return nil, fmt.Errorf("kvserver: soft-delete retention %d days is outside 7–90", o.SoftDeleteRetentionDays)
	}
	if o.PageSize <= 0 {
		o.PageSize = 25
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	dir, err := filepath.Abs(o.DataDir)
	if err != nil {
		return nil, fmt.Errorf("kvserver: data dir: %w", err)
	}
	o.DataDir = dir
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("kvserver: data dir: %w", err)
	}
	sec, err := loadOrCreateSecrets(dir)
	if err != nil {
		return nil, err
	}
	sl, err := newSealer(sec.StorageKey)
	if err != nil {
		return nil, err
	}
	st, ok, err := loadState(dir)
	if err != nil {
		return nil, err
	}
	if !ok {
		admin := &Principal{ObjectID: newUUID(), ClientID: newUUID(), Name: "admin"}
		st = &state{
			TenantID:      newUUID(),
			AdminObjectID: admin.ObjectID,
			Principals:    map[string]*Principal{admin.ObjectID: admin},
			Policies:      map[string][]string{},
			Keys:          map[string]*vaultKey{},
		}
		if err := saveState(dir, st); err != nil {
			return nil, err
		}
	}
	hosts := []string{"127.0.0.1", "::1", "localhost"}
	for _, h := range o.ExtraHosts {
		if h != "" && !slices.Contains(hosts, h) {
			hosts = append(hosts, h)
		}
	}
	cert, caPEM, err := loadOrCreateTLS(dir, hosts, time.Now())
	if err != nil {
		return nil, err
	}
	s := &Server{
		opts: o, log: o.Logger, secrets: sec, sealer: sl, tenantID: st.TenantID, caPEM: caPEM,
		st: st, priv: map[string]*rsa.PrivateKey{}, clock: time.Now,
	}
	s.httpSrv = &http.Server{
		Handler:           s,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(o.Logger.Handler(), slog.LevelDebug),
	}
	return s, nil
}

func (s *Server) now() time.Time { return s.clock() }

// Listen binds Options.Listen, records the vault URL and writes
// DIR/admin.json for local clients. Pass the listener to Serve.
func (s *Server) Listen() (net.Listener, error) {
	l, err := net.Listen("tcp", s.opts.Listen)
	if err != nil {
		return nil, fmt.Errorf("kvserver: listen: %w", err)
	}
	if err := s.setAddr(l.Addr()); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// setAddr records the URL clients use for addr and writes admin.json.
func (s *Server) setAddr(addr net.Addr) error {
	host, port, err := net.SplitHostPort(addr.String())
	if err != nil {
		return fmt.Errorf("kvserver: listener address: %w", err)
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	u := "https://" + net.JoinHostPort(host, port)
	s.mu.Lock()
	admin := s.st.Principals[s.st.AdminObjectID]
	cfg := AdminConfig{
		VaultURL:         u,
		IdentityEndpoint: u + identityPath,
		IdentityHeader:   s.secrets.IdentityHeader,
		TenantID:         s.tenantID,
		AdminObjectID:    admin.ObjectID,
		AdminClientID:    admin.ClientID,
		CAFile:           filepath.Join(s.opts.DataDir, caFile),
		Resource:         Resource,
	}
	s.mu.Unlock()
	// admin.json exists before URL reports the server as listening.
	if err := cfg.write(filepath.Join(s.opts.DataDir, adminFile)); err != nil {
		return err
	}
	s.mu.Lock()
	s.url = u
	s.mu.Unlock()
	return nil
}

// URL is the vault URL, https://host:port, or "" before Listen or Serve.
func (s *Server) URL() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.url
}

// CAPEM returns the PEM of the CA that signed the server certificate.
func (s *Server) CAPEM() []byte { return slices.Clone(s.caPEM) }

// AdminObjectID is the object id of the administrator principal.
func (s *Server) AdminObjectID() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st.AdminObjectID
}

// Serve accepts TLS connections on l until ctx is done or Shutdown is
// called, then returns nil; otherwise it returns the listener's error.
// It closes l. On ctx cancellation in-flight requests get 5 s to finish.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	if s.URL() == "" {
		if err := s.setAddr(l.Addr()); err != nil {
			l.Close()
			return err
		}
	}
	s.log.Info("key vault listening", "url", s.URL(), "dataDir", s.opts.DataDir,
		"purgeProtection", s.opts.PurgeProtection, "retentionDays", s.opts.SoftDeleteRetentionDays)
	stop := context.AfterFunc(ctx, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Shutdown(sctx)
	})
	defer stop()
	err := s.httpSrv.ServeTLS(l, "", "")
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return fmt.Errorf("kvserver: serve: %w", err)
}

// ListenAndServe is Listen followed by Serve.
func (s *Server) ListenAndServe(ctx context.Context) error {
	l, err := s.Listen()
	if err != nil {
		return err
	}
	return s.Serve(ctx, l)
}

// Shutdown stops the listener and waits, under ctx, for in-flight requests;
// when ctx ends first it closes the remaining connections.
func (s *Server) Shutdown(ctx context.Context) error {
	err := s.httpSrv.Shutdown(ctx)
	if err != nil {
		s.httpSrv.Close()
		return fmt.Errorf("kvserver: shutdown: %w", err)
	}
	return nil
}

// recoveryLevel is the vault's recoveryLevel and recoverableDays.
func (s *Server) recoveryLevel() (string, int) {
	days := s.opts.SoftDeleteRetentionDays
	level := "Recoverable"
	if days < 90 {
		level = "CustomizedRecoverable"
	}
	if !s.opts.PurgeProtection {
		level += "+Purgeable"
	}
	return level, days
}

// ServeHTTP routes a request. It implements http.Handler so the server can
// also be mounted behind another TLS front end.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	defer func() {
		if v := recover(); v != nil {
			if v == http.ErrAbortHandler {
				panic(v)
			}
			s.log.Error("panic in handler", "path", r.URL.Path, "panic", v)
			writeError(w, &kvError{status: http.StatusInternalServerError, code: "InternalError", msg: "internal error"})
		}
	}()
	p := r.URL.Path
	switch {
	case p == identityPath:
		s.serveToken(w, r)
	case strings.HasPrefix(p, "/admin/"):
		s.serveAdmin(w, r)
	case p == "/keys" || strings.HasPrefix(p, "/keys/") || p == "/deletedkeys" || strings.HasPrefix(p, "/deletedkeys/"):
		s.serveVault(w, r)
	default:
		writeError(w, &kvError{status: http.StatusNotFound, code: "NotFound", msg: "no such endpoint: " + r.Method + " " + p})
	}
}

// serveVault handles the Key Vault keys data plane.
func (s *Server) serveVault(w http.ResponseWriter, r *http.Request) {
	p := s.authenticate(w, r)
	if p == nil {
		return
	}
	if e := s.fault(); e != nil {
		writeError(w, e)
		return
	}
	if r.URL.Query().Get("api-version") == "" {
		writeError(w, badParameter("The api-version query parameter is required."))
		return
	}
	status, v, e := s.route(r, p)
	if e != nil {
		s.log.Debug("key vault request failed", "op", r.Method, "path", r.URL.Path, "code", e.code, "inner", e.inner, "status", e.status)
		writeError(w, e)
		return
	}
	if v == nil {
		w.WriteHeader(status)
		return
	}
	writeJSON(w, status, v)
}

// fault returns the injected outage or throttling response, if any.
func (s *Server) fault() *kvError {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.outage {
		return &kvError{status: http.StatusServiceUnavailable, code: "ServiceUnavailable", msg: "The service is unavailable (simulated outage)."}
	}
	if s.throttleLeft > 0 {
		s.throttleLeft--
		return &kvError{status: http.StatusTooManyRequests, code: "Throttled", retryAfter: s.throttleSecs, retryAfterMS: s.throttleMS,
			msg: "Request was not processed because too many requests were received. Reason: VaultRequestTypeLimitReached"}
	}
	return nil
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
