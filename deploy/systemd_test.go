package deploy_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

const unitPath = "systemd/cryptnbd.service"

// installUnit writes the unit to a temp dir with ExecStart pointing at an
// executable that exists (verify insists), and returns its path.
func installUnit(t *testing.T) string {
	t.Helper()
	exe, err := os.Executable() // any executable will do for verify
	if err != nil {
		t.Fatal(err)
	}
	unit := readFile(t, unitPath)
	re := regexp.MustCompile(`(?m)^ExecStart=/usr/bin/cryptnbd `)
	if !re.MatchString(unit) {
		t.Fatalf("%s: no ExecStart=/usr/bin/cryptnbd line", unitPath)
	}
	unit = re.ReplaceAllString(unit, "ExecStart="+exe+" ")
	p := filepath.Join(t.TempDir(), "cryptnbd.service")
	if err := os.WriteFile(p, []byte(unit), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func systemdAnalyze(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed (Debian package systemd)")
	}
	return p
}

// TestSystemdVerify runs systemd-analyze verify, which exits 0 even for an
// unknown or misspelt setting, so any message about our unit fails too.
func TestSystemdVerify(t *testing.T) {
	sa := systemdAnalyze(t)
	unit := installUnit(t)
	var out bytes.Buffer
	cmd := exec.Command(sa, "verify", "--man=no", unit)
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out.String())
	}
	for _, line := range strings.Split(out.String(), "\n") {
		if strings.Contains(line, "cryptnbd.service") {
			t.Errorf("systemd-analyze verify: %s", line)
		}
	}
}

// TestSystemdVerifyCatchesTypos makes sure the check above can fail: a
// misspelt key and a bad value must be reported.
func TestSystemdVerifyCatchesTypos(t *testing.T) {
	sa := systemdAnalyze(t)
	unit := installUnit(t)
	for _, bad := range []struct{ from, to string }{
		{"ProtectSystem=strict", "ProtectSytem=strict"},
		{"ProtectSystem=strict", "ProtectSystem=stric"},
	} {
		text := strings.Replace(readFile(t, unit), bad.from, bad.to, 1)
		p := filepath.Join(t.TempDir(), "cryptnbd.service")
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		out, _ := exec.Command(sa, "verify", "--man=no", p).CombinedOutput()
		if !strings.Contains(string(out), "cryptnbd.service") {
			t.Errorf("verify said nothing about %q: %q", bad.to, out)
		}
	}
}

// TestSystemdExposure keeps the unit's hardening from regressing:
// systemd-analyze security rates it 1.5 ("OK") on systemd 252.
func TestSystemdExposure(t *testing.T) {
	sa := systemdAnalyze(t)
	unit := installUnit(t)
	out, err := exec.Command(sa, "security", "--offline=yes", "--threshold=20", "--no-pager", unit).CombinedOutput()
	if err != nil {
		t.Errorf("systemd-analyze security: exposure above 2.0 (%v):\n%s", err, out)
	}
}

func TestSystemdUnitSettings(t *testing.T) {
	unit := readFile(t, unitPath)
	for _, want := range []string{
		"User=cryptnbd",
		"NoNewPrivileges=yes",
		"ProtectSystem=strict",
		"ReadWritePaths=/var/lib/cryptnbd",
		"StateDirectory=cryptnbd",
		"PrivateTmp=yes",
		"ProtectHome=yes",
		"CapabilityBoundingSet=",
		"Restart=on-failure",
		"EnvironmentFile=-/etc/cryptnbd/cryptnbd.env",
		"LimitCORE=0",
	} {
		if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(want) + `$`).MatchString(unit) {
			t.Errorf("%s lacks %q", unitPath, want)
		}
	}
	if !regexp.MustCompile(`(?m)^LimitMEMLOCK=\d+[KMG]?$`).MatchString(unit) {
		t.Errorf("%s lacks a LimitMEMLOCK for locked key pages", unitPath)
	}
	users := readFile(t, "systemd/cryptnbd.sysusers.conf")
	if !regexp.MustCompile(`(?m)^u cryptnbd `).MatchString(users) {
		t.Errorf("sysusers.d file does not create user cryptnbd:\n%s", users)
	}
}

// TestEnvFileNamesRealFlags checks every CRYPTNBD_* variable in the
// environment file (commented examples too) against `cryptnbd serve
// --help`, so a renamed flag cannot leave a setting silently ignored.
func TestEnvFileNamesRealFlags(t *testing.T) {
	flags := serveFlags(t, staticBinary(t))
	env := envSettings(readFile(t, "systemd/cryptnbd.env"), true)
	n := 0
	for k := range env {
		name, ok := strings.CutPrefix(k, "CRYPTNBD_")
		if !ok {
			continue
		}
		n++
		flag := strings.ToLower(strings.ReplaceAll(name, "_", "-"))
		if !flags[flag] {
			t.Errorf("cryptnbd.env sets %s, but serve has no --%s", k, flag)
		}
	}
	for _, must := range []string{"CRYPTNBD_DATA_DIR", "CRYPTNBD_LISTEN", "CRYPTNBD_METRICS_LISTEN", "CRYPTNBD_LOG_FORMAT"} {
		if _, ok := envSettings(readFile(t, "systemd/cryptnbd.env"), false)[must]; !ok {
			t.Errorf("cryptnbd.env does not set %s", must)
		}
	}
	if n < 5 {
		t.Errorf("found only %d CRYPTNBD_ settings; is the file parsed right?", n)
	}
}

// serveFlags returns the flag names `cryptnbd serve --help` lists.
func serveFlags(t *testing.T, bin string) map[string]bool {
	t.Helper()
	out, _ := exec.Command(bin, "serve", "--help").CombinedOutput()
	flags := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^  -([a-z0-9-]+)`).FindAllStringSubmatch(string(out), -1) {
		flags[m[1]] = true
	}
	if !flags["data-dir"] || !flags["listen"] {
		t.Fatalf("cryptnbd serve --help lists no --data-dir or --listen:\n%s", out)
	}
	return flags
}
