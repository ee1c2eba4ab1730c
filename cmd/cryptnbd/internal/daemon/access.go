package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cryptnbd/cryptnbd/nbd"
)

// Access is who may open a disk over NBD. A subject is a network (CIDR or
// a single address) or a client-certificate identity, matched against the
// certificate's common name and its DNS and URI subject alternative names.
//
// With no rules, a client with a verified certificate may open the disk,
// and so may a plain client from loopback or the Unix socket; nobody else.
// A CIDR rule replaces the loopback default for plain clients.
type Access struct {
	Allow         []string `json:"allow,omitempty"`
	AllowReadOnly []string `json:"allowReadOnly,omitempty"`
}

const accessExt = ".access.json"

// ValidateSubjects checks that every subject is a network or a plausible
// identity, so a typo in an address is caught rather than read as a name.
func ValidateSubjects(subjects []string) error {
	for _, s := range subjects {
		if _, ok := parseNet(s); ok {
			continue
		}
		if s == "" || strings.ContainsAny(s, " \t\n,") {
			return fmt.Errorf("%w: access subject %q: give a CIDR like 10.0.0.0/8 or a certificate identity (CN, DNS or URI name)", ErrInvalid, s)
		}
		if strings.Count(s, ".") == 3 && strings.Trim(s, "0123456789./") == "" {
			return fmt.Errorf("%w: access subject %q is neither a valid address nor a network", ErrInvalid, s)
		}
	}
	return nil
}

func parseNet(s string) (netip.Prefix, bool) {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked(), true
	}
	if a, err := netip.ParseAddr(s); err == nil {
		return netip.PrefixFrom(a, a.BitLen()), true
	}
	return netip.Prefix{}, false
}

// decide says whether peer may open a disk with rules a, and whether only
// read-only.
func (a Access) decide(p nbd.Peer) (allowed, readOnly bool) {
	ids := identities(p)
	addr, local := peerAddr(p)
	match := func(rules []string) (hit, anyNet bool) {
		for _, r := range rules {
			if pfx, ok := parseNet(r); ok {
				anyNet = true
				if addr.IsValid() && pfx.Contains(addr.Unmap()) {
					hit = true
				}
				continue
			}
			if slices.Contains(ids, r) {
				hit = true
			}
		}
		return hit, anyNet
	}
	rw, rwNet := match(a.Allow)
	if rw {
		return true, false
	}
	ro, roNet := match(a.AllowReadOnly)
	if ro {
		return true, true
	}
	if len(a.Allow) == 0 && len(a.AllowReadOnly) == 0 {
		return p.Certificate != nil || local, false
	}
	// Identity-only rules still leave loopback to the local administrator;
	// a network rule takes that default away.
	if !rwNet && !roNet && local && p.Certificate == nil {
		return true, false
	}
	return false, false
}

func identities(p nbd.Peer) []string {
	c := p.Certificate
	if c == nil {
		return nil
	}
	ids := []string{}
	if c.Subject.CommonName != "" {
		ids = append(ids, c.Subject.CommonName)
	}
	ids = append(ids, c.DNSNames...)
	for _, u := range c.URIs {
		ids = append(ids, u.String())
	}
	return ids
}

// peerAddr is the peer's IP, and whether it is local: loopback, or the
// Unix socket (whose reach the file mode already limits).
func peerAddr(p nbd.Peer) (netip.Addr, bool) {
	switch a := p.Addr.(type) {
	case *net.TCPAddr:
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			return netip.Addr{}, false
		}
		ip = ip.Unmap()
		return ip, ip.IsLoopback()
	case *net.UnixAddr:
		return netip.Addr{}, true
	case nil:
		return netip.Addr{}, true // in-process callers
	}
	return netip.Addr{}, false
}

func (m *Manager) accessPath(name string) string {
	return filepath.Join(m.cfg.DataDir, diskDir, name+accessExt)
}

func (m *Manager) loadAccess(name string) (Access, error) {
	raw, err := os.ReadFile(m.accessPath(name))
	if errors.Is(err, os.ErrNotExist) {
		return Access{}, nil
	}
	if err != nil {
		return Access{}, err
	}
	var a Access
	if err := json.Unmarshal(raw, &a); err != nil {
		return Access{}, fmt.Errorf("access rules of %s: %w", name, err)
	}
	return a, nil
}

// SetAccess replaces a disk's access rules. Connections already open keep
// what they were granted; new ones get the new rules.
func (m *Manager) SetAccess(name string, a Access) (DiskInfo, error) {
	if err := ValidateSubjects(a.Allow); err != nil {
		return DiskInfo{}, err
	}
	if err := ValidateSubjects(a.AllowReadOnly); err != nil {
		return DiskInfo{}, err
	}
	m.mu.Lock()
	e, ok := m.disks[name]
	if !ok {
		m.mu.Unlock()
		return DiskInfo{}, fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	var err error
	if len(a.Allow) == 0 && len(a.AllowReadOnly) == 0 {
		err = os.Remove(m.accessPath(name))
		if errors.Is(err, os.ErrNotExist) {
			err = nil
		}
	} else {
		raw, _ := json.MarshalIndent(a, "", "  ")
		err = writeFileAtomic(m.accessPath(name), raw)
	}
	if err == nil {
		e.access = a
	}
	m.mu.Unlock()
	if err != nil {
		return DiskInfo{}, fmt.Errorf("daemon: access rules of %s: %w", name, err)
	}
	m.cfg.Audit.Record(AuditEvent{Event: "access-update", Disk: name,
		Detail: fmt.Sprintf("allow=%s allowReadOnly=%s", strings.Join(a.Allow, ","), strings.Join(a.AllowReadOnly, ","))})
	return m.Show(name)
}

// admit applies a disk's rules to the connection in ctx. A refusal looks
// exactly like a missing export, and is audited.
func (m *Manager) admitLocked(ctx context.Context, disk, export string, e *entry) (readOnly bool, err error) {
	p, ok := nbd.PeerFromContext(ctx)
	if !ok {
		return false, nil
	}
	allowed, ro := e.access.decide(p)
	if !allowed {
		who := "unknown"
		if p.Addr != nil {
			who = p.Addr.String()
		}
		if ids := identities(p); len(ids) > 0 {
			who += " " + strings.Join(ids, ",")
		}
		m.cfg.Audit.Record(AuditEvent{Event: "access-refused", Disk: disk, Result: "denied",
			Detail: fmt.Sprintf("export=%s peer=%s tls=%t", export, who, p.TLS)})
		return false, fmt.Errorf("%w: %q", nbd.ErrUnknownExport, export)
	}
	return ro, nil
}
