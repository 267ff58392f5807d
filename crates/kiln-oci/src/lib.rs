//! OCI and Docker image types, media types, content digests, layer compression, and a thin
//! streaming registry client.

#[cfg(feature = "client")]
pub mod auth;
#[cfg(feature = "client")]
pub mod client;
pub mod compression;
pub mod config;
pub mod digest;
#[cfg(feature = "client")]
mod error;
pub mod layout;
pub mod manifest;
pub mod media_type;
pub mod platform;
pub mod reference;
#[cfg(feature = "client")]
pub mod transport;

#[cfg(feature = "client")]
pub use auth::{AuthError, Credential, DockerConfig};
#[cfg(feature = "client")]
pub use client::{
    parse_connections, BlobPush, BlobSource, ClientConfig, HostConfig, RegistryClient,
    ResolvedImage, RetryPolicy, TransferStats, CONNECTIONS_ENV, DEFAULT_CONNECTIONS,
    MAX_CONNECTIONS,
};
pub use config::{ContainerConfig, HealthConfig, History, ImageConfig, RootFs};
pub use digest::{Algorithm, Digest, DigestError, DigestWriter, Hasher};
#[cfg(feature = "client")]
pub use error::RegistryError;
pub use layout::{write_docker_archive, LayoutError, OciLayout};
pub use manifest::{Descriptor, ImageIndex, ImageManifest, Manifest, ManifestError, RawManifest};
pub use platform::{Platform, PlatformError, PlatformFlagError};
pub use reference::{Reference, ReferenceError, ReferenceErrorKind};
#[cfg(feature = "client")]
pub use transport::{Stall, Timeouts, TIMEOUT_ENV};
