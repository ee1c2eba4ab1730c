package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cryptnbd/cryptnbd/nbd/tlsfiles"
)

// cmdTLS makes certificates for NBD over TLS:
//
//	cryptnbd tls init --out DIR [--host H ...] [--client-name NAME] [--days N]
//	cryptnbd tls client --ca-dir DIR --out DIR2 --client-name NAME [--days N]
func cmdTLS(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return usagef("tls: give a subcommand: init or client")
	}
	switch args[0] {
	case "init":
		return tlsInit(args[1:])
	case "client":
		return tlsClient(args[1:])
	}
	return usagef("tls: unknown subcommand %q", args[0])
}

func tlsInit(args []string) error {
	fs := newFlags("tls init", "tls init --out DIR [--host H ...] [--client-name NAME] [--days N]")
	out := fs.String("out", "", "directory to create the certificates in (created 0700; existing files are not overwritten)")
	var hosts listFlag
	fs.Var(&hosts, "host", "DNS name or IP address clients use for the server (repeatable; default localhost, 127.0.0.1, ::1)")
	client := fs.String("client-name", tlsfiles.DefaultClientName, "common name of the client certificate, the identity --allow rules match")
	days := fs.Int("days", 365, "validity of the certificates in days")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usagef("tls init: unexpected argument %q", pos[0])
	}
	if *out == "" {
		return usagef("tls init: --out DIR is required")
	}
	if *days <= 0 {
		return usagef("tls init: --days must be positive")
	}
	if err := tlsfiles.Init(*out, tlsfiles.Options{Hosts: hosts, ClientName: *client, Validity: time.Duration(*days) * 24 * time.Hour}); err != nil {
		return err
	}
	dir, _ := filepath.Abs(*out)
	h := strings.Join(hosts, ", ")
	if h == "" {
		h = strings.Join(tlsfiles.DefaultHosts, ", ")
	}
	fmt.Printf(`Wrote a CA, a server certificate for %s and a client certificate for %q to %s.
Server: cryptnbd serve --tls require --tls-cert %[3]s/%[4]s --tls-key %[3]s/%[5]s --tls-ca %[3]s/%[6]s --tls-verify-peer
Clients use the directory as is (they need only %[6]s, %[7]s and %[8]s; keep %[9]s off them):
  nbdinfo 'nbds://HOST/DISK?tls-certificates=%[3]s'
  qemu-img info --object tls-creds-x509,id=tls0,dir=%[3]s,endpoint=client --image-opts driver=nbd,server.type=inet,server.host=HOST,server.port=10809,export=DISK,tls-creds=tls0
More clients: cryptnbd tls client --ca-dir %[3]s --out DIR2 --client-name NAME
`, h, *client, dir, tlsfiles.ServerCertFile, tlsfiles.ServerKeyFile, tlsfiles.CACertFile, tlsfiles.ClientCertFile, tlsfiles.ClientKeyFile, tlsfiles.CAKeyFile)
	return nil
}

func tlsClient(args []string) error {
	fs := newFlags("tls client", "tls client --ca-dir DIR --out DIR2 --client-name NAME [--days N]")
	caDir := fs.String("ca-dir", "", "directory made by tls init, holding ca-cert.pem and ca-key.pem")
	out := fs.String("out", "", "directory for the client's ca-cert.pem, client-cert.pem and client-key.pem")
	client := fs.String("client-name", "", "common name of the client certificate, the identity --allow rules match")
	days := fs.Int("days", 365, "validity of the certificate in days")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usagef("tls client: unexpected argument %q", pos[0])
	}
	if *caDir == "" || *out == "" || *client == "" {
		return usagef("tls client: --ca-dir, --out and --client-name are required")
	}
	if *days <= 0 {
		return usagef("tls client: --days must be positive")
	}
	if _, err := os.Stat(filepath.Join(*out, tlsfiles.ClientKeyFile)); err == nil {
		return fmt.Errorf("tls client: %s already exists", filepath.Join(*out, tlsfiles.ClientKeyFile))
	}
	if err := tlsfiles.IssueClient(*caDir, *out, *client, time.Duration(*days)*24*time.Hour); err != nil {
		return err
	}
	fmt.Printf("Wrote a client certificate for %q to %s.\n", *client, *out)
	return nil
}
