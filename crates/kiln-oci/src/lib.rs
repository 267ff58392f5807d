//! OCI and Docker image types, media types, content digests, layer compression, and a thin
//! streaming registry client.

pub mod compression;
pub mod digest;

pub use digest::{Algorithm, Digest, DigestError, DigestWriter, Hasher};
