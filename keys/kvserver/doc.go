// Package kvserver is a local, Azure Key Vault-compatible HTTPS server for
// RSA keys, so cryptnbd's Key Vault support can be exercised with the real
// azkeys (v1.5.0) and azidentity (v1.15.0) clients and no cloud account.
// The CLI runs it as "cryptnbd keyvault serve"; tests start it in-process
// with the kvservertest package.
//
// # What it serves
//
// One TLS listener carries three things:
//
//   - The keys data plane of api-version 2025-07-01: create (RSA, RSA-HSM;
//     2048/3072/4096), get (a version, or the latest at /keys/{name}/),
//     list keys and versions (paged by nextLink), update (enabled, nbf, exp,
//     key_ops, tags), soft delete, get and list deleted, recover, purge,
//     rotate, rotation policy GET/PUT, and wrapkey/unwrapkey with
//     RSA-OAEP-256, RSA-OAEP and RSA1_5. Literal segments (create, versions,
//     rotate, rotationpolicy, backup, …) are matched before a version.
//     Byte fields are base64url without padding, times integer Unix seconds,
//     and a kid is https://{request host}/keys/{name}/{32 hex}.
//   - An App Service style managed-identity endpoint at /msi/token, which
//     azidentity's ManagedIdentityCredential calls when IDENTITY_ENDPOINT and
//     IDENTITY_HEADER are set: GET ?api-version=2019-08-01&resource=
//     https://vault.azure.net[&client_id=|object_id=|principal_id=] with the
//     X-IDENTITY-HEADER secret. It returns an HS256 JWT-shaped token bound to
//     the principal's object id (no identity parameter: the administrator).
//   - Admin endpoints under /admin/ (administrator only) to create
//     principals, set and delete access policies, and inject faults
//     (429 Throttled with Retry-After, 503 outage); see AdminClient.
//
// A request without a valid token gets 401 with Key Vault's challenge,
// WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/{tenant}",
// resource="https://vault.azure.net". Because the vault's host is not
// *.vault.azure.net, azkeys clients need DisableChallengeResourceVerification
// (AdminConfig.KeysClientOptions sets it).
//
// Errors are Key Vault's: {"error":{"code","message","innererror":{"code"}}}.
// 403 Forbidden/AccessDenied for a permission the caller's access policy
// lacks; 403 Forbidden/KeyDisabled on a disabled version;
// 403 Forbidden/KeyOperationForbidden for an operation outside key_ops;
// 403 Forbidden/KeyExpired or KeyNotYetValid on wrap (unwrap still works on
// such versions, as in Azure); 404 KeyNotFound for unknown, soft-deleted or
// bad versions; 409 Conflict/ObjectIsDeletedButRecoverable for create over a
// deleted name; 403 Forbidden for purge under purge protection;
// 400 BadParameter for bad input; 501 NotImplemented for the operations it
// lacks (backup, encrypt, decrypt, sign, verify, release, import).
//
// recoveryLevel follows the vault settings: with purge protection,
// Recoverable (90 days) or CustomizedRecoverable (7–89); without,
// Recoverable+Purgeable or CustomizedRecoverable+Purgeable. Soft-deleted
// keys are purged for good once their scheduledPurgeDate has passed.
//
// # Data directory
//
//	ca.pem          CA certificate clients trust (0644)
//	ca-key.pem      CA private key (0600)
//	server.pem      server certificate + CA; SANs 127.0.0.1, ::1, localhost
//	                and Options.ExtraHosts; reissued when a host is missing
//	server-key.pem  server private key (0600)
//	secrets.json    AES-256-GCM storage key, token signing key, identity
//	                header secret (0600)
//	state.json      tenant, principals, access policies, keys; each private
//	                key sealed with the storage key (0600)
//	admin.json      AdminConfig: vault URL, identity endpoint and header,
//	                administrator ids, CA path (0600), written on Listen
//
// Every file is replaced atomically (temp file, fsync, rename, fsync dir),
// and state.json after every change, so the vault survives restarts.
//
// # Credentials
//
// A local client loads admin.json with LoadAdminConfig. Credential returns
// azidentity's ManagedIdentityCredential for a principal (the production
// path; it needs SetIdentityEnv or equivalent environment variables, read by
// MSAL at every token request). DirectCredential speaks the same protocol
// without the environment, for parallel tests.
package kvserver
