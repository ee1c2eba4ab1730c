package main_test

// Customer-managed keys end to end: a local Key Vault (the cryptnbd binary's
// own `keyvault serve`, a separate process that can be stopped), a disk
// encryption set, and revocation drills under a running fio verify load.

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// vaultProc is a `cryptnbd keyvault serve` process on a fixed port, so that
// it can be stopped and started again under the same key ids.
type vaultProc struct {
	t     *testing.T
	Dir   string
	Addr  string
	cmd   *exec.Cmd
	logs  *syncBuffer
	purge bool
}

func startVault(t *testing.T, purgeProtection bool) *vaultProc {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	v := &vaultProc{t: t, Dir: filepath.Join(shortTempDir(t), "vault"), Addr: addr, logs: &syncBuffer{}}
	v.purge = purgeProtection
	t.Cleanup(func() {
		v.Stop()
		if t.Failed() {
			t.Logf("vault log:\n%s", clip(v.logs.String()))
		}
	})
	v.Start()
	return v
}

func (v *vaultProc) Start() {
	v.t.Helper()
	v.cmd = exec.Command(cryptnbdBin, "keyvault", "serve", "--data-dir", v.Dir, "--listen", v.Addr,
		fmt.Sprintf("--purge-protection=%t", v.purge), "--log-format", "json")
	v.cmd.Stdout, v.cmd.Stderr = v.logs, v.logs
	if err := v.cmd.Start(); err != nil {
		v.t.Fatalf("start vault: %v", err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", v.Addr, time.Second)
		if err == nil {
			c.Close()
			if _, err := os.Stat(filepath.Join(v.Dir, "admin.json")); err == nil {
				return
			}
		}
		if time.Now().After(deadline) {
			v.t.Fatalf("vault not listening on %s after 60s:\n%s", v.Addr, v.logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (v *vaultProc) Stop() {
	if v.cmd == nil {
		return
	}
	v.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { v.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		v.cmd.Process.Kill()
		<-done
	}
	v.cmd = nil
}

// CLI runs a keyvault command against this vault.
func (v *vaultProc) CLI(args ...string) result {
	v.t.Helper()
	return runCmd(v.t, cryptnbdBin, append(args, "--local-vault", v.Dir)...)
}

func (v *vaultProc) mustCLI(args ...string) string {
	v.t.Helper()
	r := v.CLI(args...)
	if r.Code != 0 {
		v.t.Fatalf("cryptnbd %s: %v", strings.Join(args, " "), r)
	}
	return r.Stdout
}

// cmkSetup is a daemon with one customer-key disk "cmk" under des1.
type cmkSetup struct {
	v         *vaultProc
	d         *testDaemon
	kid       string
	principal string
}

func setupCMK(t *testing.T, grace string, extra ...string) *cmkSetup {
	t.Helper()
	need(t, "fio", "fio")
	v := startVault(t, true)
	var bundle struct {
		Key struct {
			KID string `json:"kid"`
		} `json:"key"`
	}
	if err := json.Unmarshal([]byte(v.mustCLI("keyvault", "key", "create", "--name", "dk", "--size", "2048")), &bundle); err != nil {
		t.Fatalf("key create output: %v", err)
	}
	// Later flags win, so extra can override these defaults.
	d := startDaemon(t, daemonOpts{Extra: append([]string{
		"--local-vault", v.Dir, "--key-check-interval", "1s", "--key-probe-interval", "1s",
		"--key-grace", grace, "--suspend-hold", "25s", "--log-level", "debug"}, extra...)})
	mustCLI(t, d, "des", "create", "des1", "--key-url", bundle.Key.KID, "--auto-key-rotation")
	var des struct {
		Identity struct {
			PrincipalID string `json:"principalId"`
		} `json:"identity"`
	}
	if err := json.Unmarshal([]byte(mustCLI(t, d, "des", "show", "des1", "-o", "json")), &des); err != nil {
		t.Fatal(err)
	}
	v.mustCLI("keyvault", "set-policy", "--object-id", des.Identity.PrincipalID, "--key-permissions", "get", "wrapKey", "unwrapKey")
	mustCLI(t, d, "disk", "create", "cmk", "--size", "64M", "--des", "des1")
	return &cmkSetup{v: v, d: d, kid: bundle.Key.KID, principal: des.Identity.PrincipalID}
}

func mustCLI(t *testing.T, d *testDaemon, args ...string) string {
	t.Helper()
	r := d.CLI(args...)
	if r.Code != 0 {
		t.Fatalf("cryptnbd %s: %v", strings.Join(args, " "), r)
	}
	return r.Stdout
}

type diskState struct {
	State           string     `json:"state"`
	StateReason     string     `json:"stateReason"`
	KeyID           string     `json:"keyId"`
	WritesCompleted uint64     `json:"writesCompleted"`
	SuspendedSince  *time.Time `json:"suspendedSince"`
}

func showDisk(t *testing.T, d *testDaemon, name string) diskState {
	t.Helper()
	var s diskState
	if err := json.Unmarshal([]byte(mustCLI(t, d, "disk", "show", name, "-o", "json")), &s); err != nil {
		t.Fatalf("disk show: %v", err)
	}
	return s
}

// waitState polls until the disk reaches state, or fails after timeout.
func waitState(t *testing.T, d *testDaemon, name, state string, timeout time.Duration) diskState {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		s := showDisk(t, d, name)
		if s.State == state {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("disk %s still %s (%s) after %v, want %s", name, s.State, s.StateReason, timeout, state)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// backgroundFio starts a paced random-write job with continuous crc32c
// verification (reads of blocks already written) and a final full verify.
func backgroundFio(t *testing.T, uri string) (wait func() []fioJob) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "fio.json")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	cmd := exec.CommandContext(ctx, "fio", "--name=drill", "--ioengine=nbd", "--uri="+uri,
		"--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=32M", "--rate_iops=1000",
		"--verify=crc32c", "--verify_backlog=256", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
		"--output-format=json", "--output="+out)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("start fio: %v", err)
	}
	return func() []fioJob {
		t.Helper()
		defer cancel()
		err := cmd.Wait()
		raw, _ := os.ReadFile(out)
		if err != nil {
			t.Fatalf("fio: %v\n%s\n%s", err, stderr.String(), clip(string(raw)))
		}
		i := bytes.IndexByte(raw, '{')
		var rep struct {
			Jobs []fioJob `json:"jobs"`
		}
		if i < 0 || json.Unmarshal(raw[i:], &rep) != nil {
			t.Fatalf("fio report unreadable:\n%s", clip(string(raw)))
		}
		return rep.Jobs
	}
}

// drill revokes access while fio writes, checks that the disk suspends
// within 2 s and that no write completes while it is suspended, restores
// access and checks that I/O resumes and fio verifies every block.
func (c *cmkSetup) drill(t *testing.T, wantReason string, revoke, restore func()) {
	t.Helper()
	wait := backgroundFio(t, c.d.URI("cmk"))
	// Let fio get going: writes must be completing before the revocation.
	before := showDisk(t, c.d, "cmk").WritesCompleted
	deadline := time.Now().Add(30 * time.Second)
	for showDisk(t, c.d, "cmk").WritesCompleted < before+500 {
		if time.Now().After(deadline) {
			t.Fatal("fio made no progress before the revocation")
		}
		time.Sleep(100 * time.Millisecond)
	}
	revoke()
	revokedAt := time.Now()
	s := waitState(t, c.d, "cmk", "Suspended", 15*time.Second)
	if s.StateReason != wantReason {
		t.Errorf("suspended with reason %q, want %q", s.StateReason, wantReason)
	}
	if took := s.SuspendedSince.Sub(revokedAt); took > 2*time.Second {
		t.Errorf("suspension took %v after the revocation, want at most 2s", took)
	}
	// Nothing completes while suspended.
	frozen := s.WritesCompleted
	time.Sleep(2 * time.Second)
	s2 := showDisk(t, c.d, "cmk")
	if s2.State != "Suspended" || s2.WritesCompleted != frozen {
		t.Errorf("while suspended: state %s, writes completed %d -> %d, want no change", s2.State, frozen, s2.WritesCompleted)
	}
	restore()
	waitState(t, c.d, "cmk", "Active", 20*time.Second)
	jobs := wait()
	if len(jobs) != 1 || jobs[0].Error != 0 {
		t.Fatalf("fio after the drill: %+v", jobs)
	}
	if jobs[0].Write.IOBytes != 32<<20 || jobs[0].Read.IOBytes == 0 {
		t.Errorf("fio wrote %d and verified %d bytes, want all 32 MiB written and some verified", jobs[0].Write.IOBytes, jobs[0].Read.IOBytes)
	}
	if after := showDisk(t, c.d, "cmk").WritesCompleted; after <= frozen {
		t.Errorf("no write completed after the resumption (%d)", after)
	}
	c.checkAuditPair(t, frozen)
}

// checkAuditPair finds the last suspend/resume pair in the audit log and
// checks the daemon's own records: the write count at the suspension
// instant equals the count when the disk resumed.
func (c *cmkSetup) checkAuditPair(t *testing.T, frozen uint64) {
	t.Helper()
	evs := auditEvents(t, c.d, "--disk", "cmk")
	var susp, res *auditEvent
	for i := range evs {
		switch evs[i].Event {
		case "suspend":
			susp = &evs[i]
		case "resume":
			res = &evs[i]
		}
	}
	if susp == nil || res == nil {
		t.Fatalf("audit log lacks a suspend/resume pair: %+v", evs)
	}
	want := fmt.Sprintf("writesCompleted=%d", frozen)
	if !strings.Contains(susp.Detail, want) || res.Detail != want {
		t.Errorf("audit: suspend %q, resume %q; want both at %s", susp.Detail, res.Detail, want)
	}
	if susp.Principal != c.principal || res.KeyID == "" {
		t.Errorf("audit events lack principal or kid: %+v %+v", susp, res)
	}
}

type auditEvent struct {
	Time      time.Time `json:"time"`
	Event     string    `json:"event"`
	Disk      string    `json:"disk"`
	KeyID     string    `json:"kid"`
	Principal string    `json:"principal"`
	Result    string    `json:"result"`
	LatencyMS float64   `json:"latencyMs"`
	Detail    string    `json:"detail"`
}

func auditEvents(t *testing.T, d *testDaemon, args ...string) []auditEvent {
	t.Helper()
	var evs []auditEvent
	out := mustCLI(t, d, append([]string{"audit", "-o", "json"}, args...)...)
	if err := json.Unmarshal([]byte(out), &evs); err != nil {
		t.Fatalf("audit -o json: %v\n%s", err, out)
	}
	return evs
}

// TestRevocationDrills: disable the key version, remove unwrapKey from the
// identity's policy, delete the key; each suspends the disk within 2 s
// under load, and giving access back resumes it without a reconnect.
func TestRevocationDrills(t *testing.T) {
	c := setupCMK(t, "1h")
	version := c.kid[strings.LastIndex(c.kid, "/")+1:]
	t.Run("disable", func(t *testing.T) {
		c.drill(t, "KeyDisabled",
			func() { c.v.mustCLI("keyvault", "key", "disable", "--name", "dk", "--version", version) },
			func() { c.v.mustCLI("keyvault", "key", "enable", "--name", "dk", "--version", version) })
	})
	t.Run("remove-unwrap-permission", func(t *testing.T) {
		c.drill(t, "AccessDenied",
			func() {
				c.v.mustCLI("keyvault", "set-policy", "--object-id", c.principal, "--key-permissions", "get", "wrapKey")
			},
			func() {
				c.v.mustCLI("keyvault", "set-policy", "--object-id", c.principal, "--key-permissions", "get", "wrapKey", "unwrapKey")
			})
	})
	t.Run("delete-recover", func(t *testing.T) {
		c.drill(t, "KeyNotFound",
			func() { c.v.mustCLI("keyvault", "key", "delete", "--name", "dk") },
			func() { c.v.mustCLI("keyvault", "key", "recover", "--name", "dk") })
	})
	// One line per key operation of the drills, and the filter works.
	evs := auditEvents(t, c.d, "--disk", "cmk")
	count := map[string]int{}
	for _, e := range evs {
		if e.Disk != "cmk" {
			t.Errorf("audit --disk cmk returned an event of disk %q", e.Disk)
		}
		count[e.Event]++
	}
	if count["suspend"] != 3 || count["resume"] != 3 || count["wrap"] != 1 || count["unwrap"] < 3 {
		t.Errorf("audit events by kind = %v, want 1 wrap, 3 suspend, 3 resume, at least 3 unwrap", count)
	}
	if future := auditEvents(t, c.d, "--since", time.Now().Add(time.Hour).UTC().Format(time.RFC3339)); len(future) != 0 {
		t.Errorf("audit --since in the future returned %d events", len(future))
	}
	checkNoKeyMaterialInLogs(t, c.d, "cmk")
}

// checkNoKeyMaterialInLogs looks for the disk's keyslot secret and volume
// key, in every common encoding, in the daemon's debug log and audit log.
func checkNoKeyMaterialInLogs(t *testing.T, d *testDaemon, disk string) {
	t.Helper()
	need(t, "cryptsetup-bin", "cryptsetup")
	dir := t.TempDir()
	secretFile := filepath.Join(dir, "secret")
	mustCLI(t, d, "disk", "recovery-secret", disk, "--out", secretFile)
	vkFile := filepath.Join(dir, "vk")
	mustRun(t, "cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", secretFile,
		"--volume-key-file", vkFile, d.Image(disk))
	logs := d.logs.String()
	audit, err := os.ReadFile(filepath.Join(d.DataDir, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs, `"level":"DEBUG"`) {
		t.Fatalf("the daemon log has no debug lines: the check would prove nothing")
	}
	for what, key := range map[string][]byte{"keyslot secret": readFile(t, secretFile), "volume key": readFile(t, vkFile)} {
		for _, enc := range []string{hex.EncodeToString(key), strings.ToUpper(hex.EncodeToString(key)),
			base64.StdEncoding.EncodeToString(key), base64.RawStdEncoding.EncodeToString(key),
			base64.URLEncoding.EncodeToString(key), base64.RawURLEncoding.EncodeToString(key),
			fmt.Sprint(key), string(key)} {
			if strings.Contains(logs, enc) || bytes.Contains(audit, []byte(enc)) {
				t.Errorf("the %s appears in the logs", what)
			}
		}
	}
}

// TestKeyVaultOutageGrace: with the vault down, I/O goes on with the key
// the disk holds; when the grace period runs out the disk fails closed,
// and it resumes when the vault is back.
func TestKeyVaultOutageGrace(t *testing.T) {
	c := setupCMK(t, "4s")
	wait := backgroundFio(t, c.d.URI("cmk"))
	// Taken before the stop: grace counts from the last good check, which
	// came before the vault went away.
	stopped := time.Now()
	c.v.Stop()
	w0 := showDisk(t, c.d, "cmk").WritesCompleted
	time.Sleep(1500 * time.Millisecond)
	s := showDisk(t, c.d, "cmk")
	if s.State != "Active" || s.WritesCompleted <= w0 {
		t.Errorf("during the outage, within grace: state %s, writes %d -> %d; want Active and progressing", s.State, w0, s.WritesCompleted)
	}
	s = waitState(t, c.d, "cmk", "Suspended", 20*time.Second)
	if s.StateReason != "KeyVaultUnreachable" {
		t.Errorf("suspended with reason %q, want KeyVaultUnreachable", s.StateReason)
	}
	if took := s.SuspendedSince.Sub(stopped); took < 3*time.Second {
		t.Errorf("suspended %v after the outage began, before the 4s grace ran out", took)
	}
	c.v.Start()
	waitState(t, c.d, "cmk", "Active", 30*time.Second)
	jobs := wait()
	if len(jobs) != 1 || jobs[0].Error != 0 || jobs[0].Write.IOBytes != 32<<20 {
		t.Fatalf("fio after the outage: %+v", jobs)
	}
}

// TestAutomaticKeyRotation: a new key version re-wraps the disk within an
// interval; the old version can then be disabled without effect, and the
// disk opens after a restart.
func TestAutomaticKeyRotation(t *testing.T) {
	need(t, "qemu-utils", "qemu-io")
	c := setupCMK(t, "1h")
	uri := c.d.URI("cmk")
	mustRun(t, "qemu-io", "-f", "raw", uri, "-c", "write -P 0x3c 0 1M", "-c", "flush")
	var bundle struct {
		Key struct {
			KID string `json:"kid"`
		} `json:"key"`
	}
	if err := json.Unmarshal([]byte(c.v.mustCLI("keyvault", "key", "rotate", "--name", "dk")), &bundle); err != nil {
		t.Fatal(err)
	}
	newKID := bundle.Key.KID
	if newKID == c.kid {
		t.Fatalf("rotate returned the old version")
	}
	deadline := time.Now().Add(15 * time.Second)
	for showDisk(t, c.d, "cmk").KeyID != newKID {
		if time.Now().After(deadline) {
			t.Fatalf("disk token still names %s, want %s", showDisk(t, c.d, "cmk").KeyID, newKID)
		}
		time.Sleep(200 * time.Millisecond)
	}
	oldVersion := c.kid[strings.LastIndex(c.kid, "/")+1:]
	c.v.mustCLI("keyvault", "key", "disable", "--name", "dk", "--version", oldVersion)
	time.Sleep(3 * time.Second) // three check intervals
	if s := showDisk(t, c.d, "cmk"); s.State != "Active" {
		t.Errorf("after disabling the old version: %s (%s), want Active", s.State, s.StateReason)
	}
	mustRun(t, "qemu-io", "-f", "raw", uri, "-c", "read -P 0x3c 0 1M", "-c", "write -P 0x3d 1M 1M", "-c", "flush")
	c.d.Restart()
	if s := showDisk(t, c.d, "cmk"); s.State != "Active" || s.KeyID != newKID {
		t.Errorf("after restart: %s under %s, want Active under %s", s.State, s.KeyID, newKID)
	}
	mustRun(t, "qemu-io", "-f", "raw", uri, "-c", "read -P 0x3c 0 1M", "-c", "read -P 0x3d 1M 1M")
	if evs := auditEvents(t, c.d, "--disk", "cmk"); !hasEvent(evs, "rotate", newKID) {
		t.Errorf("audit log has no rotate event for %s", newKID)
	}
}

func hasEvent(evs []auditEvent, kind, kid string) bool {
	for _, e := range evs {
		if e.Event == kind && e.KeyID == kid {
			return true
		}
	}
	return false
}

// TestCustomerKeyValidation: the first disk under a set refuses a vault
// without purge protection, a disabled key and an identity without
// unwrapKey, each with a message that says what to fix.
func TestCustomerKeyValidation(t *testing.T) {
	for _, tc := range []struct {
		name    string
		purge   bool
		perms   []string
		disable bool
		want    string
	}{
		{name: "no-purge-protection", purge: false, perms: []string{"get", "wrapKey", "unwrapKey"}, want: "purge protection"},
		{name: "disabled-key", purge: true, perms: []string{"get", "wrapKey", "unwrapKey"}, disable: true, want: "disabled"},
		{name: "no-unwrap", purge: true, perms: []string{"get", "wrapKey"}, want: "set-policy"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := startVault(t, tc.purge)
			var bundle struct {
				Key struct {
					KID string `json:"kid"`
				} `json:"key"`
			}
			if err := json.Unmarshal([]byte(v.mustCLI("keyvault", "key", "create", "--name", "dk")), &bundle); err != nil {
				t.Fatal(err)
			}
			d := startDaemon(t, daemonOpts{Extra: []string{"--local-vault", v.Dir}})
			mustCLI(t, d, "des", "create", "des1", "--key-url", bundle.Key.KID)
			var des struct {
				Identity struct {
					PrincipalID string `json:"principalId"`
				} `json:"identity"`
			}
			json.Unmarshal([]byte(mustCLI(t, d, "des", "show", "des1", "-o", "json")), &des)
			v.mustCLI(append([]string{"keyvault", "set-policy", "--object-id", des.Identity.PrincipalID, "--key-permissions"}, tc.perms...)...)
			if tc.disable {
				v.mustCLI("keyvault", "key", "disable", "--name", "dk")
			}
			r := d.CLI("disk", "create", "cmk", "--size", "16M", "--des", "des1")
			if r.Code == 0 || !strings.Contains(r.Stderr, tc.want) {
				t.Errorf("disk create: want a failure mentioning %q, got %v", tc.want, r)
			}
			if out := mustCLI(t, d, "disk", "list", "-o", "json"); strings.Contains(out, "cmk") {
				t.Errorf("a refused disk was created: %s", out)
			}
		})
	}
}
