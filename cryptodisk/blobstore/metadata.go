package blobstore

import (
	"fmt"
	"maps"
	"strings"
	"time"
)

// Metadata keys this package owns. They are kept out of the maps callers see
// and set, so a caller's SetMetadata cannot erase who holds the disk.
const (
	metaPrefix      = "blobstore_"
	metaHolder      = metaPrefix + "holder"
	metaHolderSince = metaPrefix + "holder_since"
)

// maxMetadataBytes is Azure's limit on a blob's metadata, names and values.
const maxMetadataBytes = 8 << 10

// checkMetadata enforces what Azure accepts and this package relies on: keys
// are lower-case C# identifiers ([a-z_][a-z0-9_]*, so that HTTP header
// canonicalisation cannot change them), values printable ASCII, none of the
// reserved keys, 8 KiB in all.
func checkMetadata(m map[string]string) error {
	total := 0
	for k, v := range m {
		if k == "" || strings.HasPrefix(k, metaPrefix) {
			return fmt.Errorf("blobstore: metadata key %q: empty or reserved", k)
		}
		for i, c := range k {
			ok := c == '_' || c >= 'a' && c <= 'z' || i > 0 && c >= '0' && c <= '9'
			if !ok {
				return fmt.Errorf("blobstore: metadata key %q: want lower-case letters, digits and _", k)
			}
		}
		for _, c := range v {
			if c < 0x20 || c > 0x7e {
				return fmt.Errorf("blobstore: metadata %s: value must be printable ASCII (encode it first)", k)
			}
		}
		if strings.TrimSpace(v) != v {
			return fmt.Errorf("blobstore: metadata %s: value has leading or trailing spaces, which Azure drops", k)
		}
		total += len(k) + len(v)
	}
	if total > maxMetadataBytes-200 { // room for the holder keys
		return fmt.Errorf("blobstore: metadata is %d bytes, more than Azure's 8 KiB less room for the holder", total)
	}
	return nil
}

// fromService turns the SDK's metadata, whose keys Go's HTTP client has
// canonicalised ("Blobstore_holder"), into lower-case keys, and splits off
// the holder.
func fromService(sm map[string]*string) (user map[string]string, holder string, since time.Time) {
	user = make(map[string]string, len(sm))
	for k, v := range sm {
		if v == nil {
			continue
		}
		switch k = strings.ToLower(k); k {
		case metaHolder:
			holder = *v
		case metaHolderSince:
			since, _ = time.Parse(time.RFC3339, *v)
		default:
			user[k] = *v
		}
	}
	return user, holder, since
}

// toService builds the SDK's metadata from user metadata and a holder.
func toService(user map[string]string, holder string, since time.Time) map[string]*string {
	sm := make(map[string]*string, len(user)+2)
	for k, v := range maps.All(user) {
		sm[k] = &v
	}
	if holder != "" {
		sinceText := since.UTC().Format(time.RFC3339)
		sm[metaHolder] = &holder
		sm[metaHolderSince] = &sinceText
	}
	return sm
}
