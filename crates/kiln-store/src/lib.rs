//! The worker's storage: content store (blobs by digest), metadata DB, snapshotters
//! (overlayfs and copy), layer diff/apply with safe extraction, and GC.
