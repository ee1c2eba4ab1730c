package nbd_test

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cryptnbd/cryptnbd/nbd"
)

// requireTool skips the test when a client program is not installed.
func requireTool(t *testing.T, tool, pkg string) {
	t.Helper()
	if _, err := exec.LookPath(tool); err != nil {
		t.Skipf("%s not installed (Debian package %s)", tool, pkg)
	}
}

func (e *env) uri(name string) string {
	return "nbd+unix:///" + name + "?socket=" + e.sock
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	// nbdsh needs the system python3 that has the libnbd module.
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:/bin:"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestNbdinfoJSON(t *testing.T) {
	requireTool(t, "nbdinfo", "libnbd-bin")
	e := newEnv(t, nbd.Options{})
	out := run(t, "nbdinfo", "--json", e.uri("disk"))
	var info struct {
		Protocol string                   `json:"protocol"`
		Exports  []map[string]interface{} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("parse nbdinfo output: %v\n%s", err, out)
	}
	if info.Protocol != "newstyle-fixed" || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo: %s", out)
	}
	x := info.Exports[0]
	for _, k := range []string{"can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_multi_conn", "can_df"} {
		if x[k] != true {
			t.Errorf("%s = %v, want true", k, x[k])
		}
	}
	if x["is_read_only"] != false {
		t.Errorf("is_read_only = %v", x["is_read_only"])
	}
	for k, want := range map[string]float64{"export-size": diskSize, "block_size_minimum": 512, "block_size_preferred": 4096, "block_size_maximum": 1 << 20} {
		if x[k] != want {
			t.Errorf("%s = %v, want %v", k, x[k], want)
		}
	}
	if x["description"] != "test disk" {
		t.Errorf("description = %v", x["description"])
	}
	if ctx, _ := x["contexts"].([]interface{}); len(ctx) != 1 || ctx[0] != "base:allocation" {
		t.Errorf("contexts = %v", x["contexts"])
	}
	// Structured replies, checked on its own.
	if err := exec.Command("nbdinfo", "--can", "structured-reply", e.uri("disk")).Run(); err != nil {
		t.Errorf("nbdinfo --can structured-reply: %v", err)
	}
	ro := run(t, "nbdinfo", "--json", e.uri("ro"))
	if !strings.Contains(ro, `"is_read_only": true`) {
		t.Errorf("read-only export not shown read-only:\n%s", ro)
	}
}

func TestNbdinfoList(t *testing.T) {
	requireTool(t, "nbdinfo", "libnbd-bin")
	e := newEnv(t, nbd.Options{})
	out := run(t, "nbdinfo", "--list", "nbd+unix://?socket="+e.sock)
	for _, want := range []string{"export=\"disk\"", "description: test disk", "export=\"ro\"", "description: read-only disk"} {
		if !strings.Contains(out, want) {
			t.Errorf("nbdinfo --list lacks %q:\n%s", want, out)
		}
	}
}

func TestQemuIO(t *testing.T) {
	requireTool(t, "qemu-io", "qemu-utils")
	e := newEnv(t, nbd.Options{})
	out := run(t, "qemu-io", "-f", "raw", e.uri("disk"),
		"-c", "write -P 0xab 0 256k",
		"-c", "write -P 0xcd 300000 5000", // unaligned
		"-c", "flush",
		"-c", "read -P 0xab 0 256k",
		"-c", "read -P 0xcd 300000 5000",
		"-c", "discard 0 64k",
		"-c", "read -P 0 0 64k",
		"-c", "write -z 64k 64k",
		"-c", "read -P 0 64k 64k",
		"-c", "read -P 0xab 128k 128k",
		"-c", "write -z -u 512k 64k",
	)
	if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	if e.disk.Flushes() == 0 {
		t.Errorf("qemu-io flush did not reach the backend")
	}
	// Writethrough qemu-io puts FUA on writes; the backend saw flushes
	// for those too, and the data is there.
	if !e.disk.Allocated(128 << 10) {
		t.Errorf("written chunk not allocated")
	}
}

func TestQemuImgMap(t *testing.T) {
	requireTool(t, "qemu-img", "qemu-utils")
	e := newEnv(t, nbd.Options{})
	run(t, "qemu-io", "-f", "raw", e.uri("disk"), "-c", "write -P 1 64k 64k")
	out := run(t, "qemu-img", "map", "--output=json", "-f", "raw", e.uri("disk"))
	var m []struct {
		Start, Length int64
		Data, Zero    bool
	}
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("parse: %v\n%s", err, out)
	}
	var dataBytes int64
	for _, x := range m {
		if x.Data {
			dataBytes += x.Length
			if x.Start != 64<<10 {
				t.Errorf("data at %d", x.Start)
			}
		}
	}
	if dataBytes != 64<<10 {
		t.Errorf("qemu-img map found %d data bytes, want 65536:\n%s", dataBytes, out)
	}
}

func TestNbdcopyRoundTrip(t *testing.T) {
	requireTool(t, "nbdcopy", "libnbd-bin")
	e := newEnv(t, nbd.Options{})
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	data := make([]byte, diskSize)
	rand.Read(data[:diskSize/2]) // second half zeros
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, "nbdcopy", "--flush", src, e.uri("disk"))
	run(t, "nbdcopy", e.uri("disk"), dst)
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Errorf("nbdcopy round trip differs")
	}
	if e.disk.Flushes() == 0 {
		t.Errorf("nbdcopy --flush sent no flush")
	}
	// Multi-conn copy between two exports of the same server.
	e.cat.Add(nbd.ExportInfo{Name: "copy"}, e.ro)
	run(t, "nbdcopy", "--connections=4", e.uri("disk"), e.uri("copy"))
	// "copy" is writable, backed by the read-only export's Mem.
	buf := make([]byte, diskSize)
	if err := e.ro.ReadAt(t.Context(), buf, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, data) {
		t.Errorf("nbd to nbd copy differs")
	}
}

func TestNbdsh(t *testing.T) {
	requireTool(t, "nbdsh", "python3-libnbd")
	e := newEnv(t, nbd.Options{})
	script := `
import nbd
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri("URI")
assert h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero()
assert h.can_fast_zero() and h.can_cache() and h.can_multi_conn() and h.can_df()
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
h.pwrite(b"x" * 8192, 8192, nbd.CMD_FLAG_FUA)
h.zero(4096, 12288, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 12288) == b"\0" * 4096
assert h.pread(4096, 8192) == b"x" * 4096
h.trim(65536, 65536)
h.flush()
h.cache(4096, 0)
seen = []
def f(metacontext, offset, entries, err):
    seen.extend(entries)
h.block_status(diskSize, 0, f)
assert seen == [8192, 3, 8192, 0, diskSize - 16384, 3], seen
h.set_strict_mode(0)  # the server, not libnbd, must refuse what follows
try:
    h.pread(10, diskSize)
    assert False
except nbd.Error as ex:
    assert ex.errnum == 22, ex
try:
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
except nbd.Error as ex:
    assert False, ex
print("OK")
`
	script = strings.ReplaceAll(script, "diskSize", "1048576")
	script = strings.ReplaceAll(script, "URI", e.uri("disk"))
	out := run(t, "nbdsh", "-c", script)
	if !strings.Contains(out, "OK") {
		t.Errorf("nbdsh:\n%s", out)
	}
}
