//! The worker's storage: content store (blobs by digest), metadata DB, snapshotters
//! (overlayfs and copy), layer diff/apply with safe extraction, and a consistency check.
//!
//! The solver holds one [`Store`]: it prepares snapshots to run steps in, commits them,
//! exports them as layers (compressed once per compression and remembered), unpacks pulled
//! layers (once per OCI chain id), and keeps cache records, image refs and leases. See
//! `docs/store.md` for the layout and the invariants.

mod apply;
mod content;
mod db;
mod diff;
mod error;
mod flatten;
mod fsck;
mod gc;
pub mod snapshot;
mod store;
mod sys;
mod tarfmt;
mod trash;

pub use apply::{unpack_archive, ApplyOptions, ApplyStats, DevicePolicy};
pub use content::{BlobInfo, BlobWriter, ContentStore};
pub use diff::DiffOptions;
pub use error::{Result, StoreError};
pub use fsck::{FsckProblem, FsckReport};
pub use gc::{PruneOptions, PruneReport};
pub use snapshot::{Mount, SnapshotUsage, Snapshotter, SnapshotterKind};
pub use store::{
    chain_id, ActiveSnapshot, CacheRecord, ChainUnpack, ExportOptions, LayerRecord, Lease,
    SnapshotId, SnapshotRecord, SnapshotState, Store, StoreOptions, Usage,
};
pub use tarfmt::{EntryKind, TarHeader};

/// Lists the entry headers of a layer blob (any compression), for tests and debugging.
pub fn list_layer(input: impl std::io::Read) -> Result<Vec<TarHeader>> {
    let bad = |reason: String| StoreError::BadArchive {
        layer: "(listing)".into(),
        reason,
    };
    let (_, r) = kiln_oci::compression::decompressing_reader(std::io::BufReader::new(input))
        .map_err(|e| bad(e.to_string()))?;
    tarfmt::list_headers(r).map_err(|e| bad(format!("{e:?}")))
}
