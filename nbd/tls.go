package nbd

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
)

// TLSMode selects how a server treats TLS, as nbdkit's --tls does.
type TLSMode int

const (
	// TLSOff refuses NBD_OPT_STARTTLS with NBD_REP_ERR_UNSUP ("NOTLS" in
	// the protocol).
	TLSOff TLSMode = iota
	// TLSOn lets each client choose: plain clients are served, and a
	// client that sends NBD_OPT_STARTTLS is served over TLS.
	TLSOn
	// TLSRequire answers every option but NBD_OPT_STARTTLS and
	// NBD_OPT_ABORT with NBD_REP_ERR_TLS_REQD until TLS is up, and closes
	// the connection on NBD_OPT_EXPORT_NAME ("FORCEDTLS"). Nothing about
	// the exports is revealed before TLS.
	TLSRequire
)

var tlsModeNames = [...]string{"off", "on", "require"}

// String returns "off", "on" or "require".
func (m TLSMode) String() string {
	if m >= 0 && int(m) < len(tlsModeNames) {
		return tlsModeNames[m]
	}
	return fmt.Sprintf("TLSMode(%d)", int(m))
}

// MarshalText implements encoding.TextMarshaler.
func (m TLSMode) MarshalText() ([]byte, error) { return []byte(m.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler, accepting "off",
// "on" and "require", so a TLSMode can be a flag.TextVar.
func (m *TLSMode) UnmarshalText(b []byte) error {
	for i, n := range tlsModeNames {
		if string(b) == n {
			*m = TLSMode(i)
			return nil
		}
	}
	return fmt.Errorf("nbd: TLS mode %q: want off, on or require", b)
}

// Peer describes the client of a connection. The server puts it in the
// context passed to Catalog.Export and Catalog.Exports (and to Backend
// calls), so the catalog can decide per client what it may see and open.
type Peer struct {
	// Addr is the client's address (a *net.TCPAddr for TCP).
	Addr net.Addr
	// TLS reports that NBD_OPT_STARTTLS succeeded on this connection.
	TLS bool
	// Certificate is the client's certificate if it sent one and it was
	// verified against tls.Config.ClientCAs; nil otherwise. An unverified
	// certificate (tls.RequestClientCert) is never reported.
	Certificate *x509.Certificate
}

type peerKey struct{}

// PeerFromContext returns the peer of the connection a Catalog or
// Backend call is made for. ok is false for a context that did not come
// from the server.
func PeerFromContext(ctx context.Context) (p Peer, ok bool) {
	p, ok = ctx.Value(peerKey{}).(Peer)
	return p, ok
}

// serverTLSConfig returns the configuration used for STARTTLS: a copy of
// c that never negotiates below TLS 1.2, including configurations
// returned by c.GetConfigForClient (which is how certificates are
// reloaded without a restart).
func serverTLSConfig(c *tls.Config) *tls.Config {
	c = c.Clone()
	c.MinVersion = max(c.MinVersion, tls.VersionTLS12)
	if get := c.GetConfigForClient; get != nil {
		c.GetConfigForClient = func(hi *tls.ClientHelloInfo) (*tls.Config, error) {
			nc, err := get(hi)
			if err != nil || nc == nil || nc.MinVersion >= tls.VersionTLS12 {
				return nc, err
			}
			nc = nc.Clone()
			nc.MinVersion = tls.VersionTLS12
			return nc, nil
		}
	}
	return c
}

// peerOf describes a connection, with the verified client certificate of
// tc if TLS is up.
func peerOf(nc net.Conn, tc *tls.Conn) Peer {
	p := Peer{Addr: nc.RemoteAddr()}
	if tc != nil {
		p.TLS = true
		if st := tc.ConnectionState(); len(st.VerifiedChains) > 0 && len(st.VerifiedChains[0]) > 0 {
			p.Certificate = st.VerifiedChains[0][0]
		}
	}
	return p
}

// peer returns the connection's Peer as the Catalog sees it.
func (c *conn) peer() Peer {
	p, _ := PeerFromContext(c.ctx)
	return p
}
