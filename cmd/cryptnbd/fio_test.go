package main_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"path/filepath"
	"testing"
)

// fioJob is the part of a job in fio's JSON output that the tests check.
type fioJob struct {
	Name  string `json:"jobname"`
	Error int    `json:"error"`
	Read  struct {
		IOBytes int64 `json:"io_bytes"`
	} `json:"read"`
	Write struct {
		IOBytes int64 `json:"io_bytes"`
	} `json:"write"`
}

// runFio runs fio with the nbd engine and verification, and returns its
// jobs from the JSON report. fio's nbd engine prints to stdout, and fio
// itself may print notes before the JSON, hence --output and the search
// for the first brace.
func runFio(t *testing.T, uri string, args ...string) []fioJob {
	t.Helper()
	dir := t.TempDir()
	out := filepath.Join(dir, "fio.json")
	// fio saves a verify state file in its working directory when a job
	// dies mid-write: keep that out of the source tree.
	all := append([]string{"--name=verify", "--ioengine=nbd", "--uri=" + uri,
		"--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
		"--group_reporting=0", "--output-format=json", "--output=" + out}, args...)
	r := runIn(t, dir, nil, "fio", all...)
	raw := readFile(t, out)
	if r.Code != 0 {
		t.Fatalf("fio %q: %v\nreport:\n%s", args, r, clip(string(raw)))
	}
	i := bytes.IndexByte(raw, '{')
	if i < 0 {
		t.Fatalf("fio wrote no JSON report: %v\n%s", r, raw)
	}
	var rep struct {
		Jobs []fioJob `json:"jobs"`
	}
	if err := json.Unmarshal(raw[i:], &rep); err != nil {
		t.Fatalf("fio report: %v\n%s", err, clip(string(raw)))
	}
	return rep.Jobs
}

// checkFio checks that every one of n jobs wrote wantWrite bytes, read at
// least minVerify of them back for verification, and reported no error.
func checkFio(t *testing.T, jobs []fioJob, n int, wantWrite, minVerify int64) {
	t.Helper()
	if len(jobs) != n {
		t.Fatalf("fio reported %d jobs, want %d", len(jobs), n)
	}
	for i, j := range jobs {
		if j.Error != 0 {
			t.Errorf("job %d: error %d", i, j.Error)
		}
		if j.Write.IOBytes != wantWrite {
			t.Errorf("job %d: wrote %d bytes, want %d", i, j.Write.IOBytes, wantWrite)
		}
		if j.Read.IOBytes < minVerify {
			t.Errorf("job %d: verified %d bytes, want at least %d", i, j.Read.IOBytes, minVerify)
		}
	}
}

// TestFioVerify4K: four connections, each with 32 random 4 KiB writes in
// flight over its own region, then a crc32c verification of every block.
func TestFioVerify4K(t *testing.T) {
	t.Parallel()
	need(t, "fio", "fio")
	d := startDaemon(t, daemonOpts{Demo: "demo", DemoSize: "64M"})
	const region = 8 << 20
	jobs := runFio(t, d.URI("demo"),
		"--rw=randwrite", "--bs=4k", "--iodepth=32", "--numjobs=4",
		fmt.Sprintf("--size=%d", region), fmt.Sprintf("--offset_increment=%d", region))
	checkFio(t, jobs, 4, region, region)
}

// TestFioSubSector512 drives concurrent read-modify-write in the server:
// 512-byte writes on a disk with 4096-byte encryption sectors, with eight
// connections each owning one 512-byte slot of every 4 KiB sector, so that
// all eight write inside the same sectors at once. A lost update in the
// server's RMW (two writers each re-encrypting a stale copy of the sector)
// shows up as a crc32c mismatch in another job's slot.
func TestFioSubSector512(t *testing.T) {
	t.Parallel()
	need(t, "fio", "fio")
	d := startDaemon(t, daemonOpts{Disks: []diskSpec{{Name: "rmw", Size: "64M", SectorSize: 4096}}})
	const jobs = 8 // 8 slots of 512 bytes in a 4096-byte sector

	t.Run("sequential-strided", func(t *testing.T) {
		// Job i writes 512 bytes at i*512 + k*4096 for k = 0, 1, ...: rw=write:3584
		// skips the other seven slots after each write.
		const sectors = 2048
		got := runFio(t, d.URI("rmw"),
			"--rw=write:3584", "--bs=512", "--iodepth=32", fmt.Sprintf("--numjobs=%d", jobs),
			"--offset=0", "--offset_increment=512", fmt.Sprintf("--size=%d", sectors*4096),
			fmt.Sprintf("--number_ios=%d", sectors))
		checkFio(t, got, jobs, sectors*512, sectors*512)
	})
	t.Run("random", func(t *testing.T) {
		// Job i writes random 4096-aligned slots shifted by its offset i*512,
		// i.e. random sectors but always its own slot in them. blockalign turns
		// fio's random map off, so a block may be written twice: serialize_overlap
		// keeps those from racing each other inside one job.
		const sectors = 512
		got := runFio(t, d.URI("rmw"),
			"--rw=randwrite", "--bs=512", "--blockalign=4096", "--serialize_overlap=1",
			"--iodepth=16", fmt.Sprintf("--numjobs=%d", jobs),
			fmt.Sprintf("--offset=%d", 16<<20), "--offset_increment=512", fmt.Sprintf("--size=%d", sectors*4096),
			fmt.Sprintf("--number_ios=%d", sectors))
		// A block written twice is verified once: about 1-1/e of the
		// writes hit distinct blocks.
		checkFio(t, got, jobs, sectors*512, sectors*512/2)
	})
}
