package main

import (
	"flag"
	"strings"

	"github.com/cryptnbd/cryptnbd/cmd/cryptnbd/internal/daemon"
)

// listFlag is a repeatable, comma-separable string flag.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}

// vaultFlags registers how to reach Key Vault, shared by serve, des and keyvault.
func vaultFlags(fs *flag.FlagSet) *daemon.VaultConfig {
	v := &daemon.VaultConfig{}
	fs.StringVar(&v.LocalVaultDir, "local-vault", "", "data directory of a local `cryptnbd keyvault serve` to use as the vault (trusts its CA and identity endpoint)")
	fs.StringVar(&v.CAFile, "keyvault-ca", "", "extra PEM CA bundle to trust for Key Vault (private endpoints)")
	fs.Var((*listFlag)(&v.AllowHosts), "keyvault-allow-host", "non-Azure vault host:port for which the bearer challenge's resource check is relaxed (repeatable)")
	return v
}
