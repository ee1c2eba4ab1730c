package blobstore_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/service"

	"github.com/cryptnbd/cryptnbd/cryptodisk/blobstore"
)

// azuriteVersion is the pinned Azurite the tests run against; the
// Makefile's test-deps installs the same one into .cache/azurite.
const azuriteVersion = "3.37.0"

// azuriteKey is the fixed development account key Azurite documents for
// its built-in account devstoreaccount1; it guards nothing.
const azuriteKey = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

// emulator is one Azurite process shared by every test in the package,
// started by the first test that needs it and stopped by TestMain.
var emulator struct {
	once    sync.Once
	cmd     *exec.Cmd
	dir     string
	connStr string
	skip    string // why tests cannot run, if they cannot
}

func TestMain(m *testing.M) {
	code := m.Run()
	if emulator.cmd != nil {
		emulator.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { emulator.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			emulator.cmd.Process.Kill()
			<-done
		}
	}
	if emulator.dir != "" {
		os.RemoveAll(emulator.dir)
	}
	os.Exit(code)
}

// repoRoot finds the module root, where .cache/azurite lives.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod above the test directory")
		}
		dir = parent
	}
}

// azuriteBinary returns the pinned azurite-blob, installing it with npm into
// the ignored .cache/azurite folder if it is not there yet.
func azuriteBinary() (string, error) {
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	prefix := filepath.Join(root, ".cache", "azurite")
	bin := filepath.Join(prefix, "node_modules", ".bin", "azurite-blob")
	pkg := filepath.Join(prefix, "node_modules", "azurite", "package.json")
	if data, err := os.ReadFile(pkg); err == nil && strings.Contains(string(data), `"version": "`+azuriteVersion+`"`) {
		if _, err := os.Stat(bin); err == nil {
			return bin, nil
		}
	}
	npm, err := exec.LookPath("npm")
	if err != nil {
		return "", fmt.Errorf("npm not found (install Node.js and npm, then `make test-deps`)")
	}
	if _, err := exec.LookPath("node"); err != nil {
		return "", fmt.Errorf("node not found")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, npm, "install", "--prefix", prefix, "--no-audit", "--no-fund",
		"azurite@"+azuriteVersion).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("npm install azurite@%s: %v: %s", azuriteVersion, err, out)
	}
	return bin, nil
}

var listening = regexp.MustCompile(`listens on (http://127\.0\.0\.1:\d+)`)

func startAzurite() error {
	bin, err := azuriteBinary()
	if err != nil {
		return err
	}
	emulator.dir, err = os.MkdirTemp("", "azurite-")
	if err != nil {
		return err
	}
	// In memory: on-disk persistence (--location) makes each write about
	// six times slower and tests gain nothing from it. The working directory
	// is a temporary one in case Azurite leaves files anyway.
	cmd := exec.Command(bin, "--blobHost", "127.0.0.1", "--blobPort", "0", "--inMemoryPersistence",
		"--skipApiVersionCheck", "--loose", "--disableTelemetry", "--silent")
	cmd.Dir = emulator.dir
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", bin, err)
	}
	emulator.cmd = cmd
	found := make(chan string, 1)
	var output strings.Builder
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if m := listening.FindStringSubmatch(sc.Text()); m != nil {
				found <- m[1]
				break
			}
			output.WriteString(sc.Text() + "\n")
		}
		close(found)
		io.Copy(io.Discard, stdout) // keep the pipe drained
	}()
	select {
	case url, ok := <-found:
		if !ok {
			return fmt.Errorf("azurite exited before listening")
		}
		emulator.connStr = fmt.Sprintf("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=%s;BlobEndpoint=%s/devstoreaccount1;",
			azuriteKey, url)
		return nil
	case <-time.After(60 * time.Second):
		return fmt.Errorf("azurite did not report its port within 60 s")
	}
}

// account returns a client for the shared Azurite, skipping the test if
// Azurite cannot run here.
func account(t testing.TB) *service.Client {
	t.Helper()
	emulator.once.Do(func() {
		if err := startAzurite(); err != nil {
			emulator.skip = fmt.Sprintf("Azurite (npm package azurite@%s) cannot run: %v", azuriteVersion, err)
		}
	})
	if emulator.skip != "" {
		t.Skip(emulator.skip)
	}
	c, err := blobstore.NewServiceClientFromConnectionString(emulator.connStr)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

var containers atomic.Int64

// newContainer makes a fresh container for one test.
func newContainer(t *testing.T) *container.Client {
	t.Helper()
	c := account(t).NewContainerClient(fmt.Sprintf("test-%03d", containers.Add(1)))
	if err := blobstore.CreateContainer(context.Background(), c); err != nil {
		t.Fatalf("CreateContainer: %v", err)
	}
	return c
}
