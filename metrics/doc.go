// Package metrics is cryptnbd's Prometheus instrumentation: a private
// registry with the Go and process collectors, a Backend wrapper that
// counts each disk's I/O, scrape-time collectors for disk and key state,
// and hooks for the key layer (Key Vault calls, watcher events, DEK
// unwraps). It imports none of the project's other packages: the daemon
// adapts its types to the small ones declared here.
//
// Every label is bounded: disk names, vault hosts and key names are the
// operator's configuration, operations and results are fixed sets, and
// free-form reasons are folded into a fixed set. Nothing is labelled by
// request, offset or key version.
//
// A Metrics is safe for concurrent use. It keeps no global state: two
// Metrics (as in tests) share nothing.
package metrics
