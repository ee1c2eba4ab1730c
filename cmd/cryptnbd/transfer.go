package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"

	"github.com/cryptnbd/cryptnbd/cmd/cryptnbd/internal/daemon"
	"github.com/cryptnbd/cryptnbd/cmd/cryptnbd/internal/nbdclient"
)

// chunkBytes is the unit in which images move; an all-zero chunk is a hole.
const chunkBytes = 1 << 20

// progress reports a transfer: a bar with rate and ETA on a terminal,
// NDJSON lines with -o json, nothing otherwise. Safe for concurrent use.
type progress struct {
	op    string
	total int64
	bar   *progressbar.ProgressBar
	enc   *json.Encoder
	start time.Time

	mu   sync.Mutex
	last time.Time
	done int64
}

// ProgressEvent is one machine-readable progress line (-o json).
type ProgressEvent struct {
	Event          string  `json:"event"` // "progress" or "done"
	Op             string  `json:"op"`
	DoneBytes      int64   `json:"doneBytes"`
	TotalBytes     int64   `json:"totalBytes"`
	BytesPerSecond float64 `json:"bytesPerSecond"`
	ETASeconds     float64 `json:"etaSeconds"`
	// Result is the disk, for an import or a creation, on the "done" line.
	Result any `json:"result,omitempty"`
}

// newProgress reports on jsonOut with format json, on a bar on stderr if
// stderr is a terminal, or not at all.
func newProgress(op string, total int64, format string, jsonOut io.Writer) *progress {
	p := &progress{op: op, total: total, start: time.Now()}
	switch {
	case format == "json":
		p.enc = json.NewEncoder(jsonOut)
	case isTerminal(os.Stderr):
		p.bar = progressbar.NewOptions64(total,
			progressbar.OptionSetWriter(os.Stderr),
			progressbar.OptionSetDescription(op),
			progressbar.OptionShowBytes(true),
			progressbar.OptionUseIECUnits(true),
			progressbar.OptionShowTotalBytes(true),
			progressbar.OptionSetPredictTime(true),
			progressbar.OptionSetElapsedTime(true),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionFullWidth(),
			progressbar.OptionOnCompletion(func() { fmt.Fprintln(os.Stderr) }),
		)
	}
	return p
}

func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// set records that done bytes of the total are through.
func (p *progress) set(done int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done = done
	if p.bar != nil {
		p.bar.Set64(done)
	}
	if p.enc != nil && (time.Since(p.last) >= 500*time.Millisecond || done == p.total) {
		p.last = time.Now()
		p.enc.Encode(p.eventLocked("progress", nil))
	}
}

func (p *progress) eventLocked(event string, result any) ProgressEvent {
	el := time.Since(p.start).Seconds()
	ev := ProgressEvent{Event: event, Op: p.op, DoneBytes: p.done, TotalBytes: p.total, Result: result}
	if el > 0 {
		ev.BytesPerSecond = float64(p.done) / el
	}
	if ev.BytesPerSecond > 0 {
		ev.ETASeconds = float64(p.total-p.done) / ev.BytesPerSecond
	}
	return ev
}

// finish ends the report; with -o json it writes the "done" line with result.
func (p *progress) finish(result any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.bar != nil {
		p.bar.Finish()
	}
	if p.enc != nil {
		p.enc.Encode(p.eventLocked("done", result))
	}
}

// abort ends the bar without claiming completion.
func (p *progress) abort() {
	if p.bar != nil {
		p.bar.Exit()
		fmt.Fprintln(os.Stderr)
	}
}

// countingReader reports bytes read through it.
type countingReader struct {
	r    io.Reader
	n    int64
	tell func(int64)
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n += int64(n)
	c.tell(c.n)
	return n, err
}

func isNBDURI(s string) bool {
	return strings.HasPrefix(s, "nbd://") || strings.HasPrefix(s, "nbd+unix://") || strings.HasPrefix(s, "nbds")
}

// openSource opens an import source and returns its size (-1 if unknown).
func openSource(ctx context.Context, from string) (io.Reader, int64, func(), error) {
	switch {
	case from == "-":
		return os.Stdin, -1, func() {}, nil
	case isNBDURI(from):
		c, err := nbdclient.Dial(ctx, from)
		if err != nil {
			return nil, 0, nil, err
		}
		r := bufio.NewReaderSize(io.NewSectionReader(c, 0, c.Size()), chunkBytes)
		return r, c.Size(), func() { c.Close() }, nil
	}
	f, err := os.Open(from)
	if err != nil {
		return nil, 0, nil, fmt.Errorf("import: %w", err)
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err == nil {
		_, err = f.Seek(0, io.SeekStart)
	}
	if err != nil {
		f.Close()
		return nil, 0, nil, fmt.Errorf("import: %s: %w", from, err)
	}
	return bufio.NewReaderSize(f, chunkBytes), size, func() { f.Close() }, nil
}

func diskImport(ctx context.Context, args []string) error {
	fs := newFlags("disk import", "disk import NAME --from FILE|nbd://HOST/EXPORT|- [--size S] [--sector-size 4096|512] [--des DES] [-o table|json]")
	dataDir := dataDirFlag(fs)
	from := fs.String("from", "", "raw image to import: a file, an NBD URI, or - for stdin")
	size := fs.String("size", "", "image size; required with --from -")
	sector := fs.Int("sector-size", 0, "encryption sector size: 4096 or 512 (default: 4096 when the size allows)")
	encType := fs.String("encryption-type", "", "EncryptionAtRestWithPlatformKey (the default) or EncryptionAtRestWithCustomerKey")
	des := fs.String("des", "", "disk encryption set for a customer-managed key")
	vault := vaultFlags(fs)
	out := outputFlag(fs)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	name, err := oneName("disk import", pos)
	if err != nil {
		return err
	}
	if *from == "" {
		return usagef("disk import: --from is required (a file, nbd://HOST/EXPORT, or -)")
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	src, n, closeSrc, err := openSource(ctx, *from)
	if err != nil {
		return err
	}
	defer closeSrc()
	if *size != "" {
		want, err := daemon.ParseSize(*size)
		if err != nil {
			return usagef("disk import: --size: %v", err)
		}
		if n >= 0 && n != want {
			return usagef("disk import: --size %s is %d bytes, but %s has %d", *size, want, *from, n)
		}
		n = want
	}
	if n < 0 {
		return usagef("disk import: --from - needs --size")
	}
	if n == 0 {
		return usagef("disk import: %s is empty", *from)
	}
	if *sector == 0 {
		*sector = 4096
		if n%4096 != 0 {
			*sector = 512
		}
	}
	if n%int64(*sector) != 0 {
		return usagef("disk import: the image is %d bytes, not a multiple of the %d-byte sector: pad it (truncate -s)", n, *sector)
	}
	c, done, err := connect(ctx, *dataDir, vault)
	if err != nil {
		return err
	}
	defer done()
	p := newProgress("import "+name, n, *out, os.Stdout)
	cr := &countingReader{r: src, tell: p.set}
	di, err := c.ImportDisk(ctx, daemon.CreateRequest{Name: name, SizeBytes: n, SectorSize: *sector, EncryptionType: *encType, DES: *des}, cr)
	if err != nil {
		p.abort()
		if ctx.Err() != nil {
			return fmt.Errorf("import of %s interrupted; nothing was kept, run it again", name)
		}
		return err
	}
	p.finish(di)
	if *out == "json" {
		return nil
	}
	fmt.Fprintf(os.Stderr, "imported %s (%s)\n", name, daemon.HumanBytes(n))
	return printDisks(*out, []daemon.DiskInfo{di}, true)
}

func diskExport(ctx context.Context, args []string) error {
	fs := newFlags("disk export", "disk export NAME|DISK@SNAP --to FILE|nbd://HOST/EXPORT|- [--force] [-o table|json]")
	dataDir := dataDirFlag(fs)
	to := fs.String("to", "", "where the plaintext goes: a file (written sparse), an NBD URI, or - for stdout")
	force := fs.Bool("force", false, "replace FILE if it exists")
	out := outputFlag(fs)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("disk export: give exactly one disk or snapshot (DISK@SNAP)")
	}
	name := pos[0]
	if strings.Contains(name, "@") {
		if _, _, err := daemon.SplitSnapshotName(name); err != nil {
			return usagef("disk export: %v", err)
		}
	} else if err := daemon.ValidateName(name); err != nil {
		return usagef("disk export: %v", err)
	}
	if *to == "" {
		return usagef("disk export: --to is required (a file, nbd://HOST/EXPORT, or -)")
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	if *to != "-" && !isNBDURI(*to) && !*force {
		if _, err := os.Stat(*to); err == nil {
			return fmt.Errorf("export: %s exists; use --force to replace it", *to)
		}
	}
	c, done, err := connect(ctx, *dataDir, nil)
	if err != nil {
		return err
	}
	defer done()
	size, body, err := c.ExportDisk(ctx, name)
	if err != nil {
		return err
	}
	defer body.Close()
	var jsonOut io.Writer = os.Stdout
	if *to == "-" {
		jsonOut = os.Stderr
	}
	p := newProgress("export "+name, size, *out, jsonOut)
	err = writeExport(ctx, *to, size, body, p)
	if err != nil {
		p.abort()
		if ctx.Err() != nil {
			return fmt.Errorf("export of %s interrupted", name)
		}
		return err
	}
	p.finish(nil)
	if *out == "table" {
		fmt.Fprintf(os.Stderr, "exported %s (%s) to %s\n", name, daemon.HumanBytes(size), *to)
	}
	return nil
}

// writeExport copies size bytes of plaintext from body to dest.
func writeExport(ctx context.Context, dest string, size int64, body io.Reader, p *progress) error {
	body = &countingReader{r: body, tell: p.set}
	switch {
	case dest == "-":
		w := bufio.NewWriterSize(os.Stdout, chunkBytes)
		n, err := io.Copy(w, body)
		if err == nil && n != size {
			err = fmt.Errorf("export: the daemon sent %d of %d bytes", n, size)
		}
		if err == nil {
			err = w.Flush()
		}
		return err
	case isNBDURI(dest):
		nc, err := nbdclient.Dial(ctx, dest)
		if err != nil {
			return err
		}
		defer nc.Close()
		if nc.Size() < size {
			return fmt.Errorf("export: %s holds %d bytes, the disk is %d", dest, nc.Size(), size)
		}
		if nc.ReadOnly() {
			return fmt.Errorf("export: %s is read-only", dest)
		}
		err = eachChunk(body, size, func(b []byte, off int64, zero bool) error {
			if zero {
				return nc.Zero(off, int64(len(b)))
			}
			_, err := nc.WriteAt(b, off)
			return err
		})
		if err != nil {
			return err
		}
		return nc.Flush()
	}
	// A file: written sparse under a temporary name, renamed when complete.
	f, err := os.CreateTemp(filepath.Dir(dest), "."+filepath.Base(dest)+".part*")
	if err != nil {
		return fmt.Errorf("export: %w", err)
	}
	tmp := f.Name()
	err = eachChunk(body, size, func(b []byte, off int64, zero bool) error {
		if zero {
			return nil
		}
		_, err := f.WriteAt(b, off)
		return err
	})
	if err == nil {
		err = f.Truncate(size)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp, 0o600)
	}
	if err == nil {
		err = os.Rename(tmp, dest)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("export: %w", err)
	}
	return nil
}

// eachChunk reads size bytes from r in chunks and hands each to fn, saying
// whether it is all zeros.
func eachChunk(r io.Reader, size int64, fn func(b []byte, off int64, zero bool) error) error {
	buf := make([]byte, chunkBytes)
	zero := make([]byte, chunkBytes)
	for off := int64(0); off < size; {
		n := min(int64(len(buf)), size-off)
		b := buf[:n]
		if _, err := io.ReadFull(r, b); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return fmt.Errorf("export: the stream ended at %d of %d bytes (the daemon log says why)", off, size)
			}
			return fmt.Errorf("export: %w", err)
		}
		// Zeros are reported in 4 KiB pieces, so a chunk with a little data
		// leaves the rest a hole.
		for i := int64(0); i < n; {
			j := min(i+4096, n)
			z := bytes.Equal(b[i:j], zero[:j-i])
			for j < n && bytes.Equal(b[j:min(j+4096, n)], zero[:min(j+4096, n)-j]) == z {
				j = min(j+4096, n)
			}
			if err := fn(b[i:j], off+i, z); err != nil {
				return fmt.Errorf("export at %d: %w", off+i, err)
			}
			i = j
		}
		off += n
	}
	return nil
}

// createFromSnapshot is `disk create NAME --source DISK@SNAP`.
func createFromSnapshot(ctx context.Context, fs *flag.FlagSet, name, source string, reencrypt bool, size string, sector int, encType, des string, vault *daemon.VaultConfig, out, dataDir string) error {
	if _, _, err := daemon.SplitSnapshotName(source); err != nil {
		return usagef("disk create: --source: %v", err)
	}
	if source == "" {
		return usagef("disk create: --reencrypt needs --source DISK@SNAP")
	}
	req := daemon.CreateRequest{Name: name, Source: source, Reencrypt: reencrypt, EncryptionType: encType, DES: des}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if set["sector-size"] {
		req.SectorSize = sector
	}
	if size != "" {
		n, err := daemon.ParseSize(size)
		if err != nil {
			return usagef("disk create: --size: %v", err)
		}
		req.SizeBytes = n
	}
	if err := checkOutput(out); err != nil {
		return err
	}
	c, done, err := connect(ctx, dataDir, vault)
	if err != nil {
		return err
	}
	defer done()
	// The bar is drawn on a terminal only; -o json prints just the disk, as
	// a plain create does.
	var p *progress
	di, err := c.CreateDiskProgress(ctx, req, func(doneBytes, total int64) {
		if p == nil {
			p = newProgress("copy "+source, total, "table", nil)
		}
		p.set(doneBytes)
	})
	if err != nil {
		if p != nil {
			p.abort()
		}
		return err
	}
	if p != nil {
		p.finish(nil)
	}
	return printDisks(out, []daemon.DiskInfo{di}, true)
}
