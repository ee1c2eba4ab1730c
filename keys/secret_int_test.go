package keys

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"testing"
)

// TestSecretNeverRenders: key material held as a secret shows as
// [REDACTED] through slog (text and JSON), fmt and encoding/json, in any
// encoding of its bytes.
func TestSecretNeverRenders(t *testing.T) {
	raw := []byte("0123456789abcdef0123456789abcdef")
	s := secret(bytes.Clone(raw))
	var out bytes.Buffer
	slog.New(slog.NewJSONHandler(&out, &slog.HandlerOptions{Level: slog.LevelDebug})).Debug("k", "key", s)
	slog.New(slog.NewTextHandler(&out, &slog.HandlerOptions{Level: slog.LevelDebug})).Debug("k", "key", s)
	fmt.Fprintf(&out, "%v %s %+v %#v", s, s, s, s)
	j, err := json.Marshal(struct{ K secret }{s})
	if err != nil {
		t.Fatal(err)
	}
	out.Write(j)
	for _, enc := range []string{string(raw), hex.EncodeToString(raw), base64.StdEncoding.EncodeToString(raw), fmt.Sprint(raw)} {
		if bytes.Contains(out.Bytes(), []byte(enc)) {
			t.Errorf("key material rendered as %q in: %s", enc, out.String())
		}
	}
	if n := bytes.Count(out.Bytes(), []byte("[REDACTED]")); n < 7 {
		t.Errorf("[REDACTED] appears %d times, want every rendering (7): %s", n, out.String())
	}
}
