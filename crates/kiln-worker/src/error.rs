//! The errors of the engine and of its sources, in one module the engine, the base-image
//! providers and the download/layout sources all use (none of them imports another for it).

use std::path::PathBuf;

use kiln_oci::Digest;

/// Why a step could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] kiln_store::StoreError),
    #[error(transparent)]
    Exec(#[from] kiln_exec::ExecError),
    #[error(transparent)]
    FileOp(#[from] crate::fileop::FileOpError),
    #[error(transparent)]
    Context(#[from] crate::context::ContextError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("process \"{command}\" did not complete successfully: {status}")]
    ProcessFailed {
        command: String,
        status: kiln_exec::ExitStatus,
    },
    #[error("secret {0:?} is required but was not provided (pass --secret id={0},src=FILE)")]
    MissingSecret(String),
    #[error("no local directory named {0:?} was given (pass --local {0}=DIR or --build-context {0}=DIR)")]
    MissingLocal(String),
    #[error("image {reference}: {message}")]
    Image { reference: String, message: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("internal: {0}")]
    Internal(String),
}

/// Why a download or an OCI layout could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// `ADD <url>` failed: the server refused, the connection broke, the file is too big...
    #[error("ADD {url}: {message}")]
    Download {
        /// The URL as written in the Dockerfile.
        url: String,
        /// What went wrong and what to do.
        message: String,
    },
    /// The downloaded bytes are not the ones `--checksum` names.
    #[error(
        "ADD {url}: checksum mismatch: --checksum={expected} but the downloaded file is {actual}"
    )]
    ChecksumMismatch {
        /// The URL as written in the Dockerfile.
        url: String,
        /// The digest given with `--checksum`.
        expected: String,
        /// The digest of what the server sent.
        actual: Digest,
    },
    /// An OCI layout is missing, invalid, or lacks the image asked for.
    #[error("oci-layout://{path}: {message}")]
    Layout {
        /// The layout directory as given.
        path: String,
        /// What went wrong and what to do.
        message: String,
    },
}
