//! Where base images and blobs come from: the [`ImageProvider`] that resolves `FROM`, the
//! [`BaseImage`] it resolves to, and the [`BlobSource`] a layer chain fetches missing blobs
//! from. The engine runs on these; the providers (registry, local store, OCI layout) and
//! the cache backends implement them.

use std::sync::Arc;

use kiln_oci::{Descriptor, Digest};
use kiln_store::Store;

use crate::error::WorkerError;
use crate::image::Layer;

/// Where the blobs of a layer chain can be fetched from when they are not in the local
/// content store (a registry repository, an imported cache).
pub trait BlobSource: Send + Sync {
    /// Downloads `blob` into the store's content store, verifying its digest.
    fn fetch(&self, blob: &Descriptor, store: &Store) -> Result<(), WorkerError>;
    /// A short name for progress and errors (e.g. `127.0.0.1:5000/app:cache`).
    fn name(&self) -> String;
    /// Whether the source still has `blob` (a registry may have garbage-collected it).
    fn has(&self, _blob: &Descriptor) -> bool {
        true
    }
    /// The registry repository holding the blobs, when there is one: a push to the same
    /// registry mounts them from there instead of downloading and re-uploading.
    fn repository(&self) -> Option<kiln_oci::Reference> {
        None
    }
}

/// A base image, resolved: what `FROM` needs.
#[derive(Clone)]
pub struct BaseImage {
    /// The manifest digest the reference resolved to.
    pub manifest_digest: Digest,
    /// The image config.
    pub config: kiln_oci::ImageConfig,
    /// Layers, bottom first, with their diff ids.
    pub layers: Vec<Layer>,
    /// Where to fetch layer blobs that are not local.
    pub source: Option<Arc<dyn BlobSource>>,
}

/// Resolves image references (a registry, the local store, an OCI layout).
pub trait ImageProvider: Send + Sync {
    /// Resolves `reference` for `platform`.
    fn resolve(
        &self,
        reference: &str,
        platform: &kiln_graph::Platform,
    ) -> Result<BaseImage, WorkerError>;
}
