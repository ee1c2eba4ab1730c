package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/cryptnbd/cryptnbd/cmd/cryptnbd/internal/daemon"
	"github.com/cryptnbd/cryptnbd/keys/kvserver"
)

func cmdKeyVault(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return usagef("keyvault: give a subcommand: serve, key, set-policy or delete-policy")
	}
	switch args[0] {
	case "serve":
		return keyvaultServe(ctx, args[1:])
	case "key":
		return keyvaultKey(ctx, args[1:])
	case "set-policy":
		return keyvaultPolicy(ctx, args[1:], true)
	case "delete-policy":
		return keyvaultPolicy(ctx, args[1:], false)
	}
	return usagef("keyvault: unknown subcommand %q", args[0])
}

func keyvaultServe(ctx context.Context, args []string) error {
	fs := newFlags("keyvault serve", "keyvault serve [--data-dir DIR] [--listen 127.0.0.1:8443] [--purge-protection=true] [--soft-delete-retention-days 90]")
	dir := fs.String("data-dir", "/var/lib/cryptnbd-keyvault", "vault state, CA (ca.pem) and admin credentials (admin.json)")
	listen := fs.String("listen", kvserver.DefaultListen, "HTTPS address")
	purge := fs.Bool("purge-protection", true, "refuse purging soft-deleted keys until their retention ends")
	days := fs.Int("soft-delete-retention-days", 90, "soft-delete retention, 7 to 90 days")
	hosts := &listFlag{}
	fs.Var(hosts, "host", "extra host name or IP for the server certificate (repeatable)")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	format := fs.String("log-format", "auto", "auto, text or json")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("keyvault serve takes no arguments")
	}
	if *days < 7 || *days > 90 {
		return usagef("--soft-delete-retention-days %d: must be 7 to 90", *days)
	}
	log, err := newLogger(*level, *format)
	if err != nil {
		return err
	}
	srv, err := kvserver.New(kvserver.Options{DataDir: *dir, Listen: *listen, PurgeProtection: *purge,
		SoftDeleteRetentionDays: *days, Logger: log, ExtraHosts: *hosts})
	if err != nil {
		return err
	}
	l, err := srv.Listen()
	if err != nil {
		return err
	}
	fmt.Printf("local Key Vault at %s (CA: %s/ca.pem, admin credentials: %s/admin.json)\n", srv.URL(), *dir, *dir)
	fmt.Printf("use it with --local-vault %s, e.g.\n  cryptnbd keyvault key create --local-vault %s --vault-url %s --name disk-key\n", *dir, *dir, srv.URL())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ctx, l) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	return srv.Shutdown(sctx)
}

// vaultClient builds the admin's azkeys client from the common flags.
func vaultClient(v *daemon.VaultConfig, vaultURL string) (*azkeys.Client, error) {
	if err := v.Init(); err != nil {
		return nil, err
	}
	if vaultURL == "" && v.Local() != nil {
		vaultURL = v.Local().VaultURL
	}
	if vaultURL == "" {
		return nil, usagef("--vault-url is required")
	}
	cred, err := v.AdminCredential()
	if err != nil {
		return nil, err
	}
	return v.KeysClient(vaultURL, cred)
}

func keyvaultKey(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return usagef("keyvault key: give an operation: create, show, list-versions, disable, enable, delete, recover, purge or rotate")
	}
	op := args[0]
	fs := newFlags("keyvault key "+op, "keyvault key "+op+" --vault-url URL --name K [--version V] [--kty RSA|RSA-HSM] [--size 2048|3072|4096]")
	v := vaultFlags(fs)
	vaultURL := fs.String("vault-url", "", "vault URL, e.g. https://myvault.vault.azure.net (default: the --local-vault's)")
	name := fs.String("name", "", "key name")
	version := fs.String("version", "", "key version (default: the latest)")
	kty := fs.String("kty", "RSA", "key type for create: RSA or RSA-HSM")
	size := fs.Int("size", 2048, "RSA key size for create: 2048, 3072 or 4096")
	out := outputFlag(fs)
	pos, err := parse(fs, args[1:])
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("keyvault key %s takes no arguments; use --name", op)
	}
	if *name == "" {
		return usagef("keyvault key %s: --name is required", op)
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	c, err := vaultClient(v, *vaultURL)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	var bundle any
	switch op {
	case "create":
		if *kty != "RSA" && *kty != "RSA-HSM" {
			return usagef("--kty %q: use RSA or RSA-HSM", *kty)
		}
		if *size != 2048 && *size != 3072 && *size != 4096 {
			return usagef("--size %d: use 2048, 3072 or 4096", *size)
		}
		r, err := c.CreateKey(cctx, *name, azkeys.CreateKeyParameters{
			Kty: to.Ptr(azkeys.KeyType(*kty)), KeySize: to.Ptr(int32(*size)),
			KeyOps: []*azkeys.KeyOperation{to.Ptr(azkeys.KeyOperationWrapKey), to.Ptr(azkeys.KeyOperationUnwrapKey),
				to.Ptr(azkeys.KeyOperationEncrypt), to.Ptr(azkeys.KeyOperationDecrypt)},
		}, nil)
		if err != nil {
			return vaultErr(err)
		}
		bundle = r.KeyBundle
	case "show":
		r, err := c.GetKey(cctx, *name, *version, nil)
		if err != nil {
			return vaultErr(err)
		}
		bundle = r.KeyBundle
	case "enable", "disable":
		r, err := c.UpdateKey(cctx, *name, *version, azkeys.UpdateKeyParameters{
			KeyAttributes: &azkeys.KeyAttributes{Enabled: to.Ptr(op == "enable")},
		}, nil)
		if err != nil {
			return vaultErr(err)
		}
		bundle = r.KeyBundle
	case "delete":
		r, err := c.DeleteKey(cctx, *name, nil)
		if err != nil {
			return vaultErr(err)
		}
		bundle = r.DeletedKey
	case "recover":
		r, err := c.RecoverDeletedKey(cctx, *name, nil)
		if err != nil {
			return vaultErr(err)
		}
		bundle = r.KeyBundle
	case "purge":
		if _, err := c.PurgeDeletedKey(cctx, *name, nil); err != nil {
			return vaultErr(err)
		}
		fmt.Printf("purged %s\n", *name)
		return nil
	case "rotate":
		r, err := c.RotateKey(cctx, *name, nil)
		if err != nil {
			return vaultErr(err)
		}
		bundle = r.KeyBundle
	case "list-versions":
		var items []*azkeys.KeyProperties
		pager := c.NewListKeyPropertiesVersionsPager(*name, nil)
		for pager.More() {
			page, err := pager.NextPage(cctx)
			if err != nil {
				return vaultErr(err)
			}
			items = append(items, page.Value...)
		}
		if *out == "json" {
			return printJSON(items)
		}
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "KID\tENABLED\tCREATED\tEXPIRES")
		for _, it := range items {
			a := it.Attributes
			fmt.Fprintf(tw, "%s\t%v\t%s\t%s\n", deref(it.KID), a != nil && a.Enabled != nil && *a.Enabled, fmtTime(a, true), fmtTime(a, false))
		}
		return tw.Flush()
	default:
		return usagef("keyvault key: unknown operation %q", op)
	}
	return printJSON(bundle)
}

func keyvaultPolicy(ctx context.Context, args []string, set bool) error {
	verb := "delete-policy"
	if set {
		verb = "set-policy"
	}
	fs := newFlags("keyvault "+verb, "keyvault "+verb+" --vault-url URL --object-id ID [--key-permissions get wrapKey unwrapKey]")
	v := vaultFlags(fs)
	vaultURL := fs.String("vault-url", "", "vault URL (default: the --local-vault's)")
	objectID := fs.String("object-id", "", "principal (object) id, e.g. a disk encryption set's identity.principalId")
	perms := &listFlag{}
	fs.Var(perms, "key-permissions", "key permissions to grant: get, list, create, update, delete, recover, purge, wrapKey, unwrapKey (space- or comma-separated)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if *objectID == "" {
		return usagef("keyvault %s: --object-id is required", verb)
	}
	// az accepts "--key-permissions get wrapKey unwrapKey"; the values after
	// the first arrive as positional arguments.
	if set {
		*perms = append(*perms, pos...)
		if len(*perms) == 0 {
			return usagef("keyvault set-policy: --key-permissions is required")
		}
	} else if len(pos) > 0 {
		return usagef("keyvault delete-policy takes no arguments")
	}
	if err := v.Init(); err != nil {
		return err
	}
	if v.Local() == nil {
		return errors.New("on Azure, access policies belong to the management plane: use az keyvault set-policy (or an RBAC role assignment); this command manages a local vault given with --local-vault")
	}
	if *vaultURL == "" {
		*vaultURL = v.Local().VaultURL
	}
	cred, err := v.AdminCredential()
	if err != nil {
		return err
	}
	co := v.ClientOptions()
	if set {
		err = kvserver.SetPolicy(ctx, *vaultURL, cred, *objectID, *perms, &co)
	} else {
		err = kvserver.DeletePolicy(ctx, *vaultURL, cred, *objectID, &co)
	}
	if err != nil {
		return err
	}
	if set {
		fmt.Printf("granted %s key permissions: %s\n", *objectID, strings.Join(*perms, " "))
	} else {
		fmt.Printf("removed the access policy of %s\n", *objectID)
	}
	return nil
}

// vaultErr keeps the service's code in the message the user sees.
func vaultErr(err error) error {
	var re *azcore.ResponseError
	if errors.As(err, &re) {
		return fmt.Errorf("key vault answered %d %s", re.StatusCode, re.ErrorCode)
	}
	return err
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func deref(s *azkeys.ID) string {
	if s == nil {
		return ""
	}
	return string(*s)
}

func fmtTime(a *azkeys.KeyAttributes, created bool) string {
	if a == nil {
		return ""
	}
	t := a.Expires
	if created {
		t = a.Created
	}
	if t == nil {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}
