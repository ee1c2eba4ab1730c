package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/cryptnbd/cryptnbd/keys"
)

const desDir = "des"

// DESIdentity is the identity a disk encryption set acts as towards the
// vault, as a user-assigned managed identity does on Azure.
type DESIdentity struct {
	Type        string `json:"type"`
	PrincipalID string `json:"principalId"`
	ClientID    string `json:"clientId"`
}

// DESRecord is a disk encryption set as stored in DATA_DIR/des/NAME.json.
type DESRecord struct {
	Name           string `json:"name"`
	KeyURL         string `json:"keyUrl"`
	EncryptionType string `json:"encryptionType"`
	// RotationToLatestKeyVersionEnabled is Azure's name for
	// --auto-key-rotation: disks follow the newest enabled key version.
	RotationToLatestKeyVersionEnabled bool `json:"rotationToLatestKeyVersionEnabled"`
	// ActiveKeyID is the versioned kid new disks are wrapped under; empty
	// until the first disk resolves a versionless key URL.
	ActiveKeyID string      `json:"activeKeyId,omitempty"`
	Identity    DESIdentity `json:"identity"`
	Created     time.Time   `json:"created"`
}

// DESInfo is what `des show` prints.
type DESInfo struct {
	DESRecord
	AccessStatus *AccessStatus `json:"accessStatus,omitempty"`
	KeyState     string        `json:"keyState,omitempty"`
	Disks        []string      `json:"disks"`
}

// AccessStatus says whether the set's identity can use its key right now.
type AccessStatus struct {
	Get       bool `json:"get"`
	WrapKey   bool `json:"wrapKey"`
	UnwrapKey bool `json:"unwrapKey"`
}

// DESRequest creates or updates a set.
type DESRequest struct {
	Name                string `json:"name"`
	KeyURL              string `json:"keyUrl"`
	EncryptionType      string `json:"encryptionType,omitempty"`
	AutoKeyRotation     bool   `json:"autoKeyRotation,omitempty"`
	IdentityClientID    string `json:"identityClientId,omitempty"`
	IdentityPrincipalID string `json:"identityPrincipalId,omitempty"`
}

type desEntry struct {
	rec DESRecord
	kv  *keys.KeyVault
	// mu serialises operations that re-wrap the set's disks.
	mu sync.Mutex
}

var keyURLRE = regexp.MustCompile(`^/keys/[0-9A-Za-z-]{1,127}(/[0-9a-fA-F]{32})?/?$`)

// parseKeyURL checks a Key Vault key URL and returns the vault URL.
func parseKeyURL(s string) (string, error) {
	u, err := url.Parse(s)
	if err != nil || u.Scheme != "https" || u.Host == "" || !keyURLRE.MatchString(u.Path) || u.RawQuery != "" {
		return "", fmt.Errorf("%w: key URL %q: want https://VAULT/keys/NAME[/VERSION], as `az keyvault key show --query key.kid` prints", ErrInvalid, s)
	}
	return u.Scheme + "://" + u.Host, nil
}

// loadDES reads the disk encryption sets: DATA_DIR/des/NAME.json, or the
// des/NAME.json blobs of a shared store.
func (m *Manager) loadDES(ctx context.Context) error {
	recs, err := m.images.Records(ctx, desDir)
	if err != nil {
		return fmt.Errorf("daemon: disk encryption sets: %w", err)
	}
	for name, raw := range recs {
		var rec DESRecord
		if err := json.Unmarshal(raw, &rec); err != nil {
			return fmt.Errorf("daemon: disk encryption set %s: %w", name, err)
		}
		kv, err := m.newKeyVault(rec)
		if err != nil {
			return fmt.Errorf("daemon: disk encryption set %s: %w", name, err)
		}
		m.des[name] = &desEntry{rec: rec, kv: kv}
	}
	return nil
}

func (m *Manager) newKeyVault(rec DESRecord) (*keys.KeyVault, error) {
	if m.cfg.Vault == nil {
		return nil, errors.New("no Key Vault configuration")
	}
	cred, err := m.cfg.Vault.Credential(rec.Identity.ClientID)
	if err != nil {
		return nil, err
	}
	vaultURL, err := parseKeyURL(rec.KeyURL)
	if err != nil {
		return nil, err
	}
	kv, err := keys.NewKeyVault(keys.KeyVaultOptions{
		KeyURL: rec.KeyURL, Credential: cred, ClientOptions: m.cfg.Vault.ClientOptions(),
		AllowNonAzureHost: m.cfg.Vault.AllowNonAzure(vaultURL),
		Logger:            m.log.With("des", rec.Name), Observe: m.vaultObserver(rec.KeyURL),
	})
	if err != nil {
		return nil, err
	}
	if rec.ActiveKeyID != "" {
		kv.SetCurrent(rec.ActiveKeyID)
	}
	return kv, nil
}

func (m *Manager) saveDES(rec DESRecord) error {
	raw, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return m.images.PutRecord(ctx, desDir, rec.Name, raw)
}

// CreateDES creates a disk encryption set. As in the seed's order it checks
// only what can be checked before the identity is granted access: a
// well-formed key URL and a reachable vault. The first disk checks the rest.
func (m *Manager) CreateDES(ctx context.Context, r DESRequest) (DESInfo, error) {
	if err := ValidateName(r.Name); err != nil {
		return DESInfo{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if r.EncryptionType == "" {
		r.EncryptionType = EncryptionCustomerKey
	}
	if r.EncryptionType != EncryptionCustomerKey {
		return DESInfo{}, fmt.Errorf("%w: encryption type %q: a disk encryption set is for %s", ErrInvalid, r.EncryptionType, EncryptionCustomerKey)
	}
	vaultURL, err := parseKeyURL(r.KeyURL)
	if err != nil {
		return DESInfo{}, err
	}
	if (r.IdentityClientID == "") != (r.IdentityPrincipalID == "") {
		return DESInfo{}, fmt.Errorf("%w: give both --identity-client-id and --identity-principal-id, or neither", ErrInvalid)
	}
	m.mu.Lock()
	_, exists := m.des[r.Name]
	m.mu.Unlock()
	if exists {
		return DESInfo{}, fmt.Errorf("%w: disk encryption set %s", ErrExists, r.Name)
	}
	if err := m.vaultReachable(ctx, vaultURL); err != nil {
		return DESInfo{}, err
	}
	id := DESIdentity{Type: "UserAssigned", PrincipalID: r.IdentityPrincipalID, ClientID: r.IdentityClientID}
	if id.ClientID == "" {
		p, err := m.cfg.Vault.CreateIdentity(ctx, "des-"+r.Name)
		if err != nil {
			return DESInfo{}, fmt.Errorf("%w: identity for %s: %w", ErrInvalid, r.Name, err)
		}
		id.PrincipalID, id.ClientID = p.ObjectID, p.ClientID
	}
	rec := DESRecord{Name: r.Name, KeyURL: strings.TrimSuffix(r.KeyURL, "/"), EncryptionType: r.EncryptionType,
		RotationToLatestKeyVersionEnabled: r.AutoKeyRotation, Identity: id, Created: time.Now().UTC()}
	if strings.Count(strings.TrimPrefix(rec.KeyURL, vaultURL), "/") == 3 {
		rec.ActiveKeyID = rec.KeyURL
	}
	kv, err := m.newKeyVault(rec)
	if err != nil {
		return DESInfo{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.des[r.Name]; ok {
		return DESInfo{}, fmt.Errorf("%w: disk encryption set %s", ErrExists, r.Name)
	}
	if err := m.saveDES(rec); err != nil {
		return DESInfo{}, fmt.Errorf("daemon: save disk encryption set: %w", err)
	}
	m.des[r.Name] = &desEntry{rec: rec, kv: kv}
	m.log.Info("disk encryption set created", "des", r.Name, "keyUrl", rec.KeyURL, "principalId", id.PrincipalID)
	return DESInfo{DESRecord: rec, Disks: []string{}}, nil
}

// vaultReachable answers whether anything that speaks HTTP(S) answers at
// the vault URL: an unauthenticated request gets Key Vault's 401 challenge.
func (m *Manager) vaultReachable(ctx context.Context, vaultURL string) error {
	co := m.cfg.Vault.ClientOptions()
	hc := http.DefaultClient
	if c, ok := co.Transport.(*http.Client); ok {
		hc = c
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(cctx, http.MethodGet, vaultURL+"/keys?api-version=2025-07-01", nil)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("%w: vault %s is not reachable: %w", ErrInvalid, vaultURL, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		return fmt.Errorf("%w: %s answered %s to an unauthenticated request, not Key Vault's 401 challenge: is it a key vault?", ErrInvalid, vaultURL, resp.Status)
	}
	return nil
}

// ShowDES returns a set with its live access status.
func (m *Manager) ShowDES(ctx context.Context, name string) (DESInfo, error) {
	m.mu.Lock()
	e, ok := m.des[name]
	if !ok {
		m.mu.Unlock()
		return DESInfo{}, fmt.Errorf("%w: disk encryption set %s", ErrNotFound, name)
	}
	info := DESInfo{DESRecord: e.rec, Disks: m.disksOfLocked(name)}
	m.mu.Unlock()
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	get, wrap, unwrap := e.kv.AccessStatus(cctx)
	info.AccessStatus = &AccessStatus{Get: get, WrapKey: wrap, UnwrapKey: unwrap}
	if kid := e.kv.Current(); kid != "" && m.watcher != nil {
		if st, ok := m.watcher.State(kid); ok {
			info.KeyState = st.Status
		}
	}
	return info, nil
}

// ListDES returns every set, without live checks.
func (m *Manager) ListDES() []DESInfo {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]DESInfo, 0, len(m.des))
	for name, e := range m.des {
		out = append(out, DESInfo{DESRecord: e.rec, Disks: m.disksOfLocked(name)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (m *Manager) disksOfLocked(des string) []string {
	out := []string{}
	for _, e := range m.disks {
		if e.info != nil && e.info.Token.Properties["des"] == des {
			out = append(out, e.name)
		}
	}
	// Snapshots need the set's key too.
	for _, e := range m.snaps {
		if e.info != nil && e.info.Token.Properties["des"] == des {
			out = append(out, e.name)
		}
	}
	sort.Strings(out)
	return out
}

// DeleteDES removes a set no disk uses.
func (m *Manager) DeleteDES(name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.des[name]; !ok {
		return fmt.Errorf("%w: disk encryption set %s", ErrNotFound, name)
	}
	if d := m.disksOfLocked(name); len(d) > 0 {
		return fmt.Errorf("%w: disk encryption set %s is used by %s: delete those disks first", ErrInUse, name, strings.Join(d, ", "))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.images.DeleteRecord(ctx, desDir, name); err != nil {
		return fmt.Errorf("daemon: delete disk encryption set: %w", err)
	}
	delete(m.des, name)
	return nil
}

// UpdateDES points a set at another key and re-wraps every disk of the set
// under it. No data is re-encrypted.
func (m *Manager) UpdateDES(ctx context.Context, name, keyURL string) (DESInfo, error) {
	if _, err := parseKeyURL(keyURL); err != nil {
		return DESInfo{}, err
	}
	e, err := m.desEntry(name)
	if err != nil {
		return DESInfo{}, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	rec := e.rec
	rec.KeyURL, rec.ActiveKeyID = strings.TrimSuffix(keyURL, "/"), ""
	kv, err := m.newKeyVault(rec)
	if err != nil {
		return DESInfo{}, err
	}
	v, err := kv.Validate(ctx, rec.Identity.PrincipalID)
	if err != nil {
		return DESInfo{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	rec.ActiveKeyID = v.KeyID
	kv.SetCurrent(v.KeyID)
	if err := m.rewrapSet(ctx, name, e.kv, kv, "update"); err != nil {
		return DESInfo{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.saveDES(rec); err != nil {
		return DESInfo{}, err
	}
	e.rec, e.kv = rec, kv
	return DESInfo{DESRecord: rec, Disks: m.disksOfLocked(name)}, nil
}

// RotateDES re-wraps every disk of the set under the newest enabled
// version of its key, as automatic rotation does.
func (m *Manager) RotateDES(ctx context.Context, name string) (DESInfo, error) {
	e, err := m.desEntry(name)
	if err != nil {
		return DESInfo{}, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	cur := e.kv.Current()
	if cur == "" {
		cur = e.rec.KeyURL
	}
	st, err := e.kv.Status(ctx, cur)
	if err != nil {
		return DESInfo{}, fmt.Errorf("daemon: rotate %s: %w", name, err)
	}
	if st.Latest == "" {
		return DESInfo{}, fmt.Errorf("daemon: rotate %s: the key has no enabled version", name)
	}
	e.kv.SetCurrent(st.Latest)
	if err := m.rewrapSet(ctx, name, e.kv, e.kv, "rotate"); err != nil {
		return DESInfo{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	e.rec.ActiveKeyID = st.Latest
	if err := m.saveDES(e.rec); err != nil {
		return DESInfo{}, err
	}
	return DESInfo{DESRecord: e.rec, Disks: m.disksOfLocked(name)}, nil
}

func (m *Manager) desEntry(name string) (*desEntry, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.des[name]
	if !ok {
		return nil, fmt.Errorf("%w: disk encryption set %s", ErrNotFound, name)
	}
	return e, nil
}

// rewrapSet re-wraps every open disk of the set whose kid is not already
// to's current version, then moves its watch to the new kid.
func (m *Manager) rewrapSet(ctx context.Context, des string, from, to *keys.KeyVault, why string) error {
	m.mu.Lock()
	var es []*entry
	for _, e := range m.disks {
		if e.disk != nil && e.info != nil && e.info.Token.Properties["des"] == des {
			es = append(es, e)
		}
	}
	m.mu.Unlock()
	var errs []error
	for _, e := range es {
		old := e.disk.Token().KeyID
		if old == to.Current() {
			continue
		}
		start := time.Now()
		err := e.disk.Rewrap(ctx, from, to, keys.KeyVaultName)
		m.cfg.Audit.timed("rotate", e.name, to.Current(), m.principalOf(des), start, err)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", e.name, err))
			continue
		}
		m.log.Info("disk re-wrapped", "disk", e.name, "from", old, "kid", to.Current(), "why", why)
		m.mu.Lock()
		e.info.Token = e.disk.Token()
		m.mu.Unlock()
		m.watch(e, des, to)
	}
	return errors.Join(errs...)
}

func (m *Manager) principalOf(des string) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e, ok := m.des[des]; ok {
		return e.rec.Identity.PrincipalID
	}
	return ""
}
