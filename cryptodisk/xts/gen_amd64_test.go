//go:build amd64 && !purego

package xts

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestGeneratedAsmUpToDate checks that xts_amd64.s is what asm/gen.go
// produces, so the generator and the committed kernels cannot drift apart.
func TestGeneratedAsmUpToDate(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the go tool")
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go tool not in PATH")
	}
	out := filepath.Join(t.TempDir(), "xts_amd64.s")
	if b, err := exec.Command(goTool, "run", "./asm/gen.go", "-out", out).CombinedOutput(); err != nil {
		t.Fatalf("go run ./asm/gen.go: %v\n%s", err, b)
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile("xts_amd64.s")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("xts_amd64.s is stale: run go generate in cryptodisk/xts")
	}
}
