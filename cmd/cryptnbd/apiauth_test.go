package main_test

import (
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strings"
	"testing"
)

// asNobody prepares to run the CLI as another user: a copy of the binary
// that user can execute, and search permission on the data directory's
// parents (the data directory itself keeps its own mode).
func asNobody(t *testing.T, d *testDaemon) string {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("needs root to run the CLI as another user")
	}
	need(t, "util-linux", "setpriv")
	dir, err := os.MkdirTemp("/tmp", "cnbin")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	bin := filepath.Join(dir, "cryptnbd")
	src, err := os.Open(cryptnbdBin)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(bin, os.O_WRONLY|os.O_CREATE, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	dst.Close()
	for _, p := range []string{dir, filepath.Dir(d.DataDir), filepath.Dir(filepath.Dir(d.DataDir))} {
		if err := os.Chmod(p, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	return bin
}

// TestAPIRefusesOtherUsers: another uid can neither reach the management
// socket (mode 0600) nor, if it could, be served (SO_PEERCRED check); a
// member of --admin-group is served.
func TestAPIRefusesOtherUsers(t *testing.T) {
	d := startDaemon(t, daemonOpts{Demo: "demo"})
	bin := asNobody(t, d)
	nobody := []string{"--reuid=65534", "--regid=65534", "--clear-groups", bin, "disk", "list", "--data-dir", d.DataDir}

	r := runCmd(t, "setpriv", nobody...)
	if r.Code == 0 || !strings.Contains(r.Stderr, "permission denied") {
		t.Errorf("nobody through a 0600 socket: want permission denied, got %v", r)
	}
	// Open the socket to everyone: the per-request peer check still refuses.
	sock := filepath.Join(d.DataDir, "api.sock")
	if err := os.Chmod(d.DataDir, 0o711); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(sock, 0o666); err != nil {
		t.Fatal(err)
	}
	r = runCmd(t, "setpriv", nobody...)
	if r.Code == 0 || !strings.Contains(r.Stderr, "may not manage this daemon") {
		t.Errorf("nobody through an open socket: want a 403 refusal, got %v", r)
	}
	if strings.Contains(r.Stdout, "demo") {
		t.Errorf("a refused request listed disks: %s", r.Stdout)
	}
	if evs := auditEvents(t, d); !hasEvent(evs, "api-refused", "") {
		t.Errorf("no api-refused audit event: %+v", evs)
	}
}

func TestAPIAdminGroup(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to create a group")
	}
	need(t, "passwd", "groupadd")
	const group = "cryptnbd-test-admins"
	if _, err := user.LookupGroup(group); err != nil {
		if out, err := exec.Command("groupadd", "-f", group).CombinedOutput(); err != nil {
			t.Fatalf("groupadd: %v\n%s", err, out)
		}
	}
	g, err := user.LookupGroup(group)
	if err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, daemonOpts{Demo: "demo", Extra: []string{"--admin-group", group}})
	bin := asNobody(t, d)
	r := runCmd(t, "setpriv", "--reuid=65534", "--regid=65534", "--groups="+g.Gid, bin, "disk", "list", "--data-dir", d.DataDir)
	if r.Code != 0 || !strings.Contains(r.Stdout, "demo") {
		t.Errorf("a member of --admin-group: want the disk list, got %v", r)
	}
	r = runCmd(t, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", bin, "disk", "list", "--data-dir", d.DataDir)
	if r.Code == 0 {
		t.Errorf("a non-member was served: %v", r)
	}
}
