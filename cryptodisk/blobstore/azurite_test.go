package blobstore_test

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"
	"testing"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/service"

	"github.com/cryptnbd/cryptnbd/cryptodisk/blobstore"
	"github.com/cryptnbd/cryptnbd/cryptodisk/blobstore/azuritetest"
)

// emulator is one Azurite shared by every test in the package, started by
// the first test that needs it and stopped by TestMain.
var emulator azuritetest.Shared

func TestMain(m *testing.M) {
	code := m.Run()
	emulator.Stop()
	os.Exit(code)
}

// account returns a client for the shared Azurite, skipping the test if
// Azurite cannot run here.
func account(t testing.TB) *service.Client {
	t.Helper()
	c, err := blobstore.NewServiceClientFromConnectionString(emulator.ConnString(t))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

var containers atomic.Int64

// newContainer makes a fresh container for one test.
func newContainer(t *testing.T) *container.Client {
	t.Helper()
	c := account(t).NewContainerClient(fmt.Sprintf("test-%03d", containers.Add(1)))
	if err := blobstore.CreateContainer(context.Background(), c); err != nil {
		t.Fatalf("CreateContainer: %v", err)
	}
	return c
}
