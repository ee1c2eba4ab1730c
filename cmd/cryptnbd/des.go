package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/cryptnbd/cryptnbd/cmd/cryptnbd/internal/daemon"
)

func cmdDES(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return usagef("des: give a subcommand: create, list, show, delete, update or rotate")
	}
	sub := args[0]
	synopsis := map[string]string{
		"create": "des create NAME --key-url URL [--encryption-type EncryptionAtRestWithCustomerKey] [--auto-key-rotation] [--identity-client-id ID --identity-principal-id ID]",
		"list":   "des list [-o table|json]",
		"show":   "des show NAME [-o table|json]",
		"delete": "des delete NAME",
		"update": "des update NAME --key-url URL",
		"rotate": "des rotate NAME",
	}[sub]
	if synopsis == "" {
		return usagef("des: unknown subcommand %q", sub)
	}
	fs := newFlags("des "+sub, synopsis)
	dataDir := dataDirFlag(fs)
	vault := vaultFlags(fs)
	out := outputFlag(fs)
	var keyURL, encType, clientID, principalID *string
	var auto *bool
	if sub == "create" || sub == "update" {
		keyURL = fs.String("key-url", "", "the key's URL: https://VAULT/keys/NAME[/VERSION] (az keyvault key show --query key.kid)")
	}
	if sub == "create" {
		encType = fs.String("encryption-type", daemon.EncryptionCustomerKey, "encryption type of the set's disks")
		auto = fs.Bool("auto-key-rotation", false, "re-wrap disks under each new enabled key version automatically (rotationToLatestKeyVersionEnabled)")
		clientID = fs.String("identity-client-id", "", "client id of the user-assigned managed identity the set acts as (made for you on a local vault)")
		principalID = fs.String("identity-principal-id", "", "its principal (object) id, which the vault's access policy names")
	}
	pos, err := parse(fs, args[1:])
	if err != nil {
		return err
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	var name string
	if sub == "list" {
		if len(pos) > 0 {
			return usagef("des list takes no arguments")
		}
	} else if name, err = oneName("des "+sub, pos); err != nil {
		return err
	}
	if keyURL != nil && *keyURL == "" {
		return usagef("des %s: --key-url is required", sub)
	}
	c, done, err := connect(ctx, *dataDir, vault)
	if err != nil {
		return err
	}
	defer done()
	var info daemon.DESInfo
	switch sub {
	case "create":
		info, err = c.CreateDES(ctx, daemon.DESRequest{Name: name, KeyURL: *keyURL, EncryptionType: *encType,
			AutoKeyRotation: *auto, IdentityClientID: *clientID, IdentityPrincipalID: *principalID})
		if err == nil && *out == "table" {
			defer fmt.Fprintf(os.Stderr, "\nNext, grant the set's identity access to the key, then create disks:\n"+
				"  cryptnbd keyvault set-policy --vault-url VAULT --object-id %s --key-permissions get wrapKey unwrapKey\n"+
				"  (on Azure: az keyvault set-policy -n VAULT --object-id %s --key-permissions wrapkey unwrapkey get)\n"+
				"  cryptnbd disk create DISK --size 30G --encryption-type %s --des %s\n",
				info.Identity.PrincipalID, info.Identity.PrincipalID, daemon.EncryptionCustomerKey, name)
		}
	case "list":
		sets, err := c.ListDES(ctx)
		if err != nil {
			return err
		}
		if *out == "json" {
			return printJSON(sets)
		}
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tKEY\tAUTO-ROTATION\tPRINCIPAL\tDISKS")
		for _, s := range sets {
			fmt.Fprintf(tw, "%s\t%s\t%v\t%s\t%d\n", s.Name, s.KeyURL, s.RotationToLatestKeyVersionEnabled, s.Identity.PrincipalID, len(s.Disks))
		}
		return tw.Flush()
	case "show":
		info, err = c.ShowDES(ctx, name)
	case "delete":
		if err := c.DeleteDES(ctx, name); err != nil {
			return err
		}
		fmt.Printf("deleted disk encryption set %s\n", name)
		return nil
	case "update":
		info, err = c.UpdateDES(ctx, name, *keyURL)
	case "rotate":
		info, err = c.RotateDES(ctx, name)
	}
	if err != nil {
		return err
	}
	if *out == "json" {
		return printJSON(info)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	row := func(k, v string) { fmt.Fprintf(tw, "%s:\t%s\n", k, v) }
	row("name", info.Name)
	row("encryptionType", info.EncryptionType)
	row("keyUrl", info.KeyURL)
	row("activeKeyId", info.ActiveKeyID)
	row("rotationToLatestKeyVersionEnabled", fmt.Sprint(info.RotationToLatestKeyVersionEnabled))
	row("identity.principalId", info.Identity.PrincipalID)
	row("identity.clientId", info.Identity.ClientID)
	if a := info.AccessStatus; a != nil {
		row("accessStatus", fmt.Sprintf("get=%v wrapKey=%v unwrapKey=%v", a.Get, a.WrapKey, a.UnwrapKey))
	}
	if info.KeyState != "" {
		row("keyState", info.KeyState)
	}
	row("disks", strings.Join(info.Disks, ", "))
	return tw.Flush()
}
