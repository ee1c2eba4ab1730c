// Package azuritetest runs Azurite, the Azure Storage emulator, for tests
// of page-blob storage. The emulator is the pinned one that
// deploy/azurite/run.sh installs with npm into the repository's ignored
// .cache/azurite, so the version is written down in that script alone.
package azuritetest

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Key is the fixed development key Azurite documents for its built-in
// account devstoreaccount1; it guards nothing.
const Key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

// Shared is one emulator for a whole test package, started by the first
// test that asks for it; TestMain calls Stop after the tests.
type Shared struct {
	once    sync.Once
	cmd     *exec.Cmd
	dir     string
	connStr string
	skip    string // why the emulator cannot run here, if it cannot
}

// ConnString starts the emulator if needed and returns an account-key
// connection string for it. It skips t if the emulator cannot run here
// (no npm and nothing installed).
func (s *Shared) ConnString(t testing.TB) string {
	t.Helper()
	s.once.Do(func() {
		if err := s.start(); err != nil {
			s.skip = fmt.Sprintf("Azurite (deploy/azurite/run.sh) cannot run here: %v", err)
		}
	})
	if s.skip != "" {
		t.Skip(s.skip)
	}
	return s.connStr
}

// Stop ends the emulator, if it was started, and removes its directory.
func (s *Shared) Stop() {
	if s.cmd != nil {
		s.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { s.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			s.cmd.Process.Kill()
			<-done
		}
	}
	if s.dir != "" {
		os.RemoveAll(s.dir)
	}
}

var listening = regexp.MustCompile(`listens on (http://127\.0\.0\.1:\d+)`)

func (s *Shared) start() error {
	root, err := repoRoot()
	if err != nil {
		return err
	}
	script := filepath.Join(root, "deploy", "azurite", "run.sh")
	if _, err := exec.LookPath("npm"); err != nil {
		if _, err := os.Stat(filepath.Join(root, ".cache", "azurite", "node_modules", ".bin", "azurite-blob")); err != nil {
			return fmt.Errorf("npm not found (install Node.js and npm)")
		}
	}
	if s.dir, err = os.MkdirTemp("", "azurite-"); err != nil {
		return err
	}
	// In memory: on-disk persistence makes each write about six times
	// slower and tests gain nothing from it. The working directory is a
	// temporary one in case Azurite leaves files anyway.
	cmd := exec.Command(script, "--blobHost", "127.0.0.1", "--blobPort", "0", "--inMemoryPersistence",
		"--skipApiVersionCheck", "--loose", "--disableTelemetry", "--silent")
	cmd.Dir = s.dir
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	// Read only after Wait, which finishes copying it.
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", script, err)
	}
	s.cmd = cmd
	found := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if m := listening.FindStringSubmatch(sc.Text()); m != nil {
				found <- m[1]
				break
			}
		}
		close(found)
		io.Copy(io.Discard, out) // keep the pipe drained
	}()
	var why string
	select {
	case url, ok := <-found:
		if ok {
			s.connStr = fmt.Sprintf("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=%s;BlobEndpoint=%s/devstoreaccount1;", Key, url)
			return nil
		}
		why = "exited before listening"
	case <-time.After(5 * time.Minute): // the first run installs it
		why = "not listening after 5 minutes"
	}
	cmd.Process.Kill()
	cmd.Wait()
	s.cmd = nil
	return fmt.Errorf("azurite %s: %s", why, stderr.String())
}

// repoRoot finds the module root above the test's working directory.
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
			return "", fmt.Errorf("no go.mod above %s", dir)
		}
		dir = parent
	}
}
