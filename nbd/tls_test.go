package nbd_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/cryptnbd/cryptnbd/nbd"
	"github.com/cryptnbd/cryptnbd/nbd/nbdtest"
	"github.com/cryptnbd/cryptnbd/nbd/tlsfiles"
)

const (
	optStartTLS   = 5
	repErrPolicy  = 1<<31 + 2
	repErrTLSReqd = 1<<31 + 5
)

// newPKI writes a CA with server and client ("client") certificates, as
// `cryptnbd tls init` does, into a new directory.
func newPKI(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "pki")
	if err := tlsfiles.Init(dir, tlsfiles.Options{ClientName: "client"}); err != nil {
		t.Fatal(err)
	}
	return dir
}

// clientPKI issues a client certificate for name from the CA in caDir and
// returns the client's directory.
func clientPKI(t testing.TB, caDir, name string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), name)
	if err := tlsfiles.IssueClient(caDir, dir, name, 0); err != nil {
		t.Fatal(err)
	}
	return dir
}

// mixPKI returns a client directory trusting caDir's CA but holding the
// client certificate of certDir.
func mixPKI(t testing.TB, caDir, certDir string) string {
	t.Helper()
	dir := t.TempDir()
	copyFile(t, filepath.Join(caDir, tlsfiles.CACertFile), filepath.Join(dir, tlsfiles.CACertFile))
	if certDir != "" {
		copyFile(t, filepath.Join(certDir, tlsfiles.ClientCertFile), filepath.Join(dir, tlsfiles.ClientCertFile))
		copyFile(t, filepath.Join(certDir, tlsfiles.ClientKeyFile), filepath.Join(dir, tlsfiles.ClientKeyFile))
	}
	return dir
}

func copyFile(t testing.TB, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func clientConf(t testing.TB, dir string) *tls.Config {
	t.Helper()
	c, err := tlsfiles.LoadClient(dir, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// serverCreds loads the server side of a PKI directory.
func serverCreds(t testing.TB, dir string, verifyPeer bool) *tlsfiles.Server {
	t.Helper()
	s, err := tlsfiles.LoadServer(tlsfiles.InDir(dir, verifyPeer))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// tryTLS sends NBD_OPT_STARTTLS and, after an ACK, runs the TLS handshake
// and one round trip (an unknown option), which is where TLS 1.3 reports
// a rejected client certificate. It returns the reply to STARTTLS and the
// handshake's error.
func (c *client) tryTLS(cfg *tls.Config) (uint32, error) {
	c.t.Helper()
	c.sendOpt(optStartTLS, nil)
	r := c.readOptReply()
	if r.typ != repAck {
		return r.typ, nil
	}
	tc := tls.Client(c.nc, cfg)
	if err := tc.Handshake(); err != nil {
		return r.typ, err
	}
	c.nc, c.br = tc, bufio.NewReader(tc)
	b := binary.BigEndian.AppendUint64(nil, magicOpt)
	b = binary.BigEndian.AppendUint32(b, 99)
	b = binary.BigEndian.AppendUint32(b, 0)
	if _, err := tc.Write(b); err != nil {
		return r.typ, err
	}
	var hdr [20]byte
	if _, err := c.br.Read(hdr[:1]); err != nil {
		return r.typ, err
	}
	if _, err := c.br.Discard(19); err != nil {
		return r.typ, err
	}
	return r.typ, nil
}

// startTLS upgrades the connection and fails the test if it cannot.
func (c *client) startTLS(cfg *tls.Config) {
	c.t.Helper()
	typ, err := c.tryTLS(cfg)
	if typ != repAck || err != nil {
		c.t.Fatalf("STARTTLS: reply %#x, handshake %v", typ, err)
	}
}

// aclCatalog grants the exports of an nbdtest.Catalog by the common name
// of the client's verified certificate: names in rw get read-write
// access, names in ro read-only access, anyone else sees no exports. It
// records the peers it was asked about.
type aclCatalog struct {
	*nbdtest.Catalog
	rw, ro []string

	mu    sync.Mutex
	peers []nbd.Peer
}

func (a *aclCatalog) access(ctx context.Context) (ok, readOnly bool) {
	p, found := nbd.PeerFromContext(ctx)
	a.mu.Lock()
	a.peers = append(a.peers, p)
	a.mu.Unlock()
	if !found || p.Certificate == nil {
		return false, false
	}
	cn := p.Certificate.Subject.CommonName
	return slices.Contains(a.rw, cn) || slices.Contains(a.ro, cn), slices.Contains(a.ro, cn)
}

func (a *aclCatalog) Export(ctx context.Context, name string) (*nbd.Export, error) {
	ok, ro := a.access(ctx)
	if !ok {
		return nil, fmt.Errorf("acl: export %q: %w", name, nbd.ErrUnknownExport)
	}
	exp, err := a.Catalog.Export(ctx, name)
	if err != nil {
		return nil, err
	}
	exp.ReadOnly = exp.ReadOnly || ro
	return exp, nil
}

func (a *aclCatalog) Exports(ctx context.Context) ([]nbd.ExportInfo, error) {
	if ok, _ := a.access(ctx); !ok {
		return nil, nil
	}
	return a.Catalog.Exports(ctx)
}

func (a *aclCatalog) lastPeer() nbd.Peer {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.peers[len(a.peers)-1]
}

// refusals records OnRefused calls.
type refusals struct {
	mu      sync.Mutex
	reasons []string
}

func (r *refusals) hook(reason string, _ nbd.Peer) {
	r.mu.Lock()
	r.reasons = append(r.reasons, reason)
	r.mu.Unlock()
}

// wait returns the refusals once there are at least n, or after 5
// seconds: a client can see its TLS handshake fail before the server has
// counted it.
func (r *refusals) wait(n int) []string {
	deadline := time.Now().Add(5 * time.Second)
	for len(r.list()) < n && time.Now().Before(deadline) {
		time.Sleep(2 * time.Millisecond)
	}
	return r.list()
}

func (r *refusals) list() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.reasons)
}

// tlsEnv is newEnv on TCP with TLS from a new PKI.
func tlsEnv(t *testing.T, mode nbd.TLSMode, verifyPeer bool, o nbd.Options) (*env, string) {
	t.Helper()
	dir := newPKI(t)
	o.TLSMode = mode
	o.TLSConfig = serverCreds(t, dir, verifyPeer).Config()
	e := &env{cat: nbdtest.NewCatalog(), disk: nbdtest.NewMem(diskSize), ro: nbdtest.NewMem(diskSize)}
	e.cat.Add(nbd.ExportInfo{Name: "disk", Description: "test disk"}, e.disk)
	e.cat.Add(nbd.ExportInfo{Name: "ro", Description: "read-only disk", ReadOnly: true}, e.ro)
	e.startTCP(t, o)
	return e, dir
}

func TestTLSModes(t *testing.T) {
	plainOps := []struct {
		name string
		opt  uint32
		data []byte
	}{
		{"list", optList, nil},
		{"info", optInfo, infoData("disk")},
		{"go", optGo, infoData("disk")},
		{"structured", optStructured, nil},
		{"list meta", optListMeta, metaData("disk")},
		{"unknown", 99, nil},
	}
	t.Run("off", func(t *testing.T) {
		e := newEnv(t, nbd.Options{})
		c := e.dial(t)
		c.hello(3)
		c.sendOpt(optStartTLS, nil)
		if r := c.readOptReply(); r.typ != repErrUnsup {
			t.Errorf("STARTTLS with TLS off: %#x, want ERR_UNSUP", r.typ)
		}
		c.goExport("disk")
	})
	t.Run("require", func(t *testing.T) {
		var ref refusals
		e, dir := tlsEnv(t, nbd.TLSRequire, false, nbd.Options{OnRefused: ref.hook})
		c := e.dial(t)
		c.hello(3)
		for _, op := range plainOps {
			c.sendOpt(op.opt, op.data)
			if r := c.readOptReply(); r.typ != repErrTLSReqd || r.opt != op.opt {
				t.Errorf("%s before TLS: reply %#x to %d, want ERR_TLS_REQD", op.name, r.typ, r.opt)
			}
		}
		if n := e.cat.Open(); n != 0 {
			t.Errorf("%d exports opened before TLS", n)
		}
		c.startTLS(clientConf(t, dir))
		c.sendOpt(optList, nil)
		if rs := c.readOptReplies(); len(rs) != 3 || rs[0].typ != repServer {
			t.Errorf("LIST over TLS: %d replies, first %#x", len(rs), rs[0].typ)
		}
		c.goExport("disk")
		c.do(0, cmdWrite, 4096, 5, []byte("hello"))
		if got, errno := c.readData(4096, 5); errno != 0 || string(got) != "hello" {
			t.Errorf("read over TLS: %q errno %d", got, errno)
		}
		// Over TLS the reader leaves requests to the workers (see
		// startTransmission).
		if n := e.disk.ServedNoWait(); n != 0 {
			t.Errorf("%d requests over TLS served by the reader", n)
		}
		if got := ref.list(); !slices.Equal(got, []string{nbd.RefusedTLSRequired}) {
			t.Errorf("refusals %v, want one %s", got, nbd.RefusedTLSRequired)
		}
	})
	t.Run("on", func(t *testing.T) {
		e, dir := tlsEnv(t, nbd.TLSOn, false, nbd.Options{})
		plain := e.open(t, "disk", false)
		plain.do(0, cmdWrite, 0, 5, []byte("plain"))
		c := e.dial(t)
		c.hello(3)
		c.startTLS(clientConf(t, dir))
		c.goExport("disk")
		if got, errno := c.readData(0, 5); errno != 0 || string(got) != "plain" {
			t.Errorf("read over TLS: %q errno %d", got, errno)
		}
		if n := e.disk.ServedNoWait(); n != 1 {
			t.Errorf("ServedNoWait() = %d, want 1: the plain write only", n)
		}
	})
}

func TestTLSRequireExportNameCloses(t *testing.T) {
	var ref refusals
	e, _ := tlsEnv(t, nbd.TLSRequire, false, nbd.Options{OnRefused: ref.hook})
	c := e.dial(t)
	c.hello(3)
	c.sendOpt(optExportName, []byte("disk"))
	c.expectClosed()
	if n := e.cat.Open(); n != 0 {
		t.Errorf("%d exports opened", n)
	}
	if got := ref.list(); !slices.Equal(got, []string{nbd.RefusedTLSRequired}) {
		t.Errorf("refusals %v", got)
	}
}

// TestStartTLSForgetsState: options negotiated before STARTTLS do not
// survive it.
func TestStartTLSForgetsState(t *testing.T) {
	e, dir := tlsEnv(t, nbd.TLSOn, false, nbd.Options{})
	c := e.dial(t)
	c.hello(3)
	c.sendOpt(optStructured, nil)
	if r := c.readOptReply(); r.typ != repAck {
		t.Fatalf("STRUCTURED_REPLY %#x", r.typ)
	}
	c.sendOpt(optSetMeta, metaData("disk", "base:allocation"))
	c.readOptReplies()
	c.startTLS(clientConf(t, dir))
	// Metadata queries need structured replies again.
	c.sendOpt(optListMeta, metaData("disk"))
	if r := c.readOptReply(); r.typ != repErrInvalid {
		t.Errorf("LIST_META_CONTEXT after TLS without STRUCTURED_REPLY: %#x, want ERR_INVALID", r.typ)
	}
	c.goExport("disk")
	if c.tflags&tflagDF != 0 {
		t.Errorf("flags %#x advertise DF: structured replies survived STARTTLS", c.tflags)
	}
	// Simple replies, and no base:allocation.
	if got, errno := c.readData(0, 16); errno != 0 || len(got) != 16 {
		t.Errorf("simple read: %d bytes, errno %d", len(got), errno)
	}
	if r := c.do(0, cmdBlockStatus, 0, 4096, nil); !r.simple || r.errno != einval {
		t.Errorf("block status after STARTTLS: simple %v errno %d, want simple EINVAL", r.simple, r.errno)
	}
}

func TestStartTLSErrors(t *testing.T) {
	t.Run("data", func(t *testing.T) {
		e, dir := tlsEnv(t, nbd.TLSOn, false, nbd.Options{})
		c := e.dial(t)
		c.hello(3)
		c.sendOpt(optStartTLS, []byte{1})
		if r := c.readOptReply(); r.typ != repErrInvalid {
			t.Errorf("STARTTLS with data: %#x, want ERR_INVALID", r.typ)
		}
		c.startTLS(clientConf(t, dir))
		c.sendOpt(optStartTLS, nil)
		if r := c.readOptReply(); r.typ != repErrInvalid {
			t.Errorf("second STARTTLS: %#x, want ERR_INVALID", r.typ)
		}
		c.goExport("disk")
	})
	t.Run("injection", func(t *testing.T) {
		// Plaintext sent with STARTTLS, before its reply, must not be
		// taken as coming from the TLS session.
		var ref refusals
		e, _ := tlsEnv(t, nbd.TLSOn, false, nbd.Options{OnRefused: ref.hook})
		c := e.dial(t)
		c.hello(3)
		b := binary.BigEndian.AppendUint64(nil, magicOpt)
		b = binary.BigEndian.AppendUint32(b, optStartTLS)
		b = binary.BigEndian.AppendUint32(b, 0)
		b = binary.BigEndian.AppendUint64(b, magicOpt)
		b = binary.BigEndian.AppendUint32(b, optExportName)
		b = binary.BigEndian.AppendUint32(b, 4)
		c.write(append(b, "disk"...))
		c.expectClosed()
		if got := ref.wait(1); !slices.Equal(got, []string{nbd.RefusedTLSHandshake}) {
			t.Errorf("refusals %v", got)
		}
		if n := e.cat.Open(); n != 0 {
			t.Errorf("%d exports opened", n)
		}
	})
	t.Run("not TLS", func(t *testing.T) {
		var ref refusals
		e, _ := tlsEnv(t, nbd.TLSOn, false, nbd.Options{OnRefused: ref.hook})
		c := e.dial(t)
		c.hello(3)
		c.sendOpt(optStartTLS, nil)
		if r := c.readOptReply(); r.typ != repAck {
			t.Fatalf("STARTTLS: %#x", r.typ)
		}
		c.write(make([]byte, 300))
		c.expectClosed()
		if got := ref.wait(1); !slices.Equal(got, []string{nbd.RefusedTLSHandshake}) {
			t.Errorf("refusals %v", got)
		}
	})
}

func TestTLSClientCertificates(t *testing.T) {
	var ref refusals
	dir := newPKI(t)
	acl := &aclCatalog{Catalog: nbdtest.NewCatalog(), rw: []string{"alice"}, ro: []string{"bob"}}
	disk := nbdtest.NewMem(diskSize)
	acl.Add(nbd.ExportInfo{Name: "disk", Description: "test disk"}, disk)
	e := &env{cat: acl.Catalog}
	creds := serverCreds(t, dir, true)
	e.serveCat = acl
	e.startTCP(t, nbd.Options{TLSMode: nbd.TLSRequire, TLSConfig: creds.Config(), OnRefused: ref.hook})

	alice, bob, carol := clientPKI(t, dir, "alice"), clientPKI(t, dir, "bob"), clientPKI(t, dir, "carol")
	other := newPKI(t)

	for _, tt := range []struct {
		name string
		dir  string
	}{
		{"no certificate", mixPKI(t, dir, "")},
		{"certificate from another CA", mixPKI(t, dir, other)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := e.dial(t)
			c.hello(3)
			if typ, err := c.tryTLS(clientConf(t, tt.dir)); typ != repAck || err == nil {
				t.Errorf("STARTTLS reply %#x, handshake error %v; want ACK then a failure", typ, err)
			}
			c.expectClosed()
		})
	}
	if got := ref.wait(2); len(got) != 2 || got[0] != nbd.RefusedTLSHandshake || got[1] != nbd.RefusedTLSHandshake {
		t.Errorf("refusals %v, want two %s", got, nbd.RefusedTLSHandshake)
	}

	t.Run("allowed", func(t *testing.T) {
		c := e.dial(t)
		c.hello(3)
		c.startTLS(clientConf(t, alice))
		c.goExport("disk")
		p := acl.lastPeer()
		if !p.TLS || p.Certificate == nil || p.Certificate.Subject.CommonName != "alice" || p.Addr == nil {
			t.Errorf("peer %+v", p)
		}
		if c.tflags&tflagReadOnly != 0 {
			t.Errorf("alice got a read-only export")
		}
		if r := c.do(0, cmdWrite, 0, 5, []byte("alice")); r.errno != 0 {
			t.Errorf("alice's write: errno %d", r.errno)
		}
	})
	t.Run("read-only grant", func(t *testing.T) {
		c := e.dial(t)
		c.hello(3)
		c.startTLS(clientConf(t, bob))
		c.goExport("disk")
		if c.tflags&tflagReadOnly == 0 || c.tflags&(tflagTrim|tflagZeroes) != 0 {
			t.Errorf("bob's flags %#x, want READ_ONLY without TRIM/WRITE_ZEROES", c.tflags)
		}
		for _, op := range []struct {
			cmd     uint16
			payload []byte
		}{{cmdWrite, []byte("bob")}, {cmdTrim, nil}, {cmdWriteZeroes, nil}} {
			if r := c.do(0, op.cmd, 0, 3, op.payload); r.errno != eperm {
				t.Errorf("bob's %d: errno %d, want EPERM", op.cmd, r.errno)
			}
		}
		if got, errno := c.readData(0, 5); errno != 0 || string(got) != "alice" {
			t.Errorf("bob reads %q errno %d", got, errno)
		}
	})
	t.Run("denied looks missing", func(t *testing.T) {
		c := e.dial(t)
		c.hello(3)
		c.startTLS(clientConf(t, carol))
		c.sendOpt(optList, nil)
		if rs := c.readOptReplies(); len(rs) != 1 || rs[0].typ != repAck {
			t.Errorf("carol's LIST: %+v, want only ACK", rs)
		}
		var got [2][]optReply
		for i, name := range []string{"disk", "missing"} {
			for _, opt := range []uint32{optInfo, optGo} {
				c.sendOpt(opt, infoData(name, 1, 2, 3))
				got[i] = append(got[i], c.readOptReplies()...)
			}
		}
		if len(got[0]) != 2 || got[0][0].typ != repErrUnknown {
			t.Errorf("carol's INFO/GO disk: %+v, want ERR_UNKNOWN", got[0])
		}
		if fmt.Sprint(got[0]) != fmt.Sprint(got[1]) {
			t.Errorf("denied export %+v differs from a missing one %+v", got[0], got[1])
		}
	})
	if n := ref.list(); slices.Index(n, nbd.RefusedUnknownExport) < 0 {
		t.Errorf("refusals %v lack %s", n, nbd.RefusedUnknownExport)
	}
}

func TestTLSReload(t *testing.T) {
	dir := newPKI(t)
	creds := serverCreds(t, dir, true)
	e := &env{cat: nbdtest.NewCatalog(), disk: nbdtest.NewMem(diskSize)}
	e.cat.Add(nbd.ExportInfo{Name: "disk"}, e.disk)
	e.startTCP(t, nbd.Options{TLSMode: nbd.TLSRequire, TLSConfig: creds.Config()})
	old := clientConf(t, dir)

	c1 := e.dial(t)
	c1.hello(3)
	c1.startTLS(old)
	c1.goExport("disk")
	c1.do(0, cmdWrite, 0, 3, []byte("one"))

	next := newPKI(t)
	for _, f := range []string{tlsfiles.CACertFile, tlsfiles.ServerCertFile, tlsfiles.ServerKeyFile} {
		copyFile(t, filepath.Join(next, f), filepath.Join(dir, f))
	}
	if err := creds.Reload(); err != nil {
		t.Fatal(err)
	}

	c2 := e.dial(t)
	c2.hello(3)
	c2.startTLS(clientConf(t, next))
	c2.goExport("disk")
	if got, errno := c2.readData(0, 3); errno != 0 || string(got) != "one" {
		t.Errorf("new connection reads %q errno %d", got, errno)
	}
	if st := c2.nc.(*tls.Conn).ConnectionState(); st.PeerCertificates[0].SerialNumber.Cmp(creds.Leaf().SerialNumber) != 0 {
		t.Errorf("new connection did not get the new certificate")
	}

	c3 := e.dial(t)
	c3.hello(3)
	if _, err := c3.tryTLS(old); err == nil {
		t.Errorf("client of the replaced CA accepted")
	}

	// The connection made before the reload carries on.
	c1.do(0, cmdWrite, 3, 3, []byte("two"))
	if got, errno := c1.readData(0, 6); errno != 0 || string(got) != "onetwo" {
		t.Errorf("old connection reads %q errno %d", got, errno)
	}
}

func TestTLSModeText(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want nbd.TLSMode
		ok   bool
	}{
		{"off", nbd.TLSOff, true},
		{"on", nbd.TLSOn, true},
		{"require", nbd.TLSRequire, true},
		{"required", 0, false},
		{"", 0, false},
	} {
		var m nbd.TLSMode
		err := m.UnmarshalText([]byte(tt.in))
		if (err == nil) != tt.ok || m != tt.want {
			t.Errorf("UnmarshalText(%q) = %v, %v", tt.in, m, err)
		}
		if tt.ok {
			if b, _ := m.MarshalText(); string(b) != tt.in {
				t.Errorf("MarshalText(%v) = %q", m, b)
			}
		}
	}
	defer func() {
		if recover() == nil {
			t.Errorf("NewServer with TLSRequire and no TLSConfig did not panic")
		}
	}()
	nbd.NewServer(nbdtest.NewCatalog(), nbd.Options{TLSMode: nbd.TLSRequire})
}
