// Package tlsfiles makes and loads the X.509 files of an NBD server and
// its clients, in the directory layout that libnbd's tls-certificates=DIR
// (nbdinfo, nbdcopy, fio's nbd engine) and qemu's
// tls-creds-x509,dir=DIR expect: ca-cert.pem, server-cert.pem,
// server-key.pem, client-cert.pem and client-key.pem. The CA's own key is
// kept next to them as ca-key.pem so that more client certificates can be
// issued later; it must not be given to clients.
//
// Keys are ECDSA P-256 in PKCS#8 PEM, written with mode 0600; GnuTLS
// (which libnbd and qemu use) and Go accept them. Certificates carry the
// extensions qemu's sanity checks want: basic constraints on every
// certificate, key usage (certificate signing for the CA, digital
// signature and key encipherment for the others) and the server or
// client extended key usage.
package tlsfiles

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"
)

// File names in a certificate directory.
const (
	CACertFile     = "ca-cert.pem"
	CAKeyFile      = "ca-key.pem"
	ServerCertFile = "server-cert.pem"
	ServerKeyFile  = "server-key.pem"
	ClientCertFile = "client-cert.pem"
	ClientKeyFile  = "client-key.pem"
)

// DefaultHosts are the server certificate's names when Options.Hosts is
// empty.
var DefaultHosts = []string{"localhost", "127.0.0.1", "::1"}

// DefaultClientName is the client certificate's name when
// Options.ClientName is empty.
const DefaultClientName = "cryptnbd-client"

// Options select what Init creates.
type Options struct {
	// Hosts are the DNS names and IP addresses clients use to reach the
	// server; they become the server certificate's subject alternative
	// names. Empty means DefaultHosts.
	Hosts []string
	// ClientName is the client certificate's common name, also put in a
	// URI SAN (urn:cryptnbd:client:NAME) and, when it is a valid host
	// name, a DNS SAN. Empty means DefaultClientName.
	ClientName string
	// Validity is how long the certificates are valid. 0 means 365 days.
	Validity time.Duration
}

func (o Options) withDefaults() Options {
	if len(o.Hosts) == 0 {
		o.Hosts = DefaultHosts
	}
	if o.ClientName == "" {
		o.ClientName = DefaultClientName
	}
	if o.Validity <= 0 {
		o.Validity = 365 * 24 * time.Hour
	}
	return o
}

// ClientURI is the URI SAN given to the client certificate of name.
func ClientURI(name string) *url.URL {
	return &url.URL{Scheme: "urn", Opaque: "cryptnbd:client:" + url.PathEscape(name)}
}

// Init creates dir (mode 0700) if it does not exist and writes a new CA,
// a server certificate and a client certificate into it. It refuses to
// overwrite any of the files.
func Init(dir string, o Options) error {
	o = o.withDefaults()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("tlsfiles: %w", err)
	}
	for _, f := range []string{CACertFile, CAKeyFile, ServerCertFile, ServerKeyFile, ClientCertFile, ClientKeyFile} {
		if _, err := os.Lstat(filepath.Join(dir, f)); err == nil {
			return fmt.Errorf("tlsfiles: %s already exists: %w", filepath.Join(dir, f), fs.ErrExist)
		}
	}
	ca, err := newCA(o.Validity)
	if err != nil {
		return err
	}
	if err := ca.write(dir); err != nil {
		return err
	}
	if err := ca.issue(dir, ServerCertFile, ServerKeyFile, serverTemplate(o.Hosts), o.Validity); err != nil {
		return err
	}
	return ca.issue(dir, ClientCertFile, ClientKeyFile, clientTemplate(o.ClientName), o.Validity)
}

// IssueClient issues a client certificate for name from the CA in caDir
// (ca-cert.pem and ca-key.pem, as written by Init) and writes
// ca-cert.pem, client-cert.pem and client-key.pem into outDir (created
// with mode 0700): a directory a libnbd or qemu client can use as is.
// Existing files in outDir are replaced. validity 0 means 365 days.
func IssueClient(caDir, outDir, name string, validity time.Duration) error {
	if name == "" {
		return errors.New("tlsfiles: empty client name")
	}
	if validity <= 0 {
		validity = 365 * 24 * time.Hour
	}
	ca, err := loadCA(caDir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(outDir, 0o700); err != nil {
		return fmt.Errorf("tlsfiles: %w", err)
	}
	if err := writeFile(filepath.Join(outDir, CACertFile), ca.certPEM, 0o644); err != nil {
		return err
	}
	return ca.issue(outDir, ClientCertFile, ClientKeyFile, clientTemplate(name), validity)
}

type authority struct {
	cert    *x509.Certificate
	certPEM []byte
	key     crypto.Signer
}

func newKey() (*ecdsa.PrivateKey, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("tlsfiles: generate key: %w", err)
	}
	return k, nil
}

func serial() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("tlsfiles: serial number: %w", err)
	}
	return n.Add(n, big.NewInt(1)), nil
}

func newCA(validity time.Duration) (*authority, error) {
	key, err := newKey()
	if err != nil {
		return nil, err
	}
	sn, err := serial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          sn,
		Subject:               pkix.Name{CommonName: "cryptnbd CA", Organization: []string{"cryptnbd"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(validity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("tlsfiles: create CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("tlsfiles: %w", err)
	}
	return &authority{cert: cert, certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), key: key}, nil
}

func (ca *authority) write(dir string) error {
	keyPEM, err := marshalKey(ca.key)
	if err != nil {
		return err
	}
	if err := writeFile(filepath.Join(dir, CAKeyFile), keyPEM, 0o600); err != nil {
		return err
	}
	return writeFile(filepath.Join(dir, CACertFile), ca.certPEM, 0o644)
}

func loadCA(dir string) (*authority, error) {
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, fmt.Errorf("tlsfiles: load CA: %w", err)
	}
	signer, ok := pair.PrivateKey.(crypto.Signer)
	if !ok || pair.Leaf == nil || !pair.Leaf.IsCA {
		return nil, fmt.Errorf("tlsfiles: %s is not a CA certificate with its key", filepath.Join(dir, CACertFile))
	}
	return &authority{
		cert:    pair.Leaf,
		certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: pair.Leaf.Raw}),
		key:     signer,
	}, nil
}

func serverTemplate(hosts []string) *x509.Certificate {
	t := &x509.Certificate{
		Subject:     pkix.Name{CommonName: hosts[0], Organization: []string{"cryptnbd"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			t.IPAddresses = append(t.IPAddresses, ip)
		} else {
			t.DNSNames = append(t.DNSNames, h)
		}
	}
	return t
}

func clientTemplate(name string) *x509.Certificate {
	t := &x509.Certificate{
		Subject:     pkix.Name{CommonName: name, Organization: []string{"cryptnbd"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		URIs:        []*url.URL{ClientURI(name)},
	}
	if isHostname(name) {
		t.DNSNames = []string{name}
	}
	return t
}

// isHostname reports whether s is a DNS name Go and GnuTLS accept in a
// SAN: dot-separated labels of letters, digits and inner hyphens.
func isHostname(s string) bool {
	if len(s) == 0 || len(s) > 253 {
		return false
	}
	label := 0
	for i := 0; i < len(s); i++ {
		ch := s[i]
		switch {
		case ch == '.':
			if label == 0 || s[i-1] == '-' {
				return false
			}
			label = 0
			continue
		case ch == '-':
			if label == 0 {
				return false
			}
		case ch >= 'a' && ch <= 'z', ch >= 'A' && ch <= 'Z', ch >= '0' && ch <= '9':
		default:
			return false
		}
		label++
		if label > 63 {
			return false
		}
	}
	return label > 0 && s[len(s)-1] != '-'
}

// issue signs a leaf certificate from tmpl with a new key and writes
// both into dir.
func (ca *authority) issue(dir, certFile, keyFile string, tmpl *x509.Certificate, validity time.Duration) error {
	key, err := newKey()
	if err != nil {
		return err
	}
	if tmpl.SerialNumber, err = serial(); err != nil {
		return err
	}
	now := time.Now()
	tmpl.NotBefore = now.Add(-time.Hour)
	tmpl.NotAfter = now.Add(validity)
	if tmpl.NotAfter.After(ca.cert.NotAfter) {
		tmpl.NotAfter = ca.cert.NotAfter
	}
	tmpl.BasicConstraintsValid = true
	// qemu insists on key encipherment next to digital signature when
	// key usage is critical, as Go always makes it.
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		return fmt.Errorf("tlsfiles: create certificate for %q: %w", tmpl.Subject.CommonName, err)
	}
	keyPEM, err := marshalKey(key)
	if err != nil {
		return err
	}
	if err := writeFile(filepath.Join(dir, keyFile), keyPEM, 0o600); err != nil {
		return err
	}
	return writeFile(filepath.Join(dir, certFile), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

func marshalKey(k crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("tlsfiles: marshal key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// writeFile writes data to a new file in the same directory and renames
// it over name, so readers (and a reload) never see a partial file, and
// a key file never exists with a wider mode than perm.
func writeFile(name string, data []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(name), "."+filepath.Base(name)+".tmp*")
	if err != nil {
		return fmt.Errorf("tlsfiles: %w", err)
	}
	tmp := f.Name()
	err = f.Chmod(perm)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, name)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("tlsfiles: write %s: %w", name, err)
	}
	return nil
}

// ServerFiles name the files of a server's TLS credentials.
type ServerFiles struct {
	// Cert and Key are the server certificate (PEM, optionally followed
	// by intermediates) and its private key.
	Cert, Key string
	// CA, if set, holds the CA certificates that client certificates
	// are verified against. A client certificate that verifies is
	// reported in nbd.Peer; one that does not fails the handshake.
	CA string
	// VerifyPeer requires every client to present a certificate that
	// verifies against CA.
	VerifyPeer bool
}

// InDir returns the server files of a directory made by Init, with the
// CA set and VerifyPeer as given.
func InDir(dir string, verifyPeer bool) ServerFiles {
	return ServerFiles{
		Cert:       filepath.Join(dir, ServerCertFile),
		Key:        filepath.Join(dir, ServerKeyFile),
		CA:         filepath.Join(dir, CACertFile),
		VerifyPeer: verifyPeer,
	}
}

// Server is a server's TLS configuration loaded from files, which Reload
// replaces (on SIGHUP, say) without affecting established sessions. It is
// safe for concurrent use.
type Server struct {
	files ServerFiles
	cur   atomic.Pointer[tls.Config]
}

// LoadServer loads the files and returns the server credentials.
func LoadServer(f ServerFiles) (*Server, error) {
	if f.VerifyPeer && f.CA == "" {
		return nil, errors.New("tlsfiles: verifying client certificates needs a CA file")
	}
	s := &Server{files: f}
	if err := s.Reload(); err != nil {
		return nil, err
	}
	return s, nil
}

// Reload reads the files again. On error the previous configuration
// stays in use.
func (s *Server) Reload() error {
	pair, err := tls.LoadX509KeyPair(s.files.Cert, s.files.Key)
	if err != nil {
		return fmt.Errorf("tlsfiles: load server certificate: %w", err)
	}
	c := &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{pair},
	}
	if s.files.CA != "" {
		b, err := os.ReadFile(s.files.CA)
		if err != nil {
			return fmt.Errorf("tlsfiles: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(b) {
			return fmt.Errorf("tlsfiles: no certificate in %s", s.files.CA)
		}
		c.ClientCAs = pool
		c.ClientAuth = tls.VerifyClientCertIfGiven
		if s.files.VerifyPeer {
			c.ClientAuth = tls.RequireAndVerifyClientCert
		}
	}
	s.cur.Store(c)
	return nil
}

// Config returns a configuration for nbd.Options.TLSConfig that uses
// whatever was loaded last for each new session.
func (s *Server) Config() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return s.cur.Load(), nil
		},
	}
}

// Leaf returns the server certificate loaded last.
func (s *Server) Leaf() *x509.Certificate {
	return s.cur.Load().Certificates[0].Leaf
}

// LoadClient returns a Go client configuration from a directory laid out
// for libnbd (ca-cert.pem, and client-cert.pem with client-key.pem if
// present), verifying the server as serverName.
func LoadClient(dir, serverName string) (*tls.Config, error) {
	b, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		return nil, fmt.Errorf("tlsfiles: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("tlsfiles: no certificate in %s", filepath.Join(dir, CACertFile))
	}
	c := &tls.Config{RootCAs: pool, ServerName: serverName, MinVersion: tls.VersionTLS12}
	certFile, keyFile := filepath.Join(dir, ClientCertFile), filepath.Join(dir, ClientKeyFile)
	if _, err := os.Stat(certFile); err == nil {
		pair, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("tlsfiles: load client certificate: %w", err)
		}
		c.Certificates = []tls.Certificate{pair}
	}
	return c, nil
}
