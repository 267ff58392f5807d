//! The error type of every store operation.

use std::io;
use std::path::PathBuf;

use kiln_oci::Digest;

/// What went wrong in the store, with the path, digest or snapshot it went wrong on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What kiln was doing, e.g. "writing blob".
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A blob's content does not match the digest or size it was committed under.
    #[error("blob content mismatch: expected {expected} ({expected_size} bytes), got {actual} ({actual_size} bytes); the download or source is corrupt, retry it")]
    DigestMismatch {
        /// The digest the caller promised.
        expected: Digest,
        /// The size the caller promised.
        expected_size: u64,
        /// What the bytes hash to.
        actual: Digest,
        /// How many bytes there were.
        actual_size: u64,
    },
    /// A layer blob's content is not the layer its diff id names.
    #[error("layer blob {blob} unpacks to diff id {actual}, but diff id {claimed} was given for it; the cache or image that named it is corrupt (the layer is not used)")]
    DiffIdMismatch {
        /// The compressed blob.
        blob: Digest,
        /// The diff id an image config or cache record gave.
        claimed: Digest,
        /// What the blob's uncompressed bytes hash to.
        actual: Digest,
    },
    /// No blob with this digest is in the content store.
    #[error("blob {0} is not in the content store")]
    BlobNotFound(Digest),
    /// The metadata DB failed.
    #[error("metadata DB {path}: {message}")]
    Db {
        /// The DB file.
        path: PathBuf,
        /// redb's message.
        message: String,
    },
    /// A record in the DB could not be decoded (written by an incompatible kiln?).
    #[error(
        "metadata DB record {table}/{key} is unreadable: {message}; run `kiln debug fsck --repair`"
    )]
    BadRecord {
        /// The table.
        table: &'static str,
        /// The key, printed.
        key: String,
        /// The decoder's message.
        message: String,
    },
    /// No snapshot with this id.
    #[error("snapshot {0} does not exist")]
    SnapshotNotFound(u64),
    /// The snapshot is in the wrong state for the operation (e.g. committing a committed one).
    #[error("snapshot {id}: {message}")]
    SnapshotState {
        /// The snapshot.
        id: u64,
        /// What is wrong.
        message: String,
    },
    /// Mounting or unmounting failed.
    #[error("mount {target}: {message}")]
    Mount {
        /// The mount point.
        target: PathBuf,
        /// The kernel's answer and the options tried.
        message: String,
    },
    /// A layer entry was refused by safe extraction.
    #[error("layer {layer}: entry {path:?} refused: {reason}")]
    UnsafeEntry {
        /// The layer's digest, or "(unknown digest)".
        layer: String,
        /// The entry's path as written in the archive.
        path: String,
        /// Why it was refused.
        reason: String,
    },
    /// A layer archive is malformed (bad header, truncated, corrupt compression).
    #[error("layer {layer}: malformed archive: {reason}")]
    BadArchive {
        /// The layer's digest, or "(unknown digest)".
        layer: String,
        /// What is wrong.
        reason: String,
    },
    /// A layer went over a configured extraction limit.
    #[error("layer {layer}: {what} exceeds the limit of {limit} (raise it in ApplyOptions if the layer is trusted)")]
    LimitExceeded {
        /// The layer's digest, or "(unknown digest)".
        layer: String,
        /// Which limit.
        what: &'static str,
        /// The limit.
        limit: u64,
    },
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Short for `Result<T, StoreError>`.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
