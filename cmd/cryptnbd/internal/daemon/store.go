package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/service"

	"github.com/cryptnbd/cryptnbd/cryptodisk/blobstore"
)

// Store kinds for StoreConfig.Kind (serve --store).
const (
	StoreFile   = "file"
	StoreAzblob = "azblob"
)

// StoreConfig says where disk images live. It is saved in DATA_DIR/store.json
// (without secrets), so CLI commands run with no daemon find the same store.
type StoreConfig struct {
	Kind string `json:"kind"`
	// AccountURL (https://ACCOUNT.blob.core.windows.net/) is reached with
	// the azidentity chain; ConnectionString (account key or SAS, as
	// Azurite uses) replaces both and is never saved.
	AccountURL       string `json:"accountUrl,omitempty"`
	Container        string `json:"container,omitempty"`
	ConnectionString string `json:"-"`
	// LeaseDuration is the blob lease, 15-60 s.
	LeaseDuration time.Duration `json:"leaseDuration,omitempty"`
	// Takeover attaches disks whose holder's lease expired.
	Takeover bool `json:"-"`
	// NoMap, with the file store, reads and writes images only with pread
	// and pwrite, never through a mapping of the page cache.
	NoMap bool `json:"-"`
}

// ConnectionStringEnv is read for the connection string when a CLI command
// opens an azblob data directory with no daemon running.
const ConnectionStringEnv = "CRYPTNBD_AZBLOB_CONNECTION_STRING"

const storeFile = "store.json"

// Check validates the configuration.
func (c *StoreConfig) Check() error {
	switch c.Kind {
	case "", StoreFile:
		if c.AccountURL != "" || c.Container != "" || c.ConnectionString != "" {
			return errors.New("the --azblob-* flags need --store azblob")
		}
		return nil
	case StoreAzblob:
	default:
		return fmt.Errorf("store %q: use file or azblob", c.Kind)
	}
	if (c.AccountURL == "") == (c.ConnectionString == "") {
		return errors.New("--store azblob needs --azblob-account-url (azidentity credentials) or --azblob-connection-string, not both")
	}
	if c.AccountURL != "" {
		u, err := url.Parse(c.AccountURL)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			return fmt.Errorf("--azblob-account-url %q: want https://ACCOUNT.blob.core.windows.net/", c.AccountURL)
		}
	}
	if c.Container == "" {
		return errors.New("--store azblob needs --azblob-container")
	}
	if c.LeaseDuration == 0 {
		c.LeaseDuration = blobstore.DefaultLeaseDuration
	}
	if c.LeaseDuration < 15*time.Second || c.LeaseDuration > 60*time.Second || c.LeaseDuration%time.Second != 0 {
		return fmt.Errorf("--lease-duration %v: whole seconds from 15s to 60s", c.LeaseDuration)
	}
	return nil
}

// loadStoreConfig reads DATA_DIR/store.json; none means files.
func loadStoreConfig(dataDir string) (*StoreConfig, error) {
	raw, err := os.ReadFile(filepath.Join(dataDir, storeFile))
	if errors.Is(err, os.ErrNotExist) {
		return &StoreConfig{Kind: StoreFile}, nil
	}
	if err != nil {
		return nil, err
	}
	var c StoreConfig
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, fmt.Errorf("%s: %w", storeFile, err)
	}
	c.ConnectionString = os.Getenv(ConnectionStringEnv)
	if c.ConnectionString != "" {
		c.AccountURL = ""
	}
	return &c, nil
}

func saveStoreConfig(dataDir string, c *StoreConfig) error {
	path := filepath.Join(dataDir, storeFile)
	if c.Kind == StoreFile {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	raw, _ := json.MarshalIndent(c, "", "  ")
	return writeFileAtomic(path, raw)
}

// daemonID returns this data directory's ID, made on first use: the host
// name and a random suffix. It names the daemon as a blob lease holder.
func daemonID(dataDir string) (string, error) {
	path := filepath.Join(dataDir, "daemon-id")
	raw, err := os.ReadFile(path)
	if err == nil {
		if id := strings.TrimSpace(string(raw)); id != "" {
			return id, nil
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	host, _ := os.Hostname()
	if host == "" {
		host = "cryptnbd"
	}
	var b [4]byte
	rand.Read(b[:])
	id := host + "-" + hex.EncodeToString(b[:])
	if err := writeFileAtomic(path, []byte(id+"\n")); err != nil {
		return "", err
	}
	return id, nil
}

// openImages builds the Images a StoreConfig names.
func openImages(ctx context.Context, dataDir string, c *StoreConfig, vault *VaultConfig, log *slog.Logger) (Images, string, error) {
	if c.Kind == "" || c.Kind == StoreFile {
		return newFileImages(dataDir, c.NoMap), "", nil
	}
	id, err := daemonID(dataDir)
	if err != nil {
		return nil, "", fmt.Errorf("daemon ID: %w", err)
	}
	var sc *service.Client
	if c.ConnectionString != "" {
		sc, err = blobstore.NewServiceClientFromConnectionString(c.ConnectionString)
	} else {
		cred, cerr := vault.Credential("")
		if cerr != nil {
			return nil, "", cerr
		}
		sc, err = blobstore.NewServiceClient(c.AccountURL, cred)
	}
	if err != nil {
		return nil, "", err
	}
	imgs, err := NewBlobImages(ctx, BlobImagesOptions{Container: sc.NewContainerClient(c.Container),
		LeaseDuration: c.LeaseDuration, Holder: id, Logger: log})
	if err != nil {
		return nil, "", err
	}
	return imgs, id, nil
}
