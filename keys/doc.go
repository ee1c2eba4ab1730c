// Package keys holds the key providers that wrap and unwrap each disk's
// keyslot secret (envelope encryption): the platform provider, whose master
// key lives in the daemon's data directory, and Azure Key Vault for
// customer-managed keys. A provider never sees a disk's volume key, only the
// 32-byte keyslot secret that opens it.
package keys
