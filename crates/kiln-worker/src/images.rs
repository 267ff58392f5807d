//! Images in the local store: resolving `FROM` names that were built or imported here,
//! `kiln import` of a root filesystem, and storing a finished image under its names.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use kiln_oci::compression::Compression;
use kiln_oci::{media_type, Descriptor, Digest, ImageManifest, Manifest, RawManifest, Reference};
use kiln_store::{ExportOptions, Store};

use crate::error::WorkerError;
use crate::image::{self, Layer};
use crate::provider::{BaseImage, ImageProvider};

/// The canonical name an image is stored under (`busybox` → `docker.io/library/busybox:latest`).
pub fn normalize(name: &str) -> Result<String, WorkerError> {
    name.parse::<Reference>()
        .map(|r| r.to_string())
        .map_err(|e| WorkerError::Image {
            reference: name.to_owned(),
            message: e.to_string(),
        })
}

fn image_err(reference: &str, message: impl Into<String>) -> WorkerError {
    WorkerError::Image {
        reference: reference.to_owned(),
        message: message.into(),
    }
}

/// Reads an image whose manifest and blobs are all in the local content store.
pub fn load_local(
    store: &Store,
    reference: &str,
    manifest_digest: &Digest,
) -> Result<BaseImage, WorkerError> {
    let read = |d: &Digest| -> Result<Vec<u8>, WorkerError> {
        let path = store.content().blob_path(d);
        std::fs::read(&path).map_err(|e| image_err(reference, format!("reading blob {d}: {e}")))
    };
    let bytes = read(manifest_digest)?;
    let manifest: ImageManifest = match Manifest::parse(media_type::OCI_MANIFEST, &bytes)
        .or_else(|_| Manifest::parse(media_type::DOCKER_MANIFEST, &bytes))
    {
        Ok(Manifest::Image(m)) => m,
        Ok(_) => {
            return Err(image_err(
                reference,
                "is an index; only single-platform images are stored locally",
            ))
        }
        Err(e) => {
            return Err(image_err(
                reference,
                format!("manifest {manifest_digest}: {e}"),
            ))
        }
    };
    let config: kiln_oci::ImageConfig = serde_json::from_slice(&read(&manifest.config.digest)?)
        .map_err(|e| image_err(reference, format!("config {}: {e}", manifest.config.digest)))?;
    let layers = crate::image::image_layers(&config, &manifest.layers).ok_or_else(|| {
        image_err(
            reference,
            "config lists a different number of layers than the manifest",
        )
    })?;
    Ok(BaseImage {
        manifest_digest: manifest_digest.clone(),
        config,
        layers,
        source: None,
    })
}

/// Resolves names against the local store's image refs.
pub struct LocalImages {
    store: Arc<Store>,
}

impl LocalImages {
    /// Images stored in `store`.
    pub fn new(store: Arc<Store>) -> Self {
        LocalImages { store }
    }

    /// The image stored under `reference`, if any.
    pub fn get(&self, reference: &str) -> Result<Option<BaseImage>, WorkerError> {
        let name = normalize(reference)?;
        match self.store.get_ref(&name)? {
            Some(d) => load_local(&self.store, reference, &d).map(Some),
            None => Ok(None),
        }
    }
}

impl ImageProvider for LocalImages {
    fn resolve(
        &self,
        reference: &str,
        _platform: &kiln_graph::Platform,
    ) -> Result<BaseImage, WorkerError> {
        self.get(reference)?.ok_or_else(|| {
            image_err(reference, "not found in the local store (kiln import it, build it with --output type=image,name=..., or push it to a registry)")
        })
    }
}

/// A finished image whose config and manifest are in the content store.
#[derive(Debug, Clone)]
pub struct StoredImage {
    /// The manifest as stored (exact bytes are what its digest covers).
    pub manifest: RawManifest,
    /// The config blob's descriptor.
    pub config: Descriptor,
    /// The layers, bottom first.
    pub layers: Vec<Layer>,
}

/// Writes config and manifest blobs for an image of `layers` with config `cfg`.
pub fn store_image(
    store: &Store,
    cfg: &kiln_oci::ImageConfig,
    layers: &[Layer],
    created: &str,
    oci_media_types: bool,
) -> Result<StoredImage, WorkerError> {
    store_image_with_fields(
        store,
        cfg,
        layers,
        created,
        oci_media_types,
        &BTreeMap::new(),
    )
}

/// [`store_image`] with extra top-level fields in the image config (e.g. the inline cache,
/// `kiln.cache.v1`). A field of the standard config is never overwritten. The fields are
/// serialized sorted, so the same fields give the same config digest.
pub fn store_image_with_fields(
    store: &Store,
    cfg: &kiln_oci::ImageConfig,
    layers: &[Layer],
    created: &str,
    oci_media_types: bool,
    fields: &BTreeMap<String, serde_json::Value>,
) -> Result<StoredImage, WorkerError> {
    let diff_ids = layers.iter().map(|l| l.diff_id.clone()).collect();
    let mut config = image::image_config(cfg, diff_ids, created);
    if !fields.is_empty() {
        // The standard fields as serialized: an extra field must not duplicate one of them.
        let standard = serde_json::to_value(&config).unwrap_or_default();
        for (k, v) in fields {
            if standard.get(k).is_none() {
                config.extra.insert(k.clone(), v.clone());
            }
        }
    }
    let config = config.to_bytes();
    let manifest = image::image_manifest(&config, layers, oci_media_types);
    let config_desc = manifest.config.clone();
    store.content().put_bytes(&config)?;
    let raw = RawManifest::from_image(&manifest);
    store.content().put_bytes(&raw.bytes)?;
    Ok(StoredImage {
        manifest: raw,
        config: config_desc,
        layers: layers.to_vec(),
    })
}

/// Names `image` in the local store so later builds can use it `FROM` that name.
pub fn tag_image(store: &Store, image: &StoredImage, names: &[String]) -> Result<(), WorkerError> {
    for n in names {
        store.set_ref(&normalize(n)?, &image.manifest.digest)?;
    }
    Ok(())
}

/// `kiln import`: makes a one-layer image from a root filesystem (a directory, or a tar
/// archive, possibly compressed) and stores it under `names`.
pub fn import_rootfs(
    store: &Store,
    source: &Path,
    names: &[String],
    platform: &kiln_graph::Platform,
    created: &str,
    source_date_epoch: Option<i64>,
) -> Result<StoredImage, WorkerError> {
    let lease = store.lease()?;
    let active = store.prepare(None, Some(&lease))?;
    let filled = (|| {
        if source.is_dir() {
            crate::fileop::copy(
                source,
                &[".".into()],
                &active.rootfs,
                "/",
                &crate::fileop::CopyOptions {
                    dest_is_dir: true,
                    parents: false,
                    exclude: vec![],
                    owner: crate::fileop::Owner::Preserve,
                    chmod: None,
                    source_name: "import source".into(),
                    extract_archives: false,
                },
            )?;
        } else {
            let f = std::fs::File::open(source).map_err(|e| WorkerError::Io {
                what: "opening",
                path: source.to_owned(),
                source: e,
            })?;
            store.extract_into(&active, f, &kiln_store::ApplyOptions::default())?;
        }
        Ok::<_, WorkerError>(())
    })();
    if let Err(e) = filled {
        let _ = store.remove(active.id);
        return Err(e);
    }
    let id = store.commit(&active)?;
    let rec = store.export_layer(
        id,
        Compression::Gzip,
        &ExportOptions {
            diff: kiln_store::DiffOptions { source_date_epoch },
        },
    )?;
    let layers = vec![Layer {
        diff_id: rec.diff_id,
        blob: Descriptor::new(rec.media_type, rec.digest, rec.size),
        created: Some(created.to_owned()),
    }];
    let cfg = kiln_oci::ImageConfig {
        os: platform.os.clone(),
        architecture: platform.architecture.clone(),
        variant: platform.variant.clone(),
        config: Some(kiln_oci::ContainerConfig {
            env: Some(vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ]),
            ..Default::default()
        }),
        history: vec![kiln_oci::History {
            // Only the last path component, so importing the same tree from another
            // folder makes the same image.
            created_by: Some(format!(
                "kiln import {}",
                source
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            )),
            ..Default::default()
        }],
        ..Default::default()
    };
    let image = store_image(store, &cfg, &layers, created, true)?;
    tag_image(store, &image, names)?;
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_config_fields_are_added_but_never_replace_standard_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cfg = kiln_oci::ImageConfig {
            os: "linux".into(),
            architecture: "amd64".into(),
            ..Default::default()
        };
        let fields = BTreeMap::from([
            (
                "kiln.cache.v1".to_owned(),
                serde_json::json!({"version": 1}),
            ),
            ("os".to_owned(), serde_json::json!("windows")),
        ]);
        let stored = |f: &BTreeMap<String, serde_json::Value>| {
            let img = store_image_with_fields(&store, &cfg, &[], "1970-01-01T00:00:00Z", true, f)
                .unwrap();
            let bytes = std::fs::read(store.content().blob_path(&img.config.digest)).unwrap();
            (
                img,
                serde_json::from_slice::<serde_json::Value>(&bytes).unwrap(),
            )
        };
        let (a, config) = stored(&fields);
        assert_eq!(config["kiln.cache.v1"]["version"], 1);
        assert_eq!(config["os"], "linux");
        let (b, _) = stored(&fields);
        assert_eq!(
            a.manifest.digest, b.manifest.digest,
            "same fields, same image"
        );
        let (plain, config) = stored(&BTreeMap::new());
        assert!(config.get("kiln.cache.v1").is_none());
        assert_ne!(plain.manifest.digest, a.manifest.digest);
    }
}
