package tlsfiles_test

import (
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/cryptnbd/cryptnbd/nbd/tlsfiles"
)

func readCert(t *testing.T, name string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		t.Fatalf("%s: no CERTIFICATE block", name)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestInit(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	if err := tlsfiles.Init(dir, tlsfiles.Options{Hosts: []string{"nbd.example", "10.1.2.3"}, ClientName: "backup-1", Validity: 48 * time.Hour}); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("dir mode %v, %v; want 0700", st.Mode().Perm(), err)
	}
	for _, tt := range []struct {
		file string
		mode fs.FileMode
	}{
		{tlsfiles.CACertFile, 0o644}, {tlsfiles.CAKeyFile, 0o600},
		{tlsfiles.ServerCertFile, 0o644}, {tlsfiles.ServerKeyFile, 0o600},
		{tlsfiles.ClientCertFile, 0o644}, {tlsfiles.ClientKeyFile, 0o600},
	} {
		st, err := os.Stat(filepath.Join(dir, tt.file))
		if err != nil {
			t.Errorf("%s: %v", tt.file, err)
			continue
		}
		if got := st.Mode().Perm(); got != tt.mode {
			t.Errorf("%s mode %v, want %v", tt.file, got, tt.mode)
		}
	}
	ca := readCert(t, filepath.Join(dir, tlsfiles.CACertFile))
	srv := readCert(t, filepath.Join(dir, tlsfiles.ServerCertFile))
	cli := readCert(t, filepath.Join(dir, tlsfiles.ClientCertFile))
	if !ca.IsCA || ca.KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Errorf("CA: IsCA %v key usage %v", ca.IsCA, ca.KeyUsage)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	if _, err := srv.Verify(x509.VerifyOptions{Roots: roots, DNSName: "nbd.example"}); err != nil {
		t.Errorf("server certificate for nbd.example: %v", err)
	}
	if err := srv.VerifyHostname("10.1.2.3"); err != nil {
		t.Errorf("server certificate for 10.1.2.3: %v", err)
	}
	if err := srv.VerifyHostname("localhost"); err == nil {
		t.Errorf("server certificate valid for localhost, which was not asked for")
	}
	if _, err := cli.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("client certificate: %v", err)
	}
	if _, err := cli.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err == nil {
		t.Errorf("client certificate usable as a server certificate")
	}
	if cli.Subject.CommonName != "backup-1" || !slices.Contains(cli.DNSNames, "backup-1") ||
		len(cli.URIs) != 1 || cli.URIs[0].String() != tlsfiles.ClientURI("backup-1").String() {
		t.Errorf("client names: CN %q DNS %v URIs %v", cli.Subject.CommonName, cli.DNSNames, cli.URIs)
	}
	if d := cli.NotAfter.Sub(cli.NotBefore); d < 48*time.Hour || d > 50*time.Hour {
		t.Errorf("client validity %v, want about 48h", d)
	}
	for _, c := range []*x509.Certificate{srv, cli} {
		if _, ok := c.PublicKey.(*ecdsa.PublicKey); !ok {
			t.Errorf("%s: key %T, want ECDSA", c.Subject.CommonName, c.PublicKey)
		}
		if !c.BasicConstraintsValid || c.IsCA {
			t.Errorf("%s: basic constraints %v IsCA %v", c.Subject.CommonName, c.BasicConstraintsValid, c.IsCA)
		}
		if want := x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment; c.KeyUsage != want {
			t.Errorf("%s: key usage %v, want %v", c.Subject.CommonName, c.KeyUsage, want)
		}
	}
	if _, err := tls.LoadX509KeyPair(filepath.Join(dir, tlsfiles.ServerCertFile), filepath.Join(dir, tlsfiles.ServerKeyFile)); err != nil {
		t.Errorf("server pair: %v", err)
	}
	// Init does not overwrite.
	if err := tlsfiles.Init(dir, tlsfiles.Options{}); !errors.Is(err, fs.ErrExist) {
		t.Errorf("second Init: %v, want ErrExist", err)
	}
}

func TestDefaultsAndOpenSSL(t *testing.T) {
	dir := t.TempDir()
	if err := tlsfiles.Init(dir, tlsfiles.Options{ClientName: "not a host name"}); err != nil {
		t.Fatal(err)
	}
	srv := readCert(t, filepath.Join(dir, tlsfiles.ServerCertFile))
	for _, h := range tlsfiles.DefaultHosts {
		if err := srv.VerifyHostname(h); err != nil {
			t.Errorf("default server certificate for %s: %v", h, err)
		}
	}
	cli := readCert(t, filepath.Join(dir, tlsfiles.ClientCertFile))
	if len(cli.DNSNames) != 0 || cli.Subject.CommonName != "not a host name" {
		t.Errorf("client DNS names %v CN %q", cli.DNSNames, cli.Subject.CommonName)
	}
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl not installed (Debian package openssl)")
	}
	for _, tt := range []struct{ file, purpose string }{
		{tlsfiles.ServerCertFile, "sslserver"},
		{tlsfiles.ClientCertFile, "sslclient"},
	} {
		out, err := exec.Command("openssl", "verify", "-purpose", tt.purpose, "-CAfile", filepath.Join(dir, tlsfiles.CACertFile), filepath.Join(dir, tt.file)).CombinedOutput()
		if err != nil {
			t.Errorf("openssl verify %s: %v\n%s", tt.file, err, out)
		}
	}
}

func TestIssueClient(t *testing.T) {
	dir, out := t.TempDir(), filepath.Join(t.TempDir(), "alice")
	if err := tlsfiles.Init(dir, tlsfiles.Options{}); err != nil {
		t.Fatal(err)
	}
	if err := tlsfiles.IssueClient(dir, out, "alice", 0); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(out, tlsfiles.CAKeyFile)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("CA key copied to the client directory: %v", err)
	}
	cli := readCert(t, filepath.Join(out, tlsfiles.ClientCertFile))
	roots := x509.NewCertPool()
	roots.AddCert(readCert(t, filepath.Join(out, tlsfiles.CACertFile)))
	if _, err := cli.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("issued certificate: %v", err)
	}
	if cli.Subject.CommonName != "alice" {
		t.Errorf("CN %q", cli.Subject.CommonName)
	}
	if err := tlsfiles.IssueClient(t.TempDir(), out, "bob", 0); err == nil {
		t.Errorf("IssueClient without a CA succeeded")
	}
}

// handshake runs a TLS handshake between a Go client from cliDir and the
// server credentials, returning the server's view of the client chain.
func handshake(t *testing.T, s *tlsfiles.Server, cliDir string) (*tls.ConnectionState, error) {
	t.Helper()
	cc, err := tlsfiles.LoadClient(cliDir, "localhost")
	if err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	errc := make(chan error, 1)
	go func() {
		c := tls.Client(a, cc)
		err := c.Handshake()
		if err == nil {
			// TLS 1.3 reports a rejected client certificate on the
			// first read.
			_, err = c.Read(make([]byte, 1))
		}
		errc <- err
	}()
	sc := tls.Server(b, s.Config())
	if err := sc.Handshake(); err != nil {
		a.Close()
		<-errc
		return nil, err
	}
	st := sc.ConnectionState()
	sc.Write([]byte{1})
	if err := <-errc; err != nil {
		return nil, err
	}
	return &st, nil
}

func TestServerReload(t *testing.T) {
	dir := t.TempDir()
	if err := tlsfiles.Init(dir, tlsfiles.Options{}); err != nil {
		t.Fatal(err)
	}
	if _, err := tlsfiles.LoadServer(tlsfiles.ServerFiles{Cert: filepath.Join(dir, tlsfiles.ServerCertFile), Key: filepath.Join(dir, tlsfiles.ServerKeyFile), VerifyPeer: true}); err == nil {
		t.Errorf("VerifyPeer without CA accepted")
	}
	s, err := tlsfiles.LoadServer(tlsfiles.InDir(dir, true))
	if err != nil {
		t.Fatal(err)
	}
	st, err := handshake(t, s, dir)
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	if len(st.VerifiedChains) == 0 || st.VerifiedChains[0][0].Subject.CommonName != tlsfiles.DefaultClientName {
		t.Errorf("client not verified: %+v", st.VerifiedChains)
	}
	first := s.Leaf().SerialNumber

	// A client without a certificate is refused.
	bare := t.TempDir()
	if err := os.Link(filepath.Join(dir, tlsfiles.CACertFile), filepath.Join(bare, tlsfiles.CACertFile)); err != nil {
		t.Fatal(err)
	}
	if _, err := handshake(t, s, bare); err == nil {
		t.Errorf("client without certificate accepted")
	}

	// Replace the files with a new PKI; Reload picks them up. A broken
	// file leaves the last good configuration in place.
	next := t.TempDir()
	if err := tlsfiles.Init(next, tlsfiles.Options{}); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{tlsfiles.CACertFile, tlsfiles.ServerCertFile, tlsfiles.ServerKeyFile} {
		b, _ := os.ReadFile(filepath.Join(next, f))
		os.WriteFile(filepath.Join(dir, f), b, 0o600)
	}
	if err := s.Reload(); err != nil {
		t.Fatal(err)
	}
	if s.Leaf().SerialNumber.Cmp(first) == 0 {
		t.Errorf("Reload kept the old certificate")
	}
	if _, err := handshake(t, s, next); err != nil {
		t.Errorf("handshake with the new PKI: %v", err)
	}
	if _, err := handshake(t, s, dir); err == nil {
		t.Errorf("client of the old CA accepted after reload")
	}
	os.WriteFile(filepath.Join(dir, tlsfiles.ServerKeyFile), []byte("junk"), 0o600)
	if err := s.Reload(); err == nil {
		t.Errorf("Reload of a broken key succeeded")
	}
	if _, err := handshake(t, s, next); err != nil {
		t.Errorf("handshake after a failed reload: %v", err)
	}
}
