package kvserver

import (
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// TestScheduledPurge checks that a soft-deleted key disappears, from memory
// and from state.json, once its scheduledPurgeDate has passed.
func TestScheduledPurge(t *testing.T) {
	dir := t.TempDir()
	s, err := New(Options{DataDir: dir, PurgeProtection: true, SoftDeleteRetentionDays: 7})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1_700_000_000, 0)
	s.clock = func() time.Time { return now }
	s.mu.Lock()
	for _, name := range []string{"gone", "kept"} {
		s.st.Keys[name] = &vaultKey{Name: name, Versions: []*keyVersion{{Version: randHex(32), Enabled: true}}}
	}
	s.st.Keys["gone"].DeletedDate = now.Add(-8 * 24 * time.Hour).Unix()
	s.st.Keys["gone"].PurgeDate = now.Add(-time.Hour).Unix()
	s.st.Keys["kept"].DeletedDate = now.Add(-6 * 24 * time.Hour).Unix()
	s.st.Keys["kept"].PurgeDate = now.Add(time.Hour).Unix()
	s.mu.Unlock()

	// Every routed data-plane request sweeps first.
	req := httptest.NewRequest(http.MethodGet, "https://vault/deletedkeys?api-version=2025-07-01", nil)
	s.route(req, &Principal{ObjectID: s.AdminObjectID()})

	st, _, err := loadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []map[string]*vaultKey{s.st.Keys, st.Keys} {
		if m["gone"] != nil {
			t.Errorf("key past its purge date survived")
		}
		if m["kept"] == nil {
			t.Errorf("key within retention was purged")
		}
	}
}
