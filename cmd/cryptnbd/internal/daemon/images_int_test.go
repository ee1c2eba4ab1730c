package daemon

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk/filestore"
)

// TestFileImagesMapping: the file store maps the images it creates and
// opens, so that large I/O works on the page cache, unless serve was given
// --mmap=false (StoreConfig.NoMap).
func TestFileImagesMapping(t *testing.T) {
	ctx := context.Background()
	for _, noMap := range []bool{false, true} {
		dir := t.TempDir()
		images, _, err := openImages(ctx, dir, &StoreConfig{Kind: StoreFile, NoMap: noMap}, nil, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Join(dir, "disks"), 0o700); err != nil {
			t.Fatal(err)
		}
		img, err := images.Create(ctx, "d", ImageMeta{}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if read, _ := img.Store.(*filestore.File).Mapped(); read == noMap {
			t.Errorf("NoMap %v: a created image is mapped: %v", noMap, read)
		}
		if err := img.Store.Grow(ctx, 1<<20); err != nil {
			t.Fatal(err)
		}
		img.Store.Close()
		if err := img.Commit(ctx); err != nil {
			t.Fatal(err)
		}
		for _, ro := range []bool{false, true} {
			st, err := images.Open(ctx, "d", OpenOptions{ReadOnly: ro})
			if err != nil {
				t.Fatal(err)
			}
			if read, _ := st.(*filestore.File).Mapped(); read == noMap {
				t.Errorf("NoMap %v, read-only %v: an opened image is mapped: %v", noMap, ro, read)
			}
			st.Close()
		}
	}
}
