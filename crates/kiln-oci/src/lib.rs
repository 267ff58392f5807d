//! OCI and Docker image types, media types, content digests, layer compression, and a thin
//! streaming registry client.

pub mod auth;
pub mod client;
pub mod compression;
pub mod config;
pub mod digest;
mod error;
pub mod layout;
pub mod manifest;
pub mod media_type;
pub mod platform;
pub mod reference;
pub mod transport;

pub use auth::{AuthError, Credential, DockerConfig};
pub use client::{
    parse_connections, BlobPush, BlobSource, ClientConfig, HostConfig, RegistryClient,
    ResolvedImage, RetryPolicy, TransferStats, CONNECTIONS_ENV, DEFAULT_CONNECTIONS,
    MAX_CONNECTIONS,
};
pub use config::{ContainerConfig, HealthConfig, History, ImageConfig, RootFs};
pub use digest::{Algorithm, Digest, DigestError, DigestWriter, Hasher};
pub use error::RegistryError;
pub use layout::{write_docker_archive, LayoutError, OciLayout};
pub use manifest::{Descriptor, ImageIndex, ImageManifest, Manifest, ManifestError, RawManifest};
pub use platform::{Platform, PlatformError, PlatformFlagError};
pub use reference::{Reference, ReferenceError};
pub use transport::{Stall, Timeouts, TIMEOUT_ENV};
