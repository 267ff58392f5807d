//! Blob sources of imported caches that the engine itself needs: a chain rebased on a step's
//! actual input, and the blobs of a local OCI layout. Reading and writing caches is
//! `kiln-build`'s (its `cache` module); nothing here depends on a finished build.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_oci::Descriptor;
use kiln_store::Store;

use crate::engine::{BlobSource, WorkerError};
use crate::image::Layer;

/// The blobs of a chain rebuilt from a record's own top layers (from an imported cache) on
/// the layers a step's input actually has (from wherever that input got them).
pub(crate) struct RebasedSource {
    top: Arc<dyn BlobSource>,
    top_blobs: std::collections::HashSet<kiln_oci::Digest>,
    below: Option<Arc<dyn BlobSource>>,
}

impl RebasedSource {
    /// `top` serves the blobs of `top_layers`; `below` (if any) every other blob.
    pub(crate) fn new(
        top: Arc<dyn BlobSource>,
        top_layers: &[Layer],
        below: Option<Arc<dyn BlobSource>>,
    ) -> Self {
        RebasedSource {
            top,
            top_blobs: top_layers.iter().map(|l| l.blob.digest.clone()).collect(),
            below,
        }
    }

    fn source_of(&self, blob: &Descriptor) -> Option<&Arc<dyn BlobSource>> {
        if self.top_blobs.contains(&blob.digest) {
            Some(&self.top)
        } else {
            self.below.as_ref()
        }
    }
}

impl BlobSource for RebasedSource {
    fn fetch(&self, blob: &Descriptor, store: &Store) -> Result<(), WorkerError> {
        match self.source_of(blob) {
            Some(s) => s.fetch(blob, store),
            None => Err(WorkerError::Internal(format!(
                "layer blob {} is not in the local store and has no source",
                blob.digest
            ))),
        }
    }

    fn name(&self) -> String {
        self.top.name()
    }

    fn has(&self, blob: &Descriptor) -> bool {
        match self.source_of(blob) {
            Some(s) => s.has(blob),
            // No remote source: the step that made it ran here, so the blob is local.
            None => true,
        }
    }

    fn repository(&self) -> Option<kiln_oci::Reference> {
        self.top.repository()
    }
}

/// Blobs of a local OCI layout (`--import-cache type=local,src=DIR`).
pub struct LayoutBlobs {
    dir: PathBuf,
}

impl LayoutBlobs {
    /// Blobs under `dir/blobs/<alg>/<hex>`.
    pub fn new(dir: PathBuf) -> Self {
        LayoutBlobs { dir }
    }
}

impl BlobSource for LayoutBlobs {
    fn fetch(&self, blob: &Descriptor, store: &Store) -> Result<(), WorkerError> {
        let path = self
            .dir
            .join("blobs")
            .join(blob.digest.algorithm().name())
            .join(blob.digest.hex());
        let mut f = std::fs::File::open(&path).map_err(|e| WorkerError::Io {
            what: "opening cache blob",
            path: path.clone(),
            source: e,
        })?;
        let mut w = store.content().writer()?;
        io::copy(&mut f, &mut w).map_err(|e| WorkerError::Io {
            what: "copying cache blob",
            path: path.clone(),
            source: e,
        })?;
        // The content store verifies size and digest before the blob becomes visible.
        w.commit(&blob.digest, blob.size)?;
        Ok(())
    }

    fn name(&self) -> String {
        self.dir.display().to_string()
    }

    fn has(&self, blob: &Descriptor) -> bool {
        let alg = blob.digest.algorithm().name();
        self.dir
            .join("blobs")
            .join(alg)
            .join(blob.digest.hex())
            .is_file()
    }
}
