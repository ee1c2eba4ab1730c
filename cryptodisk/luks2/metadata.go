package luks2

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"reflect"
	"slices"
	"strconv"
	"strings"
)

// Limits taken from cryptsetup (lib/luks2/luks2.h).
const (
	maxObjects      = 32        // LUKS2_KEYSLOTS_MAX, LUKS2_TOKENS_MAX
	maxKeyslotsSize = 128 << 20 // LUKS2_MAX_KEYSLOTS_SIZE
)

// metadata is the JSON area of a header. The top-level object is kept as raw
// members so that a header written back keeps every field it was read with,
// including ones this package does not understand; only tokens change, via
// SetToken and RemoveToken. The typed views below are derived from raw by
// parseMetadata and never modified afterwards.
type metadata struct {
	raw map[string]json.RawMessage

	keyslots map[int]*keyslot
	digests  map[int]*digest
	segments map[int]*segment
	tokens   map[int]json.RawMessage

	jsonSize     uint64
	keyslotsSize uint64
	requirements []string
}

type keyslot struct {
	Type     string          `json:"type"`
	KeySize  *int64          `json:"key_size"`
	Priority *int64          `json:"priority"`
	AreaRaw  json.RawMessage `json:"area"`
	AF       json.RawMessage `json:"af"`
	KDF      json.RawMessage `json:"kdf"`

	Area                 *keyslotArea `json:"-"` // decoded from AreaRaw
	areaOffset, areaSize uint64
}

type keyslotArea struct {
	Type       string `json:"type"`
	Offset     string `json:"offset"`
	Size       string `json:"size"`
	Encryption string `json:"encryption"`
	KeySize    *int64 `json:"key_size"`
}

type keyslotAF struct {
	Type    string `json:"type"`
	Stripes *int64 `json:"stripes"`
	Hash    string `json:"hash"`
}

type keyslotKDF struct {
	Type       string `json:"type"`
	Hash       string `json:"hash,omitempty"`
	Iterations *int64 `json:"iterations,omitempty"`
	Time       *int64 `json:"time,omitempty"`
	Memory     *int64 `json:"memory,omitempty"`
	CPUs       *int64 `json:"cpus,omitempty"`
	Salt       string `json:"salt"`
}

type digest struct {
	Type       string   `json:"type"`
	Keyslots   []string `json:"keyslots"`
	Segments   []string `json:"segments"`
	Hash       string   `json:"hash"`
	Iterations *int64   `json:"iterations"`
	Salt       string   `json:"salt"`
	Digest     string   `json:"digest"`
}

type segment struct {
	Type       string          `json:"type"`
	Offset     string          `json:"offset"`
	Size       string          `json:"size"`
	IVTweak    string          `json:"iv_tweak"`
	Encryption string          `json:"encryption"`
	SectorSize *int64          `json:"sector_size"`
	Integrity  json.RawMessage `json:"integrity"`
	Flags      json.RawMessage `json:"flags"`

	offset, size uint64 // size 0 means "dynamic"
}

type config struct {
	JSONSize     string          `json:"json_size"`
	KeyslotsSize string          `json:"keyslots_size"`
	Flags        json.RawMessage `json:"flags"`
	Requirements json.RawMessage `json:"requirements"`
}

// parseNumber parses a LUKS2 "numbered" string: decimal digits only,
// fitting in a uint64.
func parseNumber(s string) (uint64, error) {
	if s == "" {
		return 0, errors.New("empty number")
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("%q is not a decimal number", s)
		}
	}
	return strconv.ParseUint(s, 10, 64)
}

// parseID parses an object key ("0", "1", ...). Non-canonical forms such as
// "01" are rejected: cryptsetup could never look them up.
func parseID(s string) (int, error) {
	n, err := parseNumber(s)
	if err != nil || (len(s) > 1 && s[0] == '0') || n > math.MaxInt32 {
		return 0, fmt.Errorf("bad object key %q", s)
	}
	return int(n), nil
}

// object decodes raw as a JSON object (not null, not another type).
func object(raw json.RawMessage) (map[string]json.RawMessage, error) {
	raw = bytes.TrimLeft(raw, " \t\r\n")
	if len(raw) == 0 || raw[0] != '{' {
		return nil, errors.New("not a JSON object")
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, err
	}
	return m, nil
}

// numberedObjects decodes a section whose keys are object IDs.
func numberedObjects(top map[string]json.RawMessage, name string) (map[int]json.RawMessage, error) {
	raw, ok := top[name]
	if !ok {
		return nil, fmt.Errorf("missing %q section", name)
	}
	m, err := object(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	out := make(map[int]json.RawMessage, len(m))
	for k, v := range m {
		id, err := parseID(k)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		if _, dup := out[id]; dup {
			return nil, fmt.Errorf("%s: duplicate key %q", name, k)
		}
		if _, err := object(v); err != nil {
			return nil, fmt.Errorf("%s %d: %w", name, id, err)
		}
		out[id] = v
	}
	return out, nil
}

// strictUnmarshal decodes the JSON object raw into the struct *v. Unlike
// json.Unmarshal it refuses keys that match a field name only when case is
// ignored: cryptsetup matches names exactly.
func strictUnmarshal(raw json.RawMessage, v any) error {
	m, err := object(raw)
	if err != nil {
		return err
	}
	t := reflect.TypeOf(v).Elem()
	for i := 0; i < t.NumField(); i++ {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		if name == "" || name == "-" {
			continue
		}
		for k := range m {
			if k != name && strings.EqualFold(k, name) {
				return fmt.Errorf("key %q instead of %q", k, name)
			}
		}
	}
	return json.Unmarshal(raw, v)
}

// refs checks that every entry of ids is the key of an object in set.
func refs[T any](ids []string, set map[int]T, what string) error {
	for _, s := range ids {
		id, err := parseID(s)
		if err != nil {
			return fmt.Errorf("reference to %s: %w", what, err)
		}
		if _, ok := set[id]; !ok {
			return fmt.Errorf("reference to missing %s %q", what, s)
		}
	}
	return nil
}

func stringArray(raw json.RawMessage) error {
	if raw == nil {
		return nil
	}
	var a []string
	raw = bytes.TrimLeft(raw, " \t\r\n")
	if len(raw) == 0 || raw[0] != '[' {
		return errors.New("not an array")
	}
	return json.Unmarshal(raw, &a)
}

// parseMetadata parses and validates a JSON area (text up to the first NUL,
// only NULs after it), following the checks of cryptsetup's
// LUKS2_hdr_validate. hdrSize is the metadata size from the binary header.
// It returns an error wrapping ErrUnsupported for a valid header that uses
// features this package does not implement.
func parseMetadata(area []byte, hdrSize int64) (*metadata, error) {
	end := bytes.IndexByte(area, 0)
	if end < 0 {
		return nil, errors.New("JSON area has no terminating NUL")
	}
	for _, c := range area[end:] {
		if c != 0 {
			return nil, errors.New("non-NUL bytes after the JSON text")
		}
	}
	text := area[:end]
	if len(text) == 0 || text[0] != '{' || text[len(text)-1] != '}' {
		return nil, errors.New("JSON text is not a single object")
	}
	top, err := object(text)
	if err != nil {
		return nil, fmt.Errorf("JSON: %w", err)
	}
	md := &metadata{raw: top}
	if err := md.validate(hdrSize); err != nil {
		return nil, err
	}
	return md, nil
}

func (md *metadata) validate(hdrSize int64) error {
	// config, including requirements.
	var cfg config
	rawCfg, ok := md.raw["config"]
	if !ok {
		return errors.New("missing \"config\" section")
	}
	if err := strictUnmarshal(rawCfg, &cfg); err != nil {
		return fmt.Errorf("config: %w", err)
	}
	var err error
	if md.jsonSize, err = parseNumber(cfg.JSONSize); err != nil {
		return fmt.Errorf("config json_size: %w", err)
	}
	if md.keyslotsSize, err = parseNumber(cfg.KeyslotsSize); err != nil {
		return fmt.Errorf("config keyslots_size: %w", err)
	}
	if md.jsonSize != uint64(hdrSize-binHeaderSize) {
		return fmt.Errorf("config json_size %d does not match the binary header (%d)", md.jsonSize, hdrSize-binHeaderSize)
	}
	if md.keyslotsSize%4096 != 0 || md.keyslotsSize > maxKeyslotsSize {
		return fmt.Errorf("bad keyslots_size %d", md.keyslotsSize)
	}
	if err := stringArray(cfg.Flags); err != nil {
		return fmt.Errorf("config flags: %w", err)
	}
	if cfg.Requirements != nil {
		var req struct {
			Mandatory json.RawMessage `json:"mandatory"`
		}
		if err := strictUnmarshal(cfg.Requirements, &req); err != nil {
			return fmt.Errorf("config requirements: %w", err)
		}
		if err := stringArray(req.Mandatory); err != nil {
			return fmt.Errorf("config requirements: %w", err)
		}
		if req.Mandatory != nil {
			_ = json.Unmarshal(req.Mandatory, &md.requirements)
		}
	}

	// Sections and their object keys.
	rawKeyslots, err := numberedObjects(md.raw, "keyslots")
	if err != nil {
		return err
	}
	rawDigests, err := numberedObjects(md.raw, "digests")
	if err != nil {
		return err
	}
	rawSegments, err := numberedObjects(md.raw, "segments")
	if err != nil {
		return err
	}
	if md.tokens, err = numberedObjects(md.raw, "tokens"); err != nil {
		return err
	}

	// Keyslots, including their binary areas.
	md.keyslots = make(map[int]*keyslot, len(rawKeyslots))
	for id, raw := range rawKeyslots {
		ks := new(keyslot)
		if err := strictUnmarshal(raw, ks); err != nil {
			return fmt.Errorf("keyslot %d: %w", id, err)
		}
		if err := ks.validate(); err != nil {
			return fmt.Errorf("keyslot %d: %w", id, err)
		}
		md.keyslots[id] = ks
	}
	mdEnd := 2 * uint64(hdrSize)
	areasEnd := mdEnd + md.keyslotsSize
	for id, ks := range md.keyslots {
		if ks.areaOffset < mdEnd || ks.areaSize == 0 || ks.areaOffset > math.MaxUint64-ks.areaSize ||
			ks.areaOffset+ks.areaSize > areasEnd {
			return fmt.Errorf("keyslot %d: area [%d,+%d] outside the keyslots area", id, ks.areaOffset, ks.areaSize)
		}
		for id2, ks2 := range md.keyslots {
			if id2 != id && ks.areaOffset >= ks2.areaOffset && ks.areaOffset < ks2.areaOffset+ks2.areaSize {
				return fmt.Errorf("keyslots %d and %d: overlapping areas", id, id2)
			}
		}
	}

	// Tokens reference keyslots.
	for id, raw := range md.tokens {
		if err := validateToken(raw, md.keyslots); err != nil {
			return fmt.Errorf("token %d: %w", id, err)
		}
	}

	// Segments.
	md.segments = make(map[int]*segment, len(rawSegments))
	for id, raw := range rawSegments {
		s := new(segment)
		if err := strictUnmarshal(raw, s); err != nil {
			return fmt.Errorf("segment %d: %w", id, err)
		}
		if err := s.validate(); err != nil {
			return fmt.Errorf("segment %d: %w", id, err)
		}
		md.segments[id] = s
	}
	if len(md.segments) == 0 {
		return errors.New("no segments")
	}

	// Digests reference keyslots and segments.
	md.digests = make(map[int]*digest, len(rawDigests))
	for id, raw := range rawDigests {
		d := new(digest)
		if err := strictUnmarshal(raw, d); err != nil {
			return fmt.Errorf("digest %d: %w", id, err)
		}
		if d.Type == "" || d.Keyslots == nil || d.Segments == nil {
			return fmt.Errorf("digest %d: missing type, keyslots or segments", id)
		}
		if err := refs(d.Keyslots, md.keyslots, "keyslot"); err != nil {
			return fmt.Errorf("digest %d: %w", id, err)
		}
		if err := refs(d.Segments, md.segments, "segment"); err != nil {
			return fmt.Errorf("digest %d: %w", id, err)
		}
		md.digests[id] = d
	}
	for id, s := range md.segments {
		if s.Type == "crypt" && len(md.segmentDigests(id)) == 0 {
			return fmt.Errorf("crypt segment %d has no digest", id)
		}
	}

	// The keyslots area lies between the metadata copies and the data.
	minOff := uint64(0)
	for _, s := range md.segments {
		if s.offset != 0 && (minOff == 0 || s.offset < minOff) {
			minOff = s.offset
		}
	}
	if minOff != 0 && (minOff < md.keyslotsSize || minOff-md.keyslotsSize < mdEnd) {
		return fmt.Errorf("keyslots_size %d does not fit before data offset %d", md.keyslotsSize, minOff)
	}

	// What follows is valid LUKS2 that this package does not handle.
	if len(md.requirements) > 0 {
		return fmt.Errorf("mandatory requirements %q: %w", md.requirements, ErrUnsupported)
	}
	if len(md.segments) != 1 {
		return fmt.Errorf("%d segments: %w", len(md.segments), ErrUnsupported)
	}
	s, ok := md.segments[0]
	if !ok {
		return errors.New("no segment 0")
	}
	switch {
	case s.Type != "crypt":
		return fmt.Errorf("segment type %q: %w", s.Type, ErrUnsupported)
	case s.size != 0:
		return fmt.Errorf("fixed segment size %d: %w", s.size, ErrUnsupported)
	case s.IVTweak != "0":
		return fmt.Errorf("segment iv_tweak %q: %w", s.IVTweak, ErrUnsupported)
	case s.Integrity != nil:
		return fmt.Errorf("segment integrity: %w", ErrUnsupported)
	case s.offset < areasEnd:
		return fmt.Errorf("data offset %d inside the metadata (detached header?): %w", s.offset, ErrUnsupported)
	}
	return nil
}

func (ks *keyslot) validate() error {
	if ks.Type == "" {
		return errors.New("missing type")
	}
	if ks.KeySize == nil || *ks.KeySize < 0 || *ks.KeySize > math.MaxUint32 {
		return errors.New("missing or bad key_size")
	}
	if ks.Priority != nil && (*ks.Priority < 0 || *ks.Priority > 2) {
		return fmt.Errorf("bad priority %d", *ks.Priority)
	}
	ks.Area = new(keyslotArea)
	if err := strictUnmarshal(ks.AreaRaw, ks.Area); err != nil {
		return fmt.Errorf("area: %w", err)
	}
	if ks.Area.Type == "" {
		return errors.New("area: missing type")
	}
	var err error
	if ks.areaOffset, err = parseNumber(ks.Area.Offset); err != nil {
		return fmt.Errorf("area offset: %w", err)
	}
	if ks.areaSize, err = parseNumber(ks.Area.Size); err != nil {
		return fmt.Errorf("area size: %w", err)
	}
	if ks.Type != "luks2" {
		return nil
	}
	// luks2_keyslot_validate: kdf, af and area shapes.
	if ks.Area.Type != "raw" || ks.Area.Encryption == "" || ks.Area.KeySize == nil {
		return errors.New("luks2 keyslot needs a raw area with encryption and key_size")
	}
	if *ks.Area.KeySize < 0 || *ks.Area.KeySize > math.MaxUint32 {
		return errors.New("bad area key_size")
	}
	var af keyslotAF
	if err := strictUnmarshal(ks.AF, &af); err != nil {
		return fmt.Errorf("af: %w", err)
	}
	if af.Type != "luks1" || af.Hash == "" || af.Stripes == nil {
		return errors.New("af must be luks1 with hash and stripes")
	}
	kdfFields, err := object(ks.KDF)
	if err != nil {
		return fmt.Errorf("kdf: %w", err)
	}
	var kdf keyslotKDF
	if err := strictUnmarshal(ks.KDF, &kdf); err != nil {
		return fmt.Errorf("kdf: %w", err)
	}
	switch kdf.Type {
	case "":
		return errors.New("kdf: missing type")
	case "pbkdf2":
		if len(kdfFields) != 4 || kdf.Hash == "" || kdf.Iterations == nil || kdf.Salt == "" {
			return errors.New("pbkdf2 kdf needs exactly type, hash, iterations and salt")
		}
	case "argon2i", "argon2id":
		if len(kdfFields) != 5 || kdf.Time == nil || kdf.Memory == nil || kdf.CPUs == nil || kdf.Salt == "" {
			return errors.New("argon2 kdf needs exactly type, time, memory, cpus and salt")
		}
	}
	return nil
}

func (s *segment) validate() error {
	if s.Type == "" || s.Offset == "" || s.Size == "" {
		return errors.New("missing type, offset or size")
	}
	var err error
	if s.offset, err = parseNumber(s.Offset); err != nil {
		return fmt.Errorf("offset: %w", err)
	}
	if s.Size != "dynamic" {
		if s.size, err = parseNumber(s.Size); err != nil || s.size == 0 {
			return fmt.Errorf("bad size %q", s.Size)
		}
	}
	if s.offset%512 != 0 || s.size%512 != 0 {
		return errors.New("offset and size must be multiples of 512")
	}
	if err := stringArray(s.Flags); err != nil {
		return fmt.Errorf("flags: %w", err)
	}
	if s.Type != "crypt" {
		return nil
	}
	if s.IVTweak == "" || s.Encryption == "" || s.SectorSize == nil {
		return errors.New("crypt segment needs iv_tweak, encryption and sector_size")
	}
	if _, err := parseNumber(s.IVTweak); err != nil {
		return fmt.Errorf("iv_tweak: %w", err)
	}
	ss := *s.SectorSize
	if ss <= 0 || ss > math.MaxUint32 || ss%512 != 0 {
		return fmt.Errorf("bad sector_size %d", ss)
	}
	if s.size%uint64(ss) != 0 {
		return errors.New("size is not a multiple of sector_size")
	}
	if s.Integrity != nil {
		if _, err := object(s.Integrity); err != nil {
			return fmt.Errorf("integrity: %w", err)
		}
	}
	return nil
}

// validateToken checks a token object: a non-empty "type" string and a
// "keyslots" array of strings naming existing keyslots.
func validateToken(raw json.RawMessage, keyslots map[int]*keyslot) error {
	var tok struct {
		Type     *string         `json:"type"`
		Keyslots json.RawMessage `json:"keyslots"`
	}
	if err := strictUnmarshal(raw, &tok); err != nil {
		return err
	}
	if tok.Type == nil || *tok.Type == "" {
		return errors.New("missing type")
	}
	if tok.Keyslots == nil {
		return errors.New("missing keyslots")
	}
	if err := stringArray(tok.Keyslots); err != nil {
		return fmt.Errorf("keyslots: %w", err)
	}
	var ids []string
	if err := json.Unmarshal(tok.Keyslots, &ids); err != nil {
		return fmt.Errorf("keyslots: %w", err)
	}
	return refs(ids, keyslots, "keyslot")
}

// segmentDigests returns the IDs of the digests bound to segment seg, in
// increasing order.
func (md *metadata) segmentDigests(seg int) []int {
	want := strconv.Itoa(seg)
	var ids []int
	for id, d := range md.digests {
		if slices.Contains(d.Segments, want) {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids
}

// encode renders the metadata as compact JSON text, with the current tokens.
func (md *metadata) encode() ([]byte, error) {
	toks := make(map[string]json.RawMessage, len(md.tokens))
	for id, t := range md.tokens {
		toks[strconv.Itoa(id)] = t
	}
	tb, err := marshal(toks)
	if err != nil {
		return nil, err
	}
	top := make(map[string]json.RawMessage, len(md.raw))
	for k, v := range md.raw {
		top[k] = v
	}
	top["tokens"] = tb
	return marshal(top)
}

// marshal is json.Marshal without HTML escaping, so that raw members keep
// their spelling.
func marshal(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n")), nil
}
