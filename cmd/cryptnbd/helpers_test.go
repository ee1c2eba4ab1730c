package main_test

// The interop acceptance suite: the real cryptnbd binary, built once in
// TestMain, driven by the real NBD clients installed on the machine
// (libnbd-bin, qemu-utils, fio, nbdfuse) and checked with independent tools
// (cryptsetup, python3-cryptography). Each test starts its own daemon on its
// own data directory and Unix socket.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// cryptnbdBin is the daemon binary built by TestMain.
var cryptnbdBin string

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "cryptnbd-interop-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "interop:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	cryptnbdBin = filepath.Join(dir, "cryptnbd")
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	args := []string{"build", "-o", cryptnbdBin}
	// CRYPTNBD_TEST_RACE=1 builds the daemon with the race detector, so that
	// real clients hunt for data races in it; the daemon's stderr is then
	// checked for race reports at the end of each test.
	if os.Getenv("CRYPTNBD_TEST_RACE") != "" {
		args = append(args, "-race")
	}
	args = append(args, ".")
	cmd := exec.Command(goTool, args...)
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "interop: go build: %v\n%s", err, out)
		return 1
	}
	defer azurite.Stop()
	return m.Run()
}

// need skips the test when a command is missing, naming its Debian package.
func need(t *testing.T, pkg string, cmds ...string) {
	t.Helper()
	for _, c := range cmds {
		if _, err := exec.LookPath(c); err != nil {
			t.Skipf("%s not found: apt-get install %s", c, pkg)
		}
	}
}

// needPythonCryptography skips the test without python3's cryptography.
func needPythonCryptography(t *testing.T) {
	t.Helper()
	need(t, "python3", "python3")
	if err := exec.Command("python3", "-c", "import cryptography").Run(); err != nil {
		t.Skip("python3 cannot import cryptography: apt-get install python3-cryptography")
	}
}

// result is what a finished command produced.
type result struct {
	Stdout, Stderr string
	Code           int // exit status; -1 if killed by a signal or not started
	Err            error
}

func (r result) String() string {
	return fmt.Sprintf("exit %d (%v)\nstdout:\n%s\nstderr:\n%s", r.Code, r.Err, clip(r.Stdout), clip(r.Stderr))
}

func clip(s string) string {
	const max = 8 << 10
	if len(s) > max {
		return s[:max/2] + "\n[...]\n" + s[len(s)-max/2:]
	}
	return s
}

// cmdTimeout bounds every external command: a hung client fails its test
// instead of the whole run.
const cmdTimeout = 90 * time.Second

// runEnv runs a command with extra environment variables and returns what
// it did; it fails the test only if the command cannot be run at all or
// times out.
func runEnv(t *testing.T, env []string, name string, args ...string) result {
	t.Helper()
	return runIn(t, "", env, name, args...)
}

// runIn is runEnv in directory dir (the test's if empty).
func runIn(t *testing.T, dir string, env []string, name string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	r := result{Stdout: so.String(), Stderr: se.String(), Code: -1, Err: err}
	if cmd.ProcessState != nil {
		r.Code = cmd.ProcessState.ExitCode()
	}
	if ctx.Err() != nil {
		t.Fatalf("%s %q timed out after %v: %v", name, args, cmdTimeout, r)
	}
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("%s %q: %v", name, args, err)
	}
	return r
}

// runCmd runs a command and returns what it did.
func runCmd(t *testing.T, name string, args ...string) result {
	t.Helper()
	return runEnv(t, nil, name, args...)
}

// mustRun runs a command and fails the test, with its output, unless it
// exits 0.
func mustRun(t *testing.T, name string, args ...string) result {
	t.Helper()
	r := runCmd(t, name, args...)
	if r.Code != 0 {
		t.Fatalf("%s %s: %v", name, strings.Join(args, " "), r)
	}
	return r
}

// diskSpec is a disk created with the CLI before the daemon starts.
type diskSpec struct {
	Name       string
	Size       string // e.g. 64M
	SectorSize int    // 0 means the default (4096)
}

// daemonOpts says what a test daemon serves.
type daemonOpts struct {
	Demo     string // --demo-disk; empty for none
	DemoSize string // --demo-size; default 64M
	Disks    []diskSpec
	TCP      bool // also listen on 127.0.0.1:0
	// Extra flags for cryptnbd serve (and Env for its environment).
	Extra []string
	Env   []string
	// Prepare, if set, runs on the new data directory before anything
	// else (to copy a platform key into it, say).
	Prepare func(dataDir string)
}

// testDaemon is one cryptnbd serve process and its data directory. Its
// methods must be called from the test goroutine.
type testDaemon struct {
	t       *testing.T
	opts    daemonOpts
	DataDir string
	Sock    string // NBD Unix socket
	NBDAddr string // bound TCP address when opts.TCP
	logs    *syncBuffer

	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has been waited for
	werr error         // cmd.Wait's error, valid after done
}

// syncBuffer collects a process's stderr; safe for concurrent use.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// shortTempDir returns a fresh directory short enough to hold Unix sockets
// (108 bytes including the name): t.TempDir() unless $TMPDIR makes it too
// long.
func shortTempDir(t *testing.T) string {
	t.Helper()
	d := t.TempDir()
	if len(d) < 80 {
		return d
	}
	d, err := os.MkdirTemp("/tmp", "cn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// startDaemon creates opts.Disks with the CLI (offline), starts cryptnbd
// serve and waits until it is serving. Cleanup stops it gracefully and
// fails the test if it did not exit cleanly or the race detector reported
// anything.
func startDaemon(t *testing.T, opts daemonOpts) *testDaemon {
	t.Helper()
	dir := shortTempDir(t)
	d := &testDaemon{t: t, opts: opts, DataDir: filepath.Join(dir, "data"), Sock: filepath.Join(dir, "nbd.sock"), logs: &syncBuffer{}}
	if opts.Prepare != nil {
		if err := os.MkdirAll(d.DataDir, 0o700); err != nil {
			t.Fatal(err)
		}
		opts.Prepare(d.DataDir)
	}
	for _, ds := range opts.Disks {
		args := []string{"disk", "create", ds.Name, "--size", ds.Size}
		if ds.SectorSize != 0 {
			args = append(args, "--sector-size", fmt.Sprint(ds.SectorSize))
		}
		if r := d.CLI(args...); r.Code != 0 {
			t.Fatalf("disk create %s: %v", ds.Name, r)
		}
	}
	t.Cleanup(func() {
		if d.cmd != nil {
			if err := d.stop(syscall.SIGTERM); err != nil {
				t.Errorf("daemon did not shut down cleanly: %v", err)
			}
		}
		logs := d.logs.String()
		if strings.Contains(logs, "WARNING: DATA RACE") {
			t.Errorf("the race detector reported a data race in the daemon")
		}
		if t.Failed() {
			t.Logf("daemon log:\n%s", clip(logs))
		}
	})
	d.Start()
	return d
}

// Start starts the daemon on its data directory and waits until it logs
// that it is serving.
func (d *testDaemon) Start() {
	t := d.t
	t.Helper()
	if d.cmd != nil {
		t.Fatal("daemon already running")
	}
	args := []string{"serve", "--data-dir", d.DataDir, "--unix", d.Sock,
		"--metrics-listen", "", "--log-format", "json", "--log-level", "info"}
	if d.opts.TCP {
		args = append(args, "--listen", "127.0.0.1:0")
	} else {
		args = append(args, "--listen", "")
	}
	if d.opts.Demo != "" {
		size := d.opts.DemoSize
		if size == "" {
			size = "64M"
		}
		args = append(args, "--demo-disk", d.opts.Demo, "--demo-size", size)
	}
	args = append(args, d.opts.Extra...)
	cmd := exec.Command(cryptnbdBin, args...)
	cmd.Env = append(os.Environ(), d.opts.Env...)
	cmd.Stdout = io.Discard
	pr, pw := io.Pipe()
	cmd.Stderr = pw
	if err := cmd.Start(); err != nil {
		t.Fatalf("start daemon: %v", err)
	}
	d.cmd, d.done = cmd, make(chan struct{})
	ready := make(chan string, 1)
	go func() {
		// Copy stderr into the log buffer, and report the "serving" line.
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			d.logs.Write([]byte(line + "\n"))
			var m struct {
				Msg string `json:"msg"`
				NBD string `json:"nbd"`
			}
			if json.Unmarshal([]byte(line), &m) == nil && m.Msg == "serving" {
				select {
				case ready <- m.NBD:
				default:
				}
			}
		}
		io.Copy(d.logs, pr)
	}()
	go func(done chan struct{}) {
		d.werr = cmd.Wait()
		pw.Close()
		close(done)
	}(d.done)
	select {
	case addr := <-ready:
		d.NBDAddr = addr
	case <-d.done:
		d.cmd = nil
		t.Fatalf("daemon exited before serving: %v\n%s", d.werr, d.logs.String())
	case <-time.After(60 * time.Second):
		t.Fatalf("daemon not serving after 60s:\n%s", d.logs.String())
	}
	// The listeners are up before "serving" is logged; check anyway.
	c, err := net.DialTimeout("unix", d.Sock, 5*time.Second)
	if err != nil {
		t.Fatalf("daemon serving but its socket does not answer: %v", err)
	}
	c.Close()
}

// stop signals the daemon and waits for it to exit.
func (d *testDaemon) stop(sig syscall.Signal) error {
	if d.cmd == nil {
		return nil
	}
	defer func() { d.cmd = nil }()
	if err := d.cmd.Process.Signal(sig); err != nil {
		return err
	}
	select {
	case <-d.done:
	case <-time.After(45 * time.Second):
		d.cmd.Process.Kill()
		<-d.done
		return fmt.Errorf("daemon ignored %v for 45s", sig)
	}
	return d.werr
}

// Stop shuts the daemon down with SIGTERM and checks it exited 0.
func (d *testDaemon) Stop() {
	d.t.Helper()
	if err := d.stop(syscall.SIGTERM); err != nil {
		d.t.Fatalf("daemon shutdown: %v", err)
	}
}

// Kill kills the daemon with SIGKILL, as a crash would.
func (d *testDaemon) Kill() {
	d.t.Helper()
	err := d.stop(syscall.SIGKILL)
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		d.t.Fatalf("kill -9 daemon: want a killed process, got %v", err)
	}
}

// Restart stops the daemon gracefully and starts it again.
func (d *testDaemon) Restart() {
	d.t.Helper()
	d.Stop()
	d.Start()
}

// URI is the libnbd/qemu URI of an export over the Unix socket.
func (d *testDaemon) URI(name string) string {
	return fmt.Sprintf("nbd+unix:///%s?socket=%s", name, d.Sock)
}

// Image is the path of a disk's LUKS2 image.
func (d *testDaemon) Image(name string) string {
	return filepath.Join(d.DataDir, "disks", name+".luks")
}

// CLI runs the cryptnbd binary with --data-dir appended.
func (d *testDaemon) CLI(args ...string) result {
	d.t.Helper()
	return runCmd(d.t, cryptnbdBin, append(args, "--data-dir", d.DataDir)...)
}

// randomFile writes n bytes to a new file in dir: pseudo-random content
// from seed, with runs of zeroes every few hundred KiB so that clients'
// zero detection and sparse paths get exercised too.
func randomFile(t *testing.T, dir string, n int, seed uint64) (string, []byte) {
	t.Helper()
	b := make([]byte, n)
	fillRandom(b, seed)
	for off := 100 << 10; off+(64<<10) <= n; off += 300 << 10 {
		clear(b[off : off+(64<<10)])
	}
	p := filepath.Join(dir, fmt.Sprintf("rand-%d.bin", seed))
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p, b
}

// fillRandom fills b with a deterministic xorshift stream: reproducible,
// and not something a bug could produce by accident.
func fillRandom(b []byte, seed uint64) {
	x := seed*0x9E3779B97F4A7C15 | 1
	for i := range b {
		if i%8 == 0 {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
		}
		b[i] = byte(x >> (8 * (i % 8)))
	}
}

// readFile reads a whole file or fails the test.
func readFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// firstDiff describes where two byte slices first differ.
func firstDiff(got, want []byte) string {
	if len(got) != len(want) {
		return fmt.Sprintf("length %d, want %d", len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			return fmt.Sprintf("first difference at byte %d: got %#02x, want %#02x", i, got[i], want[i])
		}
	}
	return "equal"
}
