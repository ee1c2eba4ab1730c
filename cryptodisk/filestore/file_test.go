package filestore_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/filestore"
	"github.com/cryptnbd/cryptnbd/cryptodisk/storagetest"
)

var _ cryptodisk.Storage = (*filestore.File)(nil)

func TestSuite(t *testing.T) {
	storagetest.Suite{
		New: func(t *testing.T, size int64) cryptodisk.Storage {
			f, err := filestore.Create(filepath.Join(t.TempDir(), "disk.img"), size)
			if err != nil {
				t.Fatal(err)
			}
			return f
		},
		Reopen: func(t *testing.T, closed cryptodisk.Storage) cryptodisk.Storage {
			f, err := filestore.Open(closed.(*filestore.File).Path(), false)
			if err != nil {
				t.Fatal(err)
			}
			return f
		},
	}.Run(t)
}

func TestCreateExisting(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.img")
	f, err := filestore.Create(path, 4096)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := filestore.Create(path, 4096); !errors.Is(err, os.ErrExist) {
		t.Errorf("Create over an existing file: got %v, want os.ErrExist", err)
	}
}

func TestReadOnly(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "disk.img")
	f, err := filestore.Create(path, 8192)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.WriteAt(ctx, []byte("abc"), 100); err != nil {
		t.Fatal(err)
	}
	f.Close()
	ro, err := filestore.Open(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	buf := make([]byte, 3)
	if err := ro.ReadAt(ctx, buf, 100); err != nil || string(buf) != "abc" {
		t.Errorf("read-only ReadAt = %q, %v; want \"abc\"", buf, err)
	}
	if err := ro.WriteAt(ctx, buf, 0); err == nil {
		t.Errorf("WriteAt on a read-only store succeeded")
	}
}

func TestFileIsSparse(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.img")
	f, err := filestore.Create(path, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st os.FileInfo
	if st, err = os.Stat(path); err != nil {
		t.Fatal(err)
	}
	if st.Size() != 1<<30 {
		t.Errorf("file size %d, want 1 GiB", st.Size())
	}
	if blocks := blocksOf(t, path); blocks*512 > 1<<20 {
		t.Errorf("a new 1 GiB image uses %d bytes on disk, want a sparse file", blocks*512)
	}
}
