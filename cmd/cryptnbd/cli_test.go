package main_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// cli runs the binary with exactly the given arguments and environment.
func cli(t *testing.T, env []string, args ...string) result {
	t.Helper()
	return runEnv(t, env, cryptnbdBin, args...)
}

// diskListJSON returns `disk list -o json` for dataDir, failing the test
// if it fails.
func diskListJSON(t *testing.T, dataDir string) []map[string]any {
	t.Helper()
	r := cli(t, nil, "disk", "list", "-o", "json", "--data-dir", dataDir)
	if r.Code != 0 {
		t.Fatalf("disk list: %v", r)
	}
	var disks []map[string]any
	if err := json.Unmarshal([]byte(r.Stdout), &disks); err != nil {
		t.Fatalf("disk list -o json: %v\n%s", err, r.Stdout)
	}
	return disks
}

// dirState names every file under dir with its size and mode, and the
// disk images with their modification times too, to show that a failed
// command changed nothing on disk. (Other files' times are left out: a
// running daemon may refresh its own state files at any time.)
func dirState(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, de os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := de.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if rel == "audit.log" || fi.Mode()&os.ModeSocket != 0 {
			return nil // appended to by reads, and the daemon's sockets
		}
		line := fmt.Sprintf("%s %v", rel, fi.Mode())
		if strings.HasPrefix(rel, "disks"+string(filepath.Separator)) {
			line += fmt.Sprintf(" %d %d", fi.Size(), fi.ModTime().UnixNano())
		}
		out = append(out, line)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestCLIErrors: each bad command line prints a clear message on stderr,
// exits non-zero (2 for usage errors), and changes nothing, both with the
// daemon stopped (the CLI opens the data directory itself) and running
// (the CLI goes through the API socket).
func TestCLIErrors(t *testing.T) {
	t.Parallel()
	dir := shortTempDir(t)
	dataDir := filepath.Join(dir, "data")
	if r := cli(t, nil, "disk", "create", "aa", "--size", "64M", "--data-dir", dataDir); r.Code != 0 {
		t.Fatalf("disk create: %v", r)
	}
	secret := filepath.Join(dir, "secret")

	cases := []struct {
		name string
		args []string // --data-dir is appended
		code int
		msg  string // in stderr
	}{
		{"unknown command", []string{"bogus"}, 2, `unknown command "bogus"`},
		{"unknown disk subcommand", []string{"disk", "frobnicate"}, 2, "frobnicate"},
		{"unknown flag", []string{"disk", "list", "--frob"}, 2, "frob"},
		{"bad output format", []string{"disk", "list", "-o", "yaml"}, 2, "yaml"},
		{"list with an argument", []string{"disk", "list", "extra"}, 2, "no arguments"},
		{"bad disk name", []string{"disk", "create", "Bad_Name", "--size", "64M"}, 2, "invalid disk name"},
		{"disk name too long", []string{"disk", "create", strings.Repeat("a", 64), "--size", "64M"}, 2, "invalid disk name"},
		{"two disk names", []string{"disk", "create", "bb", "cc", "--size", "64M"}, 2, "exactly one disk name"},
		{"missing --size", []string{"disk", "create", "bb"}, 2, "--size"},
		{"garbage --size", []string{"disk", "create", "bb", "--size", "garbage"}, 2, "garbage"},
		{"negative --size", []string{"disk", "create", "bb", "--size", "-5M"}, 2, "size"},
		{"zero --size", []string{"disk", "create", "bb", "--size", "0"}, 2, "size"},
		{"--sector-size 1000", []string{"disk", "create", "bb", "--size", "64M", "--sector-size", "1000"}, 2, "1000"},
		{"size not a multiple of the sector", []string{"disk", "create", "bb", "--size", "1000"}, 2, "multiple"},
		{"bad encryption type", []string{"disk", "create", "bb", "--size", "64M", "--encryption-type", "rot13"}, 2, "rot13"},
		{"show without a name", []string{"disk", "show"}, 2, "disk name"},
		{"recovery-secret without --out", []string{"disk", "recovery-secret", "aa"}, 2, "--out"},
		{"resize with bad --size", []string{"disk", "resize", "aa", "--size", "lots"}, 2, "lots"},
		{"serve with an argument", []string{"serve", "extra"}, 2, "no arguments"},
		{"serve with a tiny send buffer", []string{"serve", "--loopback-send-buffer", "4K"}, 2, "--loopback-send-buffer"},
		{"serve with a bad --mmap", []string{"serve", "--mmap=sometimes"}, 2, "mmap"},
		{"serve with a tiny --max-inflight-total", []string{"serve", "--max-inflight-total", "64K"}, 2, "--max-inflight-total"},
		{"serve with a garbage --max-inflight-total", []string{"serve", "--max-inflight-total", "lots"}, 2, "lots"},
		{"create of an existing name", []string{"disk", "create", "aa", "--size", "64M"}, 1, "exists"},
		{"show of a missing disk", []string{"disk", "show", "nope"}, 1, "not found"},
		{"delete of a missing disk", []string{"disk", "delete", "nope"}, 1, "not found"},
		{"resize of a missing disk", []string{"disk", "resize", "nope", "--size", "1G"}, 1, "not found"},
		{"resize smaller", []string{"disk", "resize", "aa", "--size", "32M"}, 1, "grow"},
		{"recovery-secret of a missing disk", []string{"disk", "recovery-secret", "nope", "--out", secret}, 1, "not found"},
	}
	run := func(t *testing.T) {
		wantList := diskListJSON(t, dataDir)
		if len(wantList) != 1 || wantList[0]["name"] != "aa" {
			t.Fatalf("disk list before: %v, want just aa", wantList)
		}
		wantFiles := dirState(t, dataDir)
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				r := cli(t, nil, append(slices.Clone(tc.args), "--data-dir", dataDir)...)
				if r.Code != tc.code {
					t.Errorf("exit %d, want %d: %v", r.Code, tc.code, r)
				}
				if !strings.HasPrefix(r.Stderr, "cryptnbd: ") || !strings.Contains(r.Stderr, tc.msg) {
					t.Errorf("stderr %q, want \"cryptnbd: ...%s...\"", r.Stderr, tc.msg)
				}
				if strings.HasPrefix(r.Stdout, "Usage:") {
					// flag.Parse calls fs.Usage on a bad flag, and newFlags' Usage
					// writes to stdout (right for --help only).
					t.Errorf("BUG: a usage error prints the usage on stdout, where scripts read -o json output; it belongs on stderr (or nowhere): %q", clip(r.Stdout))
				} else if r.Stdout != "" {
					t.Errorf("stdout %q, want nothing", r.Stdout)
				}
				if _, err := os.Stat(secret); err == nil {
					t.Errorf("a failed recovery-secret left %s behind", secret)
					os.Remove(secret)
				}
				if got := diskListJSON(t, dataDir); !jsonEqual(got, wantList) {
					t.Errorf("disk list changed:\n got %v\nwant %v", got, wantList)
				}
				if got := dirState(t, dataDir); !slices.Equal(got, wantFiles) {
					t.Errorf("data directory changed:\n got %q\nwant %q", got, wantFiles)
				}
			})
		}
	}
	t.Run("offline", run)

	d := &testDaemon{t: t, DataDir: dataDir, Sock: filepath.Join(dir, "nbd.sock"), logs: &syncBuffer{}}
	t.Cleanup(func() {
		if err := d.stop(syscall.SIGKILL); err != nil && t.Failed() {
			t.Logf("daemon: %v\n%s", err, d.logs.String())
		}
	})
	d.Start()
	t.Run("online", run)
	d.Stop()
}

func jsonEqual(a, b any) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return string(x) == string(y)
}

// TestCLIHelp: asking for help is not an error.
func TestCLIHelp(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{
		{"--help"}, {"help"}, {"-h"},
		{"disk", "create", "--help"}, {"disk", "list", "--help"}, {"serve", "--help"},
	} {
		r := cli(t, nil, args...)
		if r.Code != 0 {
			t.Errorf("cryptnbd %s: %v", strings.Join(args, " "), r)
		}
		if !strings.Contains(r.Stdout, "Usage") && !strings.Contains(r.Stdout, "usage") {
			t.Errorf("cryptnbd %s: no usage on stdout: %v", strings.Join(args, " "), r)
		}
	}
	// No command at all is a usage error, with the usage on stderr.
	if r := cli(t, nil); r.Code != 2 || !strings.Contains(r.Stderr, "Usage") {
		t.Errorf("cryptnbd with no arguments: want exit 2 and usage on stderr, got %v", r)
	}
}

// TestCLIEnv: CRYPTNBD_* variables stand in for flags, and a flag on the
// command line wins over its variable.
func TestCLIEnv(t *testing.T) {
	t.Parallel()
	dir := shortTempDir(t)
	envDir, flagDir := filepath.Join(dir, "env"), filepath.Join(dir, "flag")
	env := []string{"CRYPTNBD_DATA_DIR=" + envDir, "CRYPTNBD_SECTOR_SIZE=512"}

	r := cli(t, env, "disk", "create", "env-disk", "--size", "32M", "-o", "json")
	if r.Code != 0 {
		t.Fatalf("disk create with CRYPTNBD_DATA_DIR: %v", r)
	}
	var di struct {
		Name       string `json:"name"`
		SectorSize int    `json:"sectorSize"`
		SizeBytes  int64  `json:"sizeBytes"`
	}
	if err := json.Unmarshal([]byte(r.Stdout), &di); err != nil {
		t.Fatalf("disk create -o json: %v\n%s", err, r.Stdout)
	}
	if di.Name != "env-disk" || di.SectorSize != 512 || di.SizeBytes != 32<<20 {
		t.Errorf("created %+v, want env-disk, 512-byte sectors (CRYPTNBD_SECTOR_SIZE), 32 MiB", di)
	}
	if _, err := os.Stat(filepath.Join(envDir, "disks", "env-disk.luks")); err != nil {
		t.Errorf("CRYPTNBD_DATA_DIR not honoured: %v", err)
	}
	if got := diskListJSON(t, envDir); len(got) != 1 || got[0]["name"] != "env-disk" {
		t.Errorf("disk list of %s: %v", envDir, got)
	}

	// The flag wins.
	r = cli(t, env, "disk", "list", "-o", "json", "--data-dir", flagDir)
	if r.Code != 0 || strings.TrimSpace(r.Stdout) != "[]" {
		t.Errorf("disk list --data-dir over CRYPTNBD_DATA_DIR: want [], got %v", r)
	}
	r = cli(t, env, "disk", "create", "f", "--size", "32M", "--sector-size", "4096", "-o", "json", "--data-dir", flagDir)
	if r.Code != 0 || !strings.Contains(r.Stdout, `"sectorSize": 4096`) {
		t.Errorf("--sector-size over CRYPTNBD_SECTOR_SIZE: %v", r)
	}

	// A bad value in a variable is a usage error too.
	r = cli(t, []string{"CRYPTNBD_DATA_DIR=" + envDir, "CRYPTNBD_SECTOR_SIZE=lots"}, "disk", "create", "x", "--size", "32M")
	if r.Code != 2 || !strings.Contains(r.Stderr, "CRYPTNBD_SECTOR_SIZE") {
		t.Errorf("CRYPTNBD_SECTOR_SIZE=lots: want exit 2 naming the variable, got %v", r)
	}
}

// TestCLILifecycle manages disks while the daemon serves them: a new disk
// is exported at once, a resize is seen by new connections, a delete
// removes the export and the image.
func TestCLILifecycle(t *testing.T) {
	t.Parallel()
	need(t, "libnbd-bin", "nbdinfo")
	d := startDaemon(t, daemonOpts{Demo: "demo"})

	if r := d.CLI("disk", "create", "fresh", "--size", "32M", "--sector-size", "512"); r.Code != 0 {
		t.Fatalf("disk create (online): %v", r)
	}
	r := mustRun(t, "nbdinfo", "--size", d.URI("fresh"))
	if got := strings.TrimSpace(r.Stdout); got != strconv.Itoa(32<<20) {
		t.Errorf("new disk: nbdinfo --size %s, want %d", got, 32<<20)
	}
	qemuIOOK(t, d.URI("fresh"), "write -P 0x61 30M 2M", "flush")

	if r := d.CLI("disk", "resize", "fresh", "--size", "48M"); r.Code != 0 {
		t.Fatalf("disk resize: %v", r)
	}
	r = mustRun(t, "nbdinfo", "--size", d.URI("fresh"))
	if got := strings.TrimSpace(r.Stdout); got != strconv.Itoa(48<<20) {
		t.Errorf("after resize: nbdinfo --size %s, want %d", got, 48<<20)
	}
	// Old data stays, the new part reads as zeros.
	qemuIOOK(t, d.URI("fresh"), "read -P 0x61 30M 2M", "read -P 0 32M 16M")

	r = d.CLI("disk", "show", "fresh", "-o", "json")
	var di struct {
		SizeBytes  int64  `json:"sizeBytes"`
		SectorSize int    `json:"sectorSize"`
		State      string `json:"state"`
		Path       string `json:"path"`
	}
	if err := json.Unmarshal([]byte(r.Stdout), &di); r.Code != 0 || err != nil {
		t.Fatalf("disk show -o json: %v %v", err, r)
	}
	if di.SizeBytes != 48<<20 || di.SectorSize != 512 || di.State != "Active" {
		t.Errorf("disk show: %+v", di)
	}

	// A disk in use is deleted only with --force; its clients then get
	// errors (or a closed connection), never data.
	conn, _ := transmit(t, d.Sock, "fresh")
	if r := d.CLI("disk", "delete", "fresh"); r.Code != 1 || !strings.Contains(r.Stderr, "connection") {
		t.Errorf("disk delete of a disk in use: want exit 1 naming the connections, got %v", r)
	}
	if r := d.CLI("disk", "delete", "fresh", "--force"); r.Code != 0 {
		t.Fatalf("disk delete --force: %v", r)
	}
	if err := conn.request(0, cmdRead, 1, 30<<20, 4096, nil); err == nil {
		if errno, _, data, err := conn.simpleReply(4096); err == nil && errno == 0 {
			t.Errorf("READ on a deleted disk returned data (% x...)", data[:8])
		}
	}
	if r := runCmd(t, "nbdinfo", "--size", d.URI("fresh")); r.Code == 0 {
		t.Errorf("deleted disk still exported: %v", r)
	}
	if _, err := os.Stat(d.Image("fresh")); !os.IsNotExist(err) {
		t.Errorf("image of a deleted disk: %v, want it gone", err)
	}
	got := diskListJSON(t, d.DataDir)
	if len(got) != 1 || got[0]["name"] != "demo" {
		t.Errorf("disk list after delete: %v, want just demo", got)
	}
}
