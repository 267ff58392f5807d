//! Errors of the registry client: each names the registry, the repository and what to do.

use crate::digest::Digest;

/// A registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry could not be reached, or the connection broke, after all retries.
    #[error("cannot reach registry {registry} ({what}) after {attempts} attempt(s): {source}; check the host name, the network, and whether it serves HTTPS (list it as insecure if it only speaks HTTP)")]
    Transport {
        /// Registry host.
        registry: String,
        /// The request that failed.
        what: String,
        /// How many times it was tried.
        attempts: u32,
        /// The last transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The registry stopped answering (no response headers in time, or a body that stalled),
    /// after all retries.
    #[error("registry {registry} stopped answering ({what} in {repository}) after {attempts} attempt(s): {stall}; check that the registry is up, or give it longer with KILN_REGISTRY_TIMEOUT (now {timeouts})")]
    Timeout {
        /// Registry host.
        registry: String,
        /// Repository.
        repository: String,
        /// The request that stalled.
        what: String,
        /// How many times it was tried.
        attempts: u32,
        /// What stalled.
        stall: crate::transport::Stall,
        /// The timeouts in force, as `KILN_REGISTRY_TIMEOUT` spells them.
        timeouts: crate::transport::Timeouts,
    },
    /// The client was cancelled (Ctrl-C, or the build stopped) while a request was in flight.
    #[error("{what} on registry {registry} was cancelled")]
    Cancelled {
        /// Registry host.
        registry: String,
        /// The request that was cut short.
        what: String,
    },
    /// The registry is reached over TLS but the system's trust roots cannot be loaded.
    #[error("registry {registry} is reached over HTTPS: {detail}")]
    TlsRoots {
        /// Registry host.
        registry: String,
        /// Why the roots are missing and what to do.
        detail: String,
    },
    /// 401: no credentials, or wrong ones.
    #[error("registry {registry} refused the credentials for {repository} ({what}): 401 Unauthorized{detail}; run `kiln login {registry}` or check the user name and password")]
    Unauthorized {
        /// Registry host.
        registry: String,
        /// Repository.
        repository: String,
        /// The request.
        what: String,
        /// The registry's message, prefixed with ": ".
        detail: String,
    },
    /// 403: the credentials are valid but lack access.
    #[error("registry {registry} denied access to {repository} ({what}): 403 Forbidden{detail}; the account needs pull/push permission on this repository")]
    Denied {
        /// Registry host.
        registry: String,
        /// Repository.
        repository: String,
        /// The request.
        what: String,
        /// The registry's message.
        detail: String,
    },
    /// 404 for a manifest or blob.
    #[error("{what} not found in {registry}/{repository}{detail}; check the name, tag or digest (and that the image was pushed)")]
    NotFound {
        /// Registry host.
        registry: String,
        /// Repository.
        repository: String,
        /// What was asked for, e.g. `manifest latest`.
        what: String,
        /// The registry's message.
        detail: String,
    },
    /// Content did not hash to the digest it was fetched by.
    #[error("{what} from {registry}/{repository} does not match its digest: expected {expected} ({expected_size} bytes), got {actual} ({actual_size} bytes); the content was refused and nothing was kept — the registry or a proxy is serving corrupt data")]
    DigestMismatch {
        /// Registry host.
        registry: String,
        /// Repository.
        repository: String,
        /// What was fetched.
        what: String,
        /// The digest asked for.
        expected: Digest,
        /// The size expected, if known (0 otherwise).
        expected_size: u64,
        /// The digest of what arrived.
        actual: Digest,
        /// The byte count that arrived.
        actual_size: u64,
    },
    /// Any other unexpected HTTP status (including 5xx and 429 after all retries).
    #[error("registry {registry} answered {status} to {what} on {repository}{detail}")]
    Status {
        /// Registry host.
        registry: String,
        /// Repository.
        repository: String,
        /// The request.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The registry's message.
        detail: String,
    },
    /// An upload session could not be resumed after a failure (the registry dropped it or
    /// refuses to continue it); the upload is restarted from the beginning.
    #[error("registry {registry} lost the upload session of {digest} in {repository}{detail}")]
    UploadLost {
        /// Registry host.
        registry: String,
        /// Repository.
        repository: String,
        /// The blob being uploaded.
        digest: String,
        /// The registry's message.
        detail: String,
    },
    /// The registry answered something that breaks the protocol.
    #[error("registry {registry} sent an invalid response to {what}: {detail}")]
    Protocol {
        /// Registry host.
        registry: String,
        /// The request.
        what: String,
        /// What was wrong.
        detail: String,
    },
    /// The manifest could not be parsed.
    #[error("manifest {reference}: {source}")]
    Manifest {
        /// The image reference.
        reference: String,
        /// The parse error.
        #[source]
        source: crate::manifest::ManifestError,
    },
    /// The image config could not be parsed.
    #[error("image config {digest} of {reference} is invalid: {source}")]
    Config {
        /// The image reference.
        reference: String,
        /// Config digest.
        digest: Digest,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// An index has no manifest for the wanted platform.
    #[error("{reference} has no image for platform {platform} (it has: {available}); pick one with --platform")]
    NoMatchingPlatform {
        /// The image reference.
        reference: String,
        /// The platform wanted.
        platform: String,
        /// Platforms in the index.
        available: String,
    },
    /// Reading a local blob or writing a pulled one failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The file (or sink) involved.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Credentials could not be read.
    #[error(transparent)]
    Credentials(#[from] crate::auth::AuthError),
    /// The HTTP client could not be built.
    #[error("cannot set up the HTTP client: {0}")]
    Client(String),
}

impl RegistryError {
    /// Whether trying the whole operation again may succeed (transport errors, 5xx, 429).
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Transport { .. }
            | RegistryError::UploadLost { .. }
            | RegistryError::Timeout { .. } => true,
            RegistryError::Status { status, .. } => *status == 429 || *status >= 500,
            RegistryError::Io { .. } => false,
            _ => false,
        }
    }

    /// How many times the failed request was sent (1 for errors that do not say).
    pub fn attempts(&self) -> u32 {
        match self {
            RegistryError::Transport { attempts, .. } | RegistryError::Timeout { attempts, .. } => {
                *attempts
            }
            _ => 1,
        }
    }

    /// Whether the operation was cut short by [`crate::RegistryClient::cancel`].
    pub fn is_cancelled(&self) -> bool {
        matches!(self, RegistryError::Cancelled { .. })
    }
}
