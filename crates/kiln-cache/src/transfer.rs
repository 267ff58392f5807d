//! Moving a cache graph to and from a registry or a local OCI layout. Import reads the
//! manifest and the config only; layer blobs stay where they are until a step needs them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use kiln_oci::{
    BlobSource, Descriptor, Digest, Manifest, OciLayout, RawManifest, Reference, RegistryClient,
    RegistryError,
};

use crate::format::{CacheFormatError, CacheGraph};

/// Why a cache could not be exported or imported.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("cache {reference}: {source}")]
    Registry {
        reference: String,
        source: Box<RegistryError>,
    },
    #[error("cache {reference}: {source}")]
    Format {
        reference: String,
        source: CacheFormatError,
    },
    #[error("cache {reference}: {message}")]
    Layout { reference: String, message: String },
}

/// What an export did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportReport {
    /// Records in the exported graph.
    pub records: usize,
    /// Layer blobs it references.
    pub blobs: usize,
    /// Records dropped because their blobs were neither local nor in the registry.
    pub dropped: usize,
    /// The manifest's digest.
    pub manifest_digest: Option<Digest>,
}

fn reg_err(reference: &Reference) -> impl FnOnce(RegistryError) -> TransferError + '_ {
    move |source| TransferError::Registry {
        reference: reference.to_string(),
        source: Box::new(source),
    }
}

/// Reads the cache at `reference`. `Ok(None)` when the ref does not exist (a first run).
pub async fn import_registry(
    client: &RegistryClient,
    reference: &Reference,
) -> Result<Option<CacheGraph>, TransferError> {
    let raw = match client.pull_manifest(reference).await {
        Ok(m) => m,
        Err(RegistryError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(reg_err(reference)(e)),
    };
    let manifest = match raw.parse() {
        Ok(Manifest::Image(m)) => m,
        Ok(Manifest::Index(_)) => {
            return Err(TransferError::Format {
                reference: reference.to_string(),
                source: CacheFormatError::NotACache("an image index".into()),
            })
        }
        Err(e) => {
            return Err(TransferError::Format {
                reference: reference.to_string(),
                source: CacheFormatError::Malformed(e.to_string()),
            })
        }
    };
    let mut config: Vec<u8> = Vec::with_capacity(manifest.config.size as usize);
    client
        .pull_blob(reference, &manifest.config, &mut config)
        .await
        .map_err(reg_err(reference))?;
    CacheGraph::from_manifest(&manifest, &config)
        .map(Some)
        .map_err(|source| TransferError::Format {
            reference: reference.to_string(),
            source,
        })
}

/// Pushes `graph` to `reference`: every blob (HEAD-checked, mounted from `mount_from` when the
/// registry has it there, else uploaded from the local file `blob_file` gives), then the
/// config, then the manifest last, so a reader never sees a cache pointing at missing blobs.
/// Records whose blobs are neither local nor already in the registry are dropped.
pub async fn export_registry(
    client: &RegistryClient,
    reference: &Reference,
    mut graph: CacheGraph,
    blob_file: &(dyn Fn(&Digest) -> Option<PathBuf> + Sync),
    mount_from: Option<&Reference>,
) -> Result<ExportReport, TransferError> {
    use futures::StreamExt;
    let before = graph.len();
    // Blobs not in the local store must already be in the registry (this repository, or the
    // one a mount can take them from). Many small blobs make this round-trip bound, so the
    // checks run `client.concurrency()` at a time.
    let remote: Vec<Digest> = graph
        .layers()
        .iter()
        .filter(|l| blob_file(&l.blob.digest).is_none())
        .map(|l| l.blob.digest.clone())
        .collect();
    let checks = futures::stream::iter(remote)
        .map(|d| async move {
            let there = client
                .blob_exists(reference, &d)
                .await
                .map_err(reg_err(reference))?;
            let mountable = match mount_from {
                Some(from) if !there && from.registry() == reference.registry() => client
                    .blob_exists(from, &d)
                    .await
                    .map_err(reg_err(reference))?,
                _ => false,
            };
            Ok::<_, TransferError>((d, there || mountable))
        })
        .buffer_unordered(client.concurrency())
        .collect::<Vec<_>>()
        .await;
    let mut missing = HashSet::new();
    for c in checks {
        let (d, present) = c?;
        if !present {
            missing.insert(d);
        }
    }
    graph.retain_blobs(|d| !missing.contains(d));
    let (manifest, config) = graph.to_manifest();
    let mut blobs: Vec<(Descriptor, BlobSource)> = vec![(
        manifest.config.clone(),
        BlobSource::Bytes(Bytes::from(config)),
    )];
    for l in &manifest.layers {
        // A blob that is not local exists in the target or the mount source (checked above).
        let path = blob_file(&l.digest).unwrap_or_else(|| PathBuf::from("/nonexistent"));
        blobs.push((l.clone(), BlobSource::File(path)));
    }
    let raw = RawManifest::from_image(&manifest);
    let digest = client
        .push_image(std::slice::from_ref(reference), &raw, &blobs, mount_from)
        .await
        .map_err(reg_err(reference))?;
    Ok(ExportReport {
        records: graph.len(),
        blobs: manifest.layers.len(),
        dropped: before - graph.len(),
        manifest_digest: Some(digest),
    })
}

fn layout_err(reference: &str) -> impl FnOnce(kiln_oci::LayoutError) -> TransferError + '_ {
    move |e| TransferError::Layout {
        reference: reference.to_owned(),
        message: e.to_string(),
    }
}

/// Writes `graph` into the OCI layout at `dir` under `tag` (`--export-cache type=local`).
pub fn export_local(
    dir: &Path,
    tag: &str,
    graph: &CacheGraph,
    blob_file: &dyn Fn(&Digest) -> Option<PathBuf>,
) -> Result<ExportReport, TransferError> {
    let name = dir.display().to_string();
    let layout = if dir.join("oci-layout").exists() {
        OciLayout::open(dir)
    } else {
        OciLayout::create(dir)
    }
    .map_err(layout_err(&name))?;
    let (manifest, config) = graph.to_manifest();
    let mut dropped = 0;
    for l in &manifest.layers {
        if layout.has_blob(&l.digest) {
            continue;
        }
        match blob_file(&l.digest) {
            Some(p) => {
                let f = std::fs::File::open(&p).map_err(|e| TransferError::Layout {
                    reference: name.clone(),
                    message: format!("{}: {e}", p.display()),
                })?;
                let (written, _) = layout
                    .write_blob_from_reader(f)
                    .map_err(layout_err(&name))?;
                if written != l.digest {
                    return Err(TransferError::Layout {
                        reference: name,
                        message: format!("local blob {} hashes to {written}", l.digest),
                    });
                }
            }
            None => dropped += 1,
        }
    }
    if dropped > 0 {
        return Err(TransferError::Layout {
            reference: name,
            message: format!("{dropped} layer blob(s) are not in the local store"),
        });
    }
    layout.write_blob(&config).map_err(layout_err(&name))?;
    let raw = RawManifest::from_image(&manifest);
    layout.write_blob(&raw.bytes).map_err(layout_err(&name))?;
    layout
        .add_manifest(raw.descriptor(), tag)
        .map_err(layout_err(&name))?;
    Ok(ExportReport {
        records: graph.len(),
        blobs: manifest.layers.len(),
        dropped: 0,
        manifest_digest: Some(raw.digest),
    })
}

/// Reads the cache stored in the OCI layout at `dir` under `tag`; `Ok(None)` when absent.
/// Its blobs are at [`OciLayout::blob_path`].
pub fn import_local(
    dir: &Path,
    tag: &str,
) -> Result<Option<(CacheGraph, OciLayout)>, TransferError> {
    let name = dir.display().to_string();
    if !dir.join("index.json").exists() {
        return Ok(None);
    }
    let layout = OciLayout::open(dir).map_err(layout_err(&name))?;
    let raw = match layout.manifest(tag) {
        Ok(m) => m,
        Err(_) => return Ok(None),
    };
    let manifest = match raw.parse() {
        Ok(Manifest::Image(m)) => m,
        _ => {
            return Err(TransferError::Format {
                reference: name,
                source: CacheFormatError::NotACache("not an image manifest".into()),
            })
        }
    };
    let config = layout
        .read_blob(&manifest.config.digest)
        .map_err(layout_err(&name))?;
    let graph =
        CacheGraph::from_manifest(&manifest, &config).map_err(|source| TransferError::Format {
            reference: name,
            source,
        })?;
    Ok(Some((graph, layout)))
}
