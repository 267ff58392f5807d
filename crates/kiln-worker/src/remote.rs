//! The blobs of a local OCI layout, as a [`BlobSource`]: what `--import-cache type=local`
//! and `FROM oci-layout://` read from. Reading and writing caches is `kiln-build`'s (its
//! `cache` module); nothing here depends on the engine's state or a finished build.

use std::io;
use std::path::PathBuf;

use kiln_oci::Descriptor;
use kiln_store::Store;

use crate::error::WorkerError;
use crate::provider::BlobSource;

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
