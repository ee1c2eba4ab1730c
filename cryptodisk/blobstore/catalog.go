package blobstore

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blockblob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/service"
)

// clientOptions gives the SDK an HTTP client that keeps enough idle
// connections for DefaultMaxConcurrency requests per Store (the SDK's
// default keeps 10 per host, so a busier Store would reconnect constantly).
func clientOptions() *service.ClientOptions {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConns = 256
	tr.MaxIdleConnsPerHost = 64
	return &service.ClientOptions{ClientOptions: policy.ClientOptions{Transport: &http.Client{Transport: tr}}}
}

// NewServiceClient returns a client for the storage account at accountURL
// (https://ACCOUNT.blob.core.windows.net/) that authenticates with cred,
// typically an azidentity chain (managed identity, workload identity, Azure
// CLI). The identity needs the Storage Blob Data Contributor role.
func NewServiceClient(accountURL string, cred azcore.TokenCredential) (*service.Client, error) {
	c, err := service.NewClient(accountURL, cred, clientOptions())
	if err != nil {
		return nil, fmt.Errorf("blobstore: %w", err)
	}
	return c, nil
}

// NewServiceClientFromConnectionString returns a client from a connection
// string with an account key or SAS, as Azurite and shared-key accounts use.
func NewServiceClientFromConnectionString(cs string) (*service.Client, error) {
	c, err := service.NewClientFromConnectionString(cs, clientOptions())
	if err != nil {
		// The SDK's message may quote the string, key included.
		return nil, fmt.Errorf("blobstore: connection string is not valid")
	}
	return c, nil
}

// CreateContainer creates c if it does not exist.
func CreateContainer(ctx context.Context, c *container.Client) error {
	if _, err := c.Create(ctx, nil); err != nil && !bloberror.HasCode(err, bloberror.ContainerAlreadyExists) {
		return ioError("create container", err)
	}
	return nil
}

// BlobInfo describes one disk blob in a container.
type BlobInfo struct {
	Name string
	Size int64
	// Metadata is the disk's metadata as Store.Metadata returns it.
	Metadata map[string]string
	// LeaseState is Azure's: "available", "leased", "expired", "breaking"
	// or "broken".
	LeaseState string
	// Holder is who holds the lease, as recorded when it was taken; empty
	// unless LeaseState is "leased" or "breaking".
	Holder string
	// HolderSince is when Holder took the lease.
	HolderSince time.Time
}

// List returns every page blob in c (every disk), with who serves each, in
// name order.
func List(ctx context.Context, c *container.Client) ([]BlobInfo, error) {
	var out []BlobInfo
	pager := c.NewListBlobsFlatPager(&container.ListBlobsFlatOptions{Include: container.ListBlobsInclude{Metadata: true}})
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			return nil, ioError("list", err)
		}
		for _, it := range page.Segment.BlobItems {
			p := it.Properties
			if it.Name == nil || p == nil || p.BlobType == nil || *p.BlobType != blob.BlobTypePageBlob {
				continue
			}
			bi := BlobInfo{Name: *it.Name}
			if p.ContentLength != nil {
				bi.Size = *p.ContentLength
			}
			var holder string
			var since time.Time
			bi.Metadata, holder, since = fromService(it.Metadata)
			if p.LeaseState != nil {
				bi.LeaseState = string(*p.LeaseState)
			}
			if bi.LeaseState == "leased" || bi.LeaseState == "breaking" {
				bi.Holder, bi.HolderSince = holder, since
			}
			out = append(out, bi)
		}
	}
	return out, nil
}

// PutJSON stores v as the JSON block blob name, replacing any. Use it for
// small shared definitions such as disk encryption sets.
func PutJSON(ctx context.Context, c *container.Client, name string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("blobstore: put %s: %w", name, err)
	}
	ct := "application/json"
	_, err = c.NewBlockBlobClient(name).Upload(ctx, streaming.NopCloser(bytes.NewReader(data)),
		&blockblob.UploadOptions{HTTPHeaders: &blob.HTTPHeaders{BlobContentType: &ct}})
	if err != nil {
		return ioError("put "+name, err)
	}
	return nil
}

// GetJSON decodes the JSON blob name into v. A missing blob gives an error
// matching fs.ErrNotExist.
func GetJSON(ctx context.Context, c *container.Client, name string, v any) error {
	data, err := download(ctx, c, name)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("blobstore: get %s: %w", name, err)
	}
	return nil
}

// maxJSONBytes bounds what GetJSON and ListJSON read from one blob.
const maxJSONBytes = 1 << 20

func download(ctx context.Context, c *container.Client, name string) ([]byte, error) {
	resp, err := c.NewBlobClient(name).DownloadStream(ctx, nil)
	if err != nil {
		return nil, ioError("get "+name, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxJSONBytes+1))
	if err != nil {
		return nil, ioError("get "+name, err)
	}
	if len(data) > maxJSONBytes {
		return nil, fmt.Errorf("blobstore: get %s: more than %d bytes", name, maxJSONBytes)
	}
	return data, nil
}

// ListJSON returns the JSON block blobs whose names start with prefix, by
// name. Page blobs (disks) under the prefix are skipped.
func ListJSON(ctx context.Context, c *container.Client, prefix string) (map[string]json.RawMessage, error) {
	out := make(map[string]json.RawMessage)
	pager := c.NewListBlobsFlatPager(&container.ListBlobsFlatOptions{Prefix: &prefix})
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			return nil, ioError("list "+prefix, err)
		}
		for _, it := range page.Segment.BlobItems {
			p := it.Properties
			if it.Name == nil || p == nil || p.BlobType == nil || *p.BlobType != blob.BlobTypeBlockBlob ||
				!strings.HasPrefix(*it.Name, prefix) {
				continue
			}
			data, err := download(ctx, c, *it.Name)
			if err != nil {
				if bloberror.HasCode(err, bloberror.BlobNotFound) {
					continue // deleted since the listing
				}
				return nil, err
			}
			if !json.Valid(data) {
				return nil, fmt.Errorf("blobstore: list %s: %s is not JSON", prefix, *it.Name)
			}
			out[*it.Name] = data
		}
	}
	return out, nil
}

// DeleteJSON deletes the JSON blob name. Deleting a missing blob is not an
// error.
func DeleteJSON(ctx context.Context, c *container.Client, name string) error {
	if _, err := c.NewBlockBlobClient(name).Delete(ctx, nil); err != nil && !bloberror.HasCode(err, bloberror.BlobNotFound) {
		return ioError("delete "+name, err)
	}
	return nil
}
