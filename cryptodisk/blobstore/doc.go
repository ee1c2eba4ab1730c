// Package blobstore keeps a cryptodisk image in an Azure page blob, so that
// any daemon in a fleet can serve any disk, and at most one at a time does.
//
// # Layout
//
// One disk is one page blob. Its size is the image size rounded up to
// 512 bytes; the LUKS2 header sits in its first pages like any other bytes,
// and the blob holds ciphertext only. Disk metadata the catalog needs
// without the key (name, encryption type, disk encryption set, sector size)
// goes in blob metadata: Store.Metadata, Store.SetMetadata, and List for a
// whole container. Small JSON block blobs (PutJSON, GetJSON, ListJSON) hold
// shared definitions such as disk encryption sets.
//
// # Mapping onto the page blob API
//
//	ReadAt     Get Blob with a range, split into concurrent 4 MiB requests
//	WriteAt    Put Page (Upload Pages), at most 4 MiB a request, concurrent;
//	           partial pages at the edges are read, merged and written
//	           whole, under a lock striped by page
//	Punch      Clear Page for the whole pages, zeros written into partial ones
//	Allocated  Get Page Ranges: cleared and never-written pages are holes
//	Grow       Set Blob Properties (resize)
//	Sync       waits for writes in flight; see below
//	Close      waits for writes in flight and releases the lease
//
// Concurrent calls become concurrent HTTP requests, at most
// Options.MaxConcurrency at a time per Store.
//
// Cleared pages read as zeros and are reported unallocated, as punched holes
// in filestore are, so cryptodisk's rule that an all-zero ciphertext sector
// is an unwritten one holds: TRIM and WRITE_ZEROES become Clear Page, which
// on standard accounts also stops Azure billing those pages.
//
// # Durability: what FLUSH means here
//
// Azure acknowledges Put Page and Clear Page only once the data is durably
// stored (replicated as the account's redundancy says). There is no write
// cache to flush, so every WriteAt and Punch that returned nil is already
// durable, and Sync only waits for writes still in flight (the read side
// of an RWMutex that every write holds) before returning. An NBD FLUSH or
// FUA therefore costs no request at all.
//
// # Exclusive attach: blob leases
//
// Create and Open acquire a lease on the blob (15 to 60 s, default 30) and
// record the holder's identity (Options.Holder: daemon ID or host) in the
// blob's metadata, so that a second daemon whose Open fails gets a
// *LeasedError (matching ErrLeased) naming who serves the disk, and List
// shows every disk's holder. A goroutine renews the lease every third of its
// duration until Close, which releases it so another daemon can take the
// disk at once.
//
// Every mutating request (Put Page, Clear Page, resize, metadata, snapshot)
// carries the lease ID, so the service itself refuses writes from a daemon
// that no longer holds the lease, whatever that daemon's clock or network
// believes. When the Store learns its lease is gone (a write or a renewal
// refused for a lease reason, or no successful renewal for a whole lease
// duration) it fails every later write, clear, resize and Sync with an error
// wrapping ErrLeaseLost and syscall.EIO, and calls Options.OnLeaseLost once
// so the daemon can suspend the disk. Reads go on working.
//
// A daemon that must take a disk over sets Options.BreakLease (break the
// holder's lease now; the holder's next write fails) or
// Options.WaitForExpiry (wait for a holder that stopped renewing, such as a
// crashed daemon, to lose its lease, at most one lease duration).
//
// # Snapshots
//
// Store.Snapshot makes a blob snapshot holding every acknowledged write and
// no partial one (it holds new writes while the snapshot is taken);
// OpenSnapshot opens one read-only, without a lease.
//
// # Credentials
//
// NewServiceClient takes any azcore.TokenCredential (an azidentity chain:
// managed identity, workload identity, Azure CLI);
// NewServiceClientFromConnectionString takes an account key or SAS
// connection string, as Azurite uses.
package blobstore
