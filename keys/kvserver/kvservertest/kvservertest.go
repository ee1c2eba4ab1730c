// Package kvservertest starts a kvserver in-process for tests: a real
// HTTPS Key Vault on 127.0.0.1 with its own CA, plus helpers to make
// principals, credentials and azkeys clients.
package kvservertest

import (
	"context"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/cryptnbd/cryptnbd/keys/kvserver"
)

// Instance is a running server. Its fields are fixed until Restart, which
// keeps URL and DataDir; it is not safe to Restart concurrently with use.
type Instance struct {
	Server        *kvserver.Server
	Options       kvserver.Options      // as started; DataDir and Listen filled in
	URL           string                // https://127.0.0.1:port
	Config        *kvserver.AdminConfig // DIR/admin.json
	CAPool        *x509.CertPool
	ClientOptions azcore.ClientOptions  // transport trusting CAPool
	Admin         *kvserver.AdminClient // as the administrator, via DirectCredential

	done chan error
}

// Start runs a server until the test ends. A zero o.DataDir means a fresh
// t.TempDir(); a zero o.Listen means 127.0.0.1:0.
func Start(t testing.TB, o kvserver.Options) *Instance {
	t.Helper()
	if o.DataDir == "" {
		o.DataDir = t.TempDir()
	}
	if o.Listen == "" {
		o.Listen = "127.0.0.1:0"
	}
	in := &Instance{}
	in.start(t, o)
	t.Cleanup(func() { in.stop(t) })
	return in
}

func (in *Instance) start(t testing.TB, o kvserver.Options) {
	t.Helper()
	s, err := kvserver.New(o)
	if err != nil {
		t.Fatalf("kvservertest: %v", err)
	}
	var l net.Listener
	for try := 0; ; try++ { // a restart may briefly race the old socket's close
		if l, err = s.Listen(); err == nil || try == 50 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("kvservertest: %v", err)
	}
	o.Listen = l.Addr().String()
	cfg, err := kvserver.LoadAdminConfig(o.DataDir)
	if err != nil {
		t.Fatalf("kvservertest: %v", err)
	}
	pool, err := cfg.CertPool()
	if err != nil {
		t.Fatalf("kvservertest: %v", err)
	}
	in.Server, in.Options, in.URL, in.Config, in.CAPool = s, o, s.URL(), cfg, pool
	in.ClientOptions = kvserver.ClientOptionsFor(pool)
	admin, err := cfg.DirectCredential("")
	if err != nil {
		t.Fatalf("kvservertest: %v", err)
	}
	in.Admin, err = kvserver.NewAdminClient(in.URL, admin, &in.ClientOptions)
	if err != nil {
		t.Fatalf("kvservertest: %v", err)
	}
	in.done = make(chan error, 1)
	go func() { in.done <- s.Serve(context.Background(), l) }()
}

func (in *Instance) stop(t testing.TB) {
	t.Helper()
	if in.done == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := in.Server.Shutdown(ctx); err != nil {
		t.Errorf("kvservertest: %v", err)
	}
	if err := <-in.done; err != nil && !errors.Is(err, http.ErrServerClosed) {
		t.Errorf("kvservertest: serve: %v", err)
	}
	in.done = nil
}

// Restart stops the server and starts a new one on the same data dir and
// address, as after a daemon restart.
func (in *Instance) Restart(t testing.TB) {
	t.Helper()
	in.stop(t)
	in.start(t, in.Options)
}

// NewPrincipal creates an identity and, if perms are given, its access
// policy.
func (in *Instance) NewPrincipal(t testing.TB, name string, perms ...string) kvserver.Principal {
	t.Helper()
	ctx := context.Background()
	p, err := in.Admin.CreatePrincipal(ctx, name)
	if err != nil {
		t.Fatalf("kvservertest: create principal: %v", err)
	}
	if len(perms) > 0 {
		if err := in.Admin.SetPolicy(ctx, p.ObjectID, perms); err != nil {
			t.Fatalf("kvservertest: set policy: %v", err)
		}
	}
	return p
}

// Credential returns a token credential for objectID ("" for the
// administrator) that does not depend on the environment, so it suits
// parallel tests.
func (in *Instance) Credential(t testing.TB, objectID string) azcore.TokenCredential {
	t.Helper()
	c, err := in.Config.DirectCredential(objectID)
	if err != nil {
		t.Fatalf("kvservertest: %v", err)
	}
	return c
}

// ManagedIdentityCredential returns azidentity's ManagedIdentityCredential
// for objectID ("" for the administrator), pointed at this server through
// t.Setenv(IDENTITY_ENDPOINT, IDENTITY_HEADER). Like t.Setenv it cannot be
// used in parallel tests.
func (in *Instance) ManagedIdentityCredential(t testing.TB, objectID string) azcore.TokenCredential {
	t.Helper()
	t.Setenv("IDENTITY_ENDPOINT", in.Config.IdentityEndpoint)
	t.Setenv("IDENTITY_HEADER", in.Config.IdentityHeader)
	c, err := in.Config.Credential(objectID)
	if err != nil {
		t.Fatalf("kvservertest: %v", err)
	}
	return c
}

// KeysClient returns an azkeys client for this vault authenticating with
// cred. opts may be nil; its Transport, if nil, is one trusting the CA.
// DisableChallengeResourceVerification is always set.
func (in *Instance) KeysClient(t testing.TB, cred azcore.TokenCredential, opts *azkeys.ClientOptions) *azkeys.Client {
	t.Helper()
	o := azkeys.ClientOptions{}
	if opts != nil {
		o = *opts
	}
	if o.Transport == nil {
		o.Transport = in.ClientOptions.Transport
	}
	o.DisableChallengeResourceVerification = true
	c, err := azkeys.NewClient(in.URL, cred, &o)
	if err != nil {
		t.Fatalf("kvservertest: %v", err)
	}
	return c
}
