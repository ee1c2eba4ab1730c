package nbd_test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/cryptnbd/cryptnbd/nbd"
	"github.com/cryptnbd/cryptnbd/nbd/nbdtest"
	"github.com/cryptnbd/cryptnbd/nbd/tlsfiles"
)

// The TLS tests with real clients (libnbd and qemu, both on GnuTLS) use
// certificates made by nbd/tlsfiles, the code behind `cryptnbd tls init`.

func (e *env) tlsURI(name, certDir string) string {
	return "nbds://" + e.tcp + "/" + name + "?tls-certificates=" + certDir
}

func (e *env) plainURI(name string) string {
	return "nbd://" + e.tcp + "/" + name
}

// runFail runs a command that must fail and returns its output.
func runFail(t *testing.T, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:/bin:"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Errorf("%s %s succeeded, want a failure:\n%s", name, strings.Join(args, " "), out)
	}
	return string(out)
}

type nbdinfoJSON struct {
	Protocol string           `json:"protocol"`
	TLS      bool             `json:"TLS"`
	Exports  []map[string]any `json:"exports"`
}

func nbdinfo(t *testing.T, uri string) nbdinfoJSON {
	t.Helper()
	out := run(t, "nbdinfo", "--json", uri)
	var info nbdinfoJSON
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("parse nbdinfo output: %v\n%s", err, out)
	}
	if len(info.Exports) != 1 {
		t.Fatalf("nbdinfo: %s", out)
	}
	return info
}

func TestTLSNbdinfo(t *testing.T) {
	requireTool(t, "nbdinfo", "libnbd-bin")
	t.Run("require", func(t *testing.T) {
		e, dir := tlsEnv(t, nbd.TLSRequire, true, nbd.Options{})
		info := nbdinfo(t, e.tlsURI("disk", dir))
		if !info.TLS {
			t.Errorf("nbdinfo reports TLS false")
		}
		if got := info.Exports[0]["export-size"]; got != float64(diskSize) {
			t.Errorf("export-size %v", got)
		}
		list := run(t, "nbdinfo", "--list", "nbds://"+e.tcp+"?tls-certificates="+dir)
		if !strings.Contains(list, `export="disk"`) || !strings.Contains(list, `export="ro"`) {
			t.Errorf("nbdinfo --list over TLS:\n%s", list)
		}
		// Plain clients get nothing: no export and no list.
		out := runFail(t, "nbdinfo", "--json", e.plainURI("disk"))
		if strings.Contains(out, "export-size") {
			t.Errorf("plain client saw the export:\n%s", out)
		}
		out = runFail(t, "nbdinfo", "--list", "nbd://"+e.tcp)
		if strings.Contains(out, "disk") {
			t.Errorf("plain client saw the export list:\n%s", out)
		}
	})
	t.Run("on", func(t *testing.T) {
		e, dir := tlsEnv(t, nbd.TLSOn, false, nbd.Options{})
		if info := nbdinfo(t, e.plainURI("disk")); info.TLS {
			t.Errorf("plain connection reports TLS")
		}
		if info := nbdinfo(t, e.tlsURI("disk", dir)); !info.TLS {
			t.Errorf("TLS connection reports no TLS")
		}
	})
}

// TestTLSClientCertificatesNbdinfo checks certificate-based access with
// libnbd: no certificate or one from another CA is refused, a client the
// catalog does not allow sees the same error as for a missing export,
// and a read-only grant shows as read-only and refuses writes.
func TestTLSClientCertificatesNbdinfo(t *testing.T) {
	requireTool(t, "nbdinfo", "libnbd-bin")
	requireTool(t, "nbdsh", "python3-libnbd")
	dir := newPKI(t)
	acl := &aclCatalog{Catalog: nbdtest.NewCatalog(), rw: []string{"alice"}, ro: []string{"bob"}}
	acl.Add(nbd.ExportInfo{Name: "disk"}, nbdtest.NewMem(diskSize))
	e := &env{cat: acl.Catalog}
	e.serveCat = acl
	e.startTCP(t, nbd.Options{TLSMode: nbd.TLSRequire, TLSConfig: serverCreds(t, dir, true).Config()})

	alice, bob, carol := clientPKI(t, dir, "alice"), clientPKI(t, dir, "bob"), clientPKI(t, dir, "carol")
	for name, d := range map[string]string{
		"no certificate": mixPKI(t, dir, ""),
		"another CA":     mixPKI(t, dir, newPKI(t)),
	} {
		t.Run(name, func(t *testing.T) {
			if out := runFail(t, "nbdinfo", "--json", e.tlsURI("disk", d)); strings.Contains(out, "export-size") {
				t.Errorf("refused client saw the export:\n%s", out)
			}
		})
	}

	if info := nbdinfo(t, e.tlsURI("disk", alice)); info.Exports[0]["is_read_only"] != false {
		t.Errorf("alice: is_read_only = %v", info.Exports[0]["is_read_only"])
	}
	if info := nbdinfo(t, e.tlsURI("disk", bob)); info.Exports[0]["is_read_only"] != true {
		t.Errorf("bob: is_read_only = %v", info.Exports[0]["is_read_only"])
	}
	script := `
import nbd, errno
h = nbd.NBD()
h.set_strict_mode(0)  # let the server, not libnbd, refuse the write
h.set_tls_certificates("DIR")
h.connect_uri("URI")
assert h.get_tls_negotiated()
assert h.is_read_only()
try:
    h.pwrite(b"x" * 512, 0)
    assert False, "write succeeded"
except nbd.Error as ex:
    assert ex.errnum == errno.EPERM, ex
print("OK")
`
	script = strings.NewReplacer("DIR", bob, "URI", "nbds://"+e.tcp+"/disk").Replace(script)
	if out := run(t, "nbdsh", "-c", script); !strings.Contains(out, "OK") {
		t.Errorf("nbdsh as bob:\n%s", out)
	}

	denied := runFail(t, "nbdinfo", "--json", e.tlsURI("disk", carol))
	missing := runFail(t, "nbdinfo", "--json", e.tlsURI("nosuch", alice))
	if got, want := strings.ReplaceAll(denied, "disk", "X"), strings.ReplaceAll(missing, "nosuch", "X"); got != want {
		t.Errorf("a denied export looks different from a missing one:\ndenied:  %s\nmissing: %s", denied, missing)
	}
	if list := run(t, "nbdinfo", "--list", "nbds://"+e.tcp+"?tls-certificates="+carol); strings.Contains(list, "disk") {
		t.Errorf("carol's list shows the export:\n%s", list)
	}
}

func TestTLSQemuIO(t *testing.T) {
	requireTool(t, "qemu-io", "qemu-utils")
	e, dir := tlsEnv(t, nbd.TLSRequire, true, nbd.Options{})
	host, port, _ := strings.Cut(e.tcp, ":")
	out := run(t, "qemu-io",
		"--object", "tls-creds-x509,id=tls0,dir="+dir+",endpoint=client",
		"--image-opts", "driver=nbd,server.type=inet,server.host="+host+",server.port="+port+",export=disk,tls-creds=tls0",
		"-c", "write -P 0xa5 0 256k",
		"-c", "write -P 0x5a 300000 5000",
		"-c", "flush",
		"-c", "read -P 0xa5 0 256k",
		"-c", "read -P 0x5a 300000 5000",
	)
	if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	buf := make([]byte, 4)
	if err := e.disk.ReadAt(t.Context(), buf, 300000); err != nil || string(buf) != "\x5a\x5a\x5a\x5a" {
		t.Errorf("backend holds %x, %v", buf, err)
	}
}

// TestTLSFio runs a verify job through fio's nbd engine over TLS with a
// client certificate. fio cannot pass tls-certificates in the URI (libnbd
// refuses local file access from URIs unless the program allows it), so
// the certificates go where libnbd looks by default:
// $HOME/.pki/libnbd, or /etc/pki/libnbd for root, in which case fio runs
// as nobody.
func TestTLSFio(t *testing.T) {
	requireTool(t, "fio", "fio")
	e, dir := tlsEnv(t, nbd.TLSRequire, true, nbd.Options{})
	home, err := os.MkdirTemp("", "nbdfio")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(home) })
	pki := filepath.Join(home, ".pki", "libnbd")
	if err := os.MkdirAll(pki, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{tlsfiles.CACertFile, tlsfiles.ClientCertFile, tlsfiles.ClientKeyFile} {
		copyFile(t, filepath.Join(dir, f), filepath.Join(pki, f))
	}
	outFile := filepath.Join(home, "fio.out")
	cmd := exec.Command("fio", "--name=tls", "--ioengine=nbd", "--uri=nbds://"+e.tcp+"/disk",
		"--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=1m",
		"--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--output="+outFile)
	cmd.Env = append(os.Environ(), "HOME="+home)
	cmd.Dir = home
	if os.Geteuid() == 0 {
		const nobody = 65534
		err := filepath.Walk(home, func(p string, _ os.FileInfo, err error) error {
			if err != nil {
				return err
			}
			return os.Chown(p, nobody, nobody)
		})
		if err != nil {
			t.Fatal(err)
		}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("fio: %v\n%s", err, out)
	}
	out, err := os.ReadFile(outFile)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "err= 0") {
		t.Errorf("fio:\n%s", out)
	}
	if e.disk.Writes() == 0 {
		t.Errorf("fio wrote nothing to the backend")
	}
}
