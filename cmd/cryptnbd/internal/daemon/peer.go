package daemon

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/user"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// peerKey carries the credentials of the process at the other end of an
// API connection, taken once with SO_PEERCRED when it connects.
type peerKey struct{}

type peerCred struct {
	ok       bool
	pid      int32
	uid, gid uint32
}

// connContext records the peer's credentials for Unix-socket connections.
func connContext(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ctx
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return ctx
	}
	var cred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) { cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil || serr != nil {
		return ctx
	}
	return context.WithValue(ctx, peerKey{}, peerCred{ok: true, pid: cred.Pid, uid: cred.Uid, gid: cred.Gid})
}

// PeerPolicy decides who may use the management API over the Unix socket:
// the daemon's own user, root, and members of an admin group.
type PeerPolicy struct {
	UID uint32
	// AdminGID is the admin group's id; -1 for none.
	AdminGID int64
}

// NewPeerPolicy resolves --admin-group (a name or a number; empty for none).
func NewPeerPolicy(adminGroup string) (PeerPolicy, error) {
	p := PeerPolicy{UID: uint32(os.Getuid()), AdminGID: -1}
	if adminGroup == "" {
		return p, nil
	}
	g, err := user.LookupGroup(adminGroup)
	if err != nil {
		if g, err = user.LookupGroupId(adminGroup); err != nil {
			return p, fmt.Errorf("--admin-group %q: no such group", adminGroup)
		}
	}
	gid, err := strconv.ParseInt(g.Gid, 10, 64)
	if err != nil {
		return p, fmt.Errorf("--admin-group %q: %w", adminGroup, err)
	}
	p.AdminGID = gid
	return p, nil
}

func (p PeerPolicy) allowed(c peerCred) bool {
	if c.uid == p.UID || c.uid == 0 {
		return true
	}
	if p.AdminGID < 0 {
		return false
	}
	if int64(c.gid) == p.AdminGID {
		return true
	}
	// SO_PEERCRED has only the primary group; supplementary groups are in
	// the peer's /proc status, read while its connection is open.
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", c.pid))
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		groups, ok := strings.CutPrefix(sc.Text(), "Groups:")
		if !ok {
			continue
		}
		for _, g := range strings.Fields(groups) {
			if n, err := strconv.ParseInt(g, 10, 64); err == nil && n == p.AdminGID {
				return true
			}
		}
	}
	return false
}

// requirePeer refuses API requests from Unix-socket peers the policy does
// not allow, with 403. Requests with no peer credentials (the in-process
// client, or TLS with a verified client certificate) pass.
func requirePeer(p PeerPolicy, audit *Audit, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, _ := r.Context().Value(peerKey{}).(peerCred)
		if c.ok && !p.allowed(c) {
			if audit != nil {
				audit.Record(AuditEvent{Event: "api-refused", Result: "denied",
					Detail: fmt.Sprintf("uid=%d gid=%d pid=%d %s %s", c.uid, c.gid, c.pid, r.Method, r.URL.Path)})
			}
			writeJSON(w, http.StatusForbidden, apiError{Error: fmt.Sprintf("uid %d may not manage this daemon: run as its user (uid %d), root, or a member of its --admin-group", c.uid, p.UID)})
			return
		}
		next.ServeHTTP(w, r)
	})
}
