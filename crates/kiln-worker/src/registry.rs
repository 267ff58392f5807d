//! Registries as image sources, through kiln-oci's client. Blocking wrappers: the worker calls them from blocking threads, with a handle on the runtime, through
//! [`RegistryClient::block_on`], so that a cancelled client ends them at once and the runtime
//! is dropped only after they have returned (see [`RegistryClient::shutdown`]).

use std::fs;
use std::sync::Arc;

use kiln_oci::{Descriptor, Reference, RegistryClient};
use kiln_store::Store;
use tokio::runtime::Handle;

use crate::error::WorkerError;
use crate::images::LocalImages;
use crate::provider::{BaseImage, BlobSource, ImageProvider};

fn image_err(reference: &str, message: impl ToString) -> WorkerError {
    WorkerError::Image {
        reference: reference.to_owned(),
        message: message.to_string(),
    }
}

fn parse_ref(reference: &str) -> Result<Reference, WorkerError> {
    reference
        .parse::<Reference>()
        .map_err(|e| image_err(reference, e))
}

/// Layer blobs of one repository, fetched on demand into the content store.
pub struct RepositoryBlobs {
    client: RegistryClient,
    handle: Handle,
    reference: Reference,
}

impl RepositoryBlobs {
    /// Blobs of `reference`'s repository.
    pub fn new(client: RegistryClient, handle: Handle, reference: Reference) -> Self {
        RepositoryBlobs {
            client,
            handle,
            reference,
        }
    }
}

impl BlobSource for RepositoryBlobs {
    fn fetch(&self, blob: &Descriptor, store: &Store) -> Result<(), WorkerError> {
        let dest = store.content().blob_path(&blob.digest);
        if dest.is_file() {
            return Ok(());
        }
        // Downloaded and verified beside the store's ingests, then renamed into place: a
        // blob path never holds unverified bytes.
        // One name per download: two threads fetching the same blob must not share a file.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let ingest = store.root().join("content/ingest").join(format!(
            "pull-{}-{}-{}",
            blob.digest.hex(),
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        self.client
            .block_on(
                &self.handle,
                self.reference.registry(),
                &format!("download of blob {}", blob.digest),
                self.client
                    .pull_blob_to_file(&self.reference, blob, &ingest),
            )
            .map_err(|e| image_err(&self.reference.to_string(), e))?;
        fs::rename(&ingest, &dest).map_err(|e| WorkerError::Io {
            what: "storing pulled blob",
            path: dest,
            source: e,
        })
    }

    fn name(&self) -> String {
        self.reference.to_string()
    }

    fn repository(&self) -> Option<Reference> {
        Some(self.reference.clone())
    }

    fn has(&self, blob: &Descriptor) -> bool {
        self.client
            .block_on(
                &self.handle,
                self.reference.registry(),
                &format!("HEAD blob {}", blob.digest),
                self.client.blob_exists(&self.reference, &blob.digest),
            )
            .unwrap_or(false)
    }
}

/// Resolves `FROM` names: images built or imported into the local store first, then the
/// registry the name points at.
pub struct RegistryImages {
    client: RegistryClient,
    handle: Handle,
    local: LocalImages,
    pull: bool,
}

impl RegistryImages {
    /// Local images of `store`, then registries through `client`.
    pub fn new(client: RegistryClient, handle: Handle, store: Arc<Store>) -> Self {
        RegistryImages {
            client,
            handle,
            local: LocalImages::new(store),
            pull: false,
        }
    }

    /// Always resolves references in their registry, skipping same-named local images
    /// (`--pull`).
    pub fn always_pull(mut self, pull: bool) -> Self {
        self.pull = pull;
        self
    }
}

impl ImageProvider for RegistryImages {
    fn resolve(
        &self,
        reference: &str,
        platform: &kiln_graph::Platform,
    ) -> Result<BaseImage, WorkerError> {
        if !self.pull {
            if let Some(img) = self.local.get(reference)? {
                return Ok(img);
            }
        }
        let r = parse_ref(reference)?;
        let p: kiln_oci::Platform = platform
            .to_string()
            .parse()
            .map_err(|e: kiln_oci::PlatformError| image_err(reference, e))?;
        let resolved = self
            .client
            .block_on(
                &self.handle,
                r.registry(),
                &format!("resolving {r}"),
                self.client.resolve(&r, &p),
            )
            .map_err(|e| image_err(reference, e))?;
        let distributable: Vec<Descriptor> = resolved.distributable_layers().cloned().collect();
        let mut layers = crate::image::image_layers(&resolved.config, &resolved.image.layers)
            .ok_or_else(|| {
                image_err(
                    reference,
                    "its config lists a different number of layers than its manifest",
                )
            })?;
        layers.retain(|l| distributable.iter().any(|d| d.digest == l.blob.digest));
        let source: Arc<dyn BlobSource> = Arc::new(RepositoryBlobs::new(
            self.client.clone(),
            self.handle.clone(),
            r,
        ));
        Ok(BaseImage {
            manifest_digest: resolved.manifest.digest.clone(),
            config: resolved.config,
            layers,
            source: Some(source),
        })
    }
}
