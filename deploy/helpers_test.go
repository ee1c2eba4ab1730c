package deploy_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
)

// staticBuildFlags are the flags of the Dockerfile's build; TestStaticBinary
// checks that the Dockerfile still uses them.
const staticBuildFlags = `-trimpath -ldflags="-s -w"`

var (
	buildOnce sync.Once
	buildDir  string
	buildOut  string
	buildErr  error
)

// goTool returns the go command that is running this test.
func goTool() string {
	if p := filepath.Join(runtime.GOROOT(), "bin", "go"); fileExists(p) {
		return p
	}
	return "go"
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// staticBinary builds cmd/cryptnbd as the Dockerfile does, once per test
// run, and returns its path.
func staticBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "cryptnbd-deploy-")
		if buildErr != nil {
			return
		}
		bin := filepath.Join(buildDir, "cryptnbd")
		cmd := exec.Command(goTool(), "build", "-trimpath", "-ldflags=-s -w", "-o", bin, "./cmd/cryptnbd")
		cmd.Dir = ".."
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		out, err := cmd.CombinedOutput()
		buildOut, buildErr = string(out), err
	})
	if buildErr != nil {
		t.Fatalf("CGO_ENABLED=0 go build ./cmd/cryptnbd: %v\n%s", buildErr, buildOut)
	}
	return filepath.Join(buildDir, "cryptnbd")
}

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// envSettings returns the KEY=VALUE lines of an environment file, with the
// commented-out examples (#KEY=...) when withComments.
func envSettings(text string, withComments bool) map[string]string {
	out := map[string]string{}
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if c, ok := strings.CutPrefix(line, "#"); ok {
			if !withComments {
				continue
			}
			line = c
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || k == "" || strings.ContainsAny(k, " \t") {
			continue
		}
		out[k] = v
	}
	return out
}
