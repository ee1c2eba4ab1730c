// Package daemon is the state the cryptnbd daemon owns: the disks in its
// data directory, their key providers, the NBD catalog built from them, the
// audit log, and the HTTP/JSON management API the CLI talks to over
// DATA_DIR/api.sock. It is the one place that joins nbd, cryptodisk and keys.
package daemon
