package daemon

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cryptnbd/cryptnbd/cryptodisk"
	"github.com/cryptnbd/cryptnbd/cryptodisk/filestore"
)

// shred crypto-shreds the image at path, then removes the file.
func shred(ctx context.Context, path string) error {
	store, err := filestore.Open(path, false)
	if err != nil {
		return err
	}
	err = cryptodisk.Shred(ctx, store)
	store.Close()
	if err != nil {
		return err
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("remove: %w", err)
	}
	return syncDir(filepath.Dir(path))
}
