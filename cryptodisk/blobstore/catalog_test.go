package blobstore_test

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"testing"

	"github.com/cryptnbd/cryptnbd/cryptodisk/blobstore"
)

func TestList(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newContainer(t)
	served := create(t, c, 8192, blobstore.Options{Name: "served", Holder: "daemon-a"})
	defer served.Close()
	idle := create(t, c, 4096, blobstore.Options{Name: "idle", Holder: "daemon-b"})
	if err := idle.Close(); err != nil {
		t.Fatal(err)
	}
	if err := blobstore.PutJSON(ctx, c, "des/prod", map[string]string{"kid": "x"}); err != nil {
		t.Fatal(err)
	}
	infos, err := blobstore.List(ctx, c)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	type row struct {
		name, state, holder string
		size                int64
	}
	var got []row
	for _, bi := range infos {
		got = append(got, row{bi.Name, bi.LeaseState, bi.Holder, bi.Size})
		if bi.Holder != "" && bi.HolderSince.IsZero() {
			t.Errorf("%s: HolderSince not set", bi.Name)
		}
	}
	want := []row{{"idle", "available", "", 4096}, {"served", "leased", "daemon-a", 8192}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("List = %+v, want %+v (JSON blobs excluded)", got, want)
	}
}

func TestJSON(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newContainer(t)
	type set struct {
		KeyID    string `json:"kid"`
		Identity string `json:"identity"`
	}
	sets := map[string]set{
		"des/a": {"https://v.vault.azure.net/keys/a/1", "mi-a"},
		"des/b": {"https://v.vault.azure.net/keys/b/2", "mi-b"},
	}
	for name, v := range sets {
		if err := blobstore.PutJSON(ctx, c, name, v); err != nil {
			t.Fatalf("PutJSON %s: %v", name, err)
		}
	}
	if err := blobstore.PutJSON(ctx, c, "other/x", set{}); err != nil {
		t.Fatal(err)
	}
	disk := create(t, c, 4096, blobstore.Options{Name: "des/not-json"}) // a page blob under the prefix
	defer disk.Close()
	var got set
	if err := blobstore.GetJSON(ctx, c, "des/a", &got); err != nil || got != sets["des/a"] {
		t.Errorf("GetJSON des/a = %+v, %v; want %+v", got, err, sets["des/a"])
	}
	all, err := blobstore.ListJSON(ctx, c, "des/")
	if err != nil {
		t.Fatalf("ListJSON: %v", err)
	}
	if len(all) != 2 {
		t.Errorf("ListJSON returned %d blobs, want 2: %v", len(all), all)
	}
	for name, raw := range all {
		var v set
		if err := json.Unmarshal(raw, &v); err != nil || v != sets[name] {
			t.Errorf("ListJSON[%s] = %s (%v), want %+v", name, raw, err, sets[name])
		}
	}
	if err := blobstore.DeleteJSON(ctx, c, "des/a"); err != nil {
		t.Fatalf("DeleteJSON: %v", err)
	}
	if err := blobstore.DeleteJSON(ctx, c, "des/a"); err != nil {
		t.Errorf("second DeleteJSON: %v", err)
	}
	if err := blobstore.GetJSON(ctx, c, "des/a", &got); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("GetJSON after delete: got %v, want fs.ErrNotExist", err)
	}
}
