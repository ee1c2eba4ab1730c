package main_test

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestAccessRulesByNetwork: a network rule that excludes loopback hides
// the disk from a loopback client exactly as if it did not exist; a rule
// that includes it lets it in; a read-only grant advertises READ_ONLY and
// refuses writes.
func TestAccessRulesByNetwork(t *testing.T) {
	need(t, "libnbd-bin", "nbdinfo")
	need(t, "qemu-utils", "qemu-io")
	d := startDaemon(t, daemonOpts{TCP: true, Disks: []diskSpec{{Name: "guarded", Size: "16M"}, {Name: "open", Size: "16M"}}})
	tcp := func(name string) string { return "nbd://" + d.NBDAddr + "/" + name }

	mustCLI(t, d, "disk", "update", "guarded", "--allow", "10.0.0.0/8")
	r := runCmd(t, "nbdinfo", "--json", tcp("guarded"))
	missing := runCmd(t, "nbdinfo", "--json", tcp("no-such-disk"))
	if r.Code == 0 {
		t.Errorf("a loopback client opened a disk allowed only to 10.0.0.0/8: %v", r)
	}
	if r.Code != missing.Code || strings.ReplaceAll(r.Stderr, "guarded", "X") != strings.ReplaceAll(missing.Stderr, "no-such-disk", "X") {
		t.Errorf("refusal differs from a missing disk:\nrefused: %v\nmissing: %v", r, missing)
	}
	list := mustRun(t, "nbdinfo", "--list", "--json", "nbd://"+d.NBDAddr)
	if strings.Contains(list.Stdout, `"guarded"`) || !strings.Contains(list.Stdout, `"open"`) {
		t.Errorf("LIST should show open and hide guarded:\n%s", list.Stdout)
	}
	if evs := auditEvents(t, d, "--disk", "guarded"); !hasEvent(evs, "access-refused", "") {
		t.Errorf("the refusal was not audited: %+v", evs)
	}

	mustCLI(t, d, "disk", "update", "guarded", "--allow", "127.0.0.0/8")
	mustRun(t, "qemu-io", "-f", "raw", tcp("guarded"), "-c", "write -P 0x11 0 64k", "-c", "read -P 0x11 0 64k")

	mustCLI(t, d, "disk", "update", "guarded", "--allow-ro", "127.0.0.1")
	var info struct {
		Exports []struct {
			ReadOnly bool `json:"is_read_only"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(mustRun(t, "nbdinfo", "--json", tcp("guarded")).Stdout), &info); err != nil || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo: %v", err)
	}
	if !info.Exports[0].ReadOnly {
		t.Errorf("a read-only grant did not advertise READ_ONLY")
	}
	mustRun(t, "qemu-io", "-r", "-f", "raw", tcp("guarded"), "-c", "read -P 0x11 0 64k")
	writeRefusedByServer(t, tcp("guarded"))
	// The Unix socket is local: its clients keep the loopback default.
	mustRun(t, "qemu-io", "-r", "-f", "raw", d.URI("open"), "-c", "read -P 0 0 4k")
	mustCLI(t, d, "disk", "update", "guarded", "--clear-access")
	mustRun(t, "qemu-io", "-f", "raw", tcp("guarded"), "-c", "write -P 0x33 0 4k")
}
