package deploy_test

import (
	"debug/elf"
	"regexp"
	"strings"
	"testing"
)

// TestStaticBinary builds cryptnbd as the Dockerfile does and checks that
// it needs no dynamic loader and no shared library, so it runs on
// distroless/static or scratch.
func TestStaticBinary(t *testing.T) {
	f, err := elf.Open(staticBinary(t))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Errorf("binary has a PT_INTERP program header: it needs a dynamic loader")
		}
		if p.Type == elf.PT_DYNAMIC {
			t.Errorf("binary has a PT_DYNAMIC segment")
		}
	}
	needed, err := f.DynString(elf.DT_NEEDED)
	if err != nil {
		t.Fatalf("reading DT_NEEDED: %v", err)
	}
	if len(needed) > 0 {
		t.Errorf("binary needs shared libraries %v", needed)
	}
	if f.Type != elf.ET_EXEC {
		t.Errorf("ELF type %v, want ET_EXEC (a static, non-PIE executable)", f.Type)
	}
}

func TestDockerfile(t *testing.T) {
	df := readFile(t, "container/Dockerfile")
	for _, want := range []string{
		"CGO_ENABLED=0 go build " + staticBuildFlags + " -o /out/cryptnbd ./cmd/cryptnbd",
		"USER 65532:65532",
		"EXPOSE 10809 9090",
		"VOLUME /var/lib/cryptnbd",
	} {
		if !strings.Contains(df, want) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
	froms := regexp.MustCompile(`(?m)^FROM (\S+)`).FindAllStringSubmatch(df, -1)
	if len(froms) < 2 {
		t.Fatalf("Dockerfile has %d stages, want a multi-stage build", len(froms))
	}
	if final := froms[len(froms)-1][1]; !strings.Contains(final, "distroless/static") || !strings.HasSuffix(final, ":nonroot") {
		t.Errorf("final image %s, want distroless static nonroot", final)
	}
	if !regexp.MustCompile(`(?m)^ENTRYPOINT \["/usr/bin/cryptnbd"\]$`).MatchString(df) {
		t.Errorf("Dockerfile ENTRYPOINT is not the exec form of /usr/bin/cryptnbd")
	}
}
