//! `--output type=image` (kiln's store, pushed with `push=true`) and `type=registry` (always
//! pushed); buildx's `-t` and `--push` make one of these.

use kiln_oci::compression::Compression;
use kiln_oci::{BlobSource, Descriptor, Reference};
use kiln_worker::engine::Rootfs;

use super::{annotation_attrs, parse_names, Attrs, BuildResult, ExportContext, ExportError};
use super::{split_list, ExportReport, Exporter, PublishedImage};
use crate::attest::Annotation;
use crate::spec::SpecError;

/// The keys `type=image` and `type=registry` accept.
const IMAGE_KEYS: &[&str] = &[
    "name",
    "push",
    "push-by-digest",
    "insecure",
    "registry.insecure",
    "oci-mediatypes",
    "compression",
    "compression-level",
    "force-compression",
    "unpack",
    "store",
    "dangling-name-prefix",
    "name-canonical",
    "rewrite-timestamp",
    "oci-artifact",
];

/// Stores the image in kiln's store under its names and, when asked, pushes it to their
/// registry (blobs the registry has are not sent; blobs of a base image in the same registry
/// are mounted across repositories).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageExporter {
    /// `registry` (always pushes) or `image`.
    pub registry: bool,
    /// Image names (`name=a,b`, or the `-t` tags).
    pub names: Vec<String>,
    /// Push to the names' registry.
    pub push: bool,
    /// `oci-mediatypes=`: OCI media types (the default) or Docker's.
    pub oci_mediatypes: Option<bool>,
    /// `compression=`: the compression layers are made with.
    pub compression: Option<Compression>,
    /// `compression-level=`.
    pub compression_level: Option<u32>,
    /// `force-compression=`: recompress layers that exist with another compression.
    pub force_compression: bool,
    /// `registry.insecure=` (or `insecure=`): the registry speaks plain HTTP.
    pub registry_insecure: bool,
    /// `annotation[-TYPE][[PLATFORM]].KEY=V` attributes.
    pub annotations: Vec<Annotation>,
    /// `push-by-digest=`: push the manifest by its digest only, without a tag.
    pub push_by_digest: bool,
}

impl ImageExporter {
    /// Reads `type=image` or `type=registry` attributes.
    pub fn from_attrs(a: &Attrs<'_>) -> Result<Self, SpecError> {
        let registry = a.kind() == "registry";
        let mut e = ImageExporter {
            registry,
            names: Vec::new(),
            push: registry,
            oci_mediatypes: None,
            compression: None,
            compression_level: None,
            force_compression: false,
            registry_insecure: false,
            annotations: annotation_attrs(a)?,
            push_by_digest: false,
        };
        a.read(IMAGE_KEYS, true, |k, v| {
            match k {
                "name" => e.names = split_list(v),
                "push" => e.push = a.bool(k, v)?,
                "oci-mediatypes" => e.oci_mediatypes = Some(a.bool(k, v)?),
                "compression" => e.compression = Some(a.compression(v)?),
                "compression-level" => e.compression_level = Some(a.compression_level(v)?),
                "force-compression" => e.force_compression = a.bool(k, v)?,
                "registry.insecure" | "insecure" => e.registry_insecure = a.bool(k, v)?,
                "push-by-digest" => e.push_by_digest = a.bool(k, v)?,
                "unpack" | "store" | "name-canonical" | "rewrite-timestamp" | "oci-artifact" => {
                    a.bool(k, v)?;
                }
                _ => {}
            }
            Ok(())
        })?;
        Ok(e)
    }

    /// Pushes `published` under every name, its blobs read from the store: a single image
    /// alone, or, with an index, every platform's image and attestation manifest by digest
    /// (blobs the registry already has, a layer two platforms share among them, are not sent
    /// again), then the index under the names. With `push-by-digest=true` nothing is tagged:
    /// what the names would point at goes up under its digest alone.
    fn push(
        &self,
        cx: &ExportContext<'_>,
        published: &PublishedImage,
        result: &BuildResult<'_>,
    ) -> Result<(), ExportError> {
        let names = parse_names(&self.names)?;
        let top = published.top().digest;
        let pinned = |d: &kiln_oci::Digest| -> Result<Vec<Reference>, ExportError> {
            names
                .iter()
                .map(|t| Reference::new(t.registry(), t.repository(), None, Some(d.clone())))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ExportError::Image {
                    reference: self.names.join(","),
                    message: e.to_string(),
                })
        };
        // The manifest goes up under its digest alone: no tag is created or moved.
        let targets = if self.push_by_digest {
            pinned(&top)?
        } else {
            names.clone()
        };
        let content = cx.store.content();
        let failed = |e: kiln_oci::RegistryError| ExportError::Image {
            reference: self.names.join(","),
            message: e.to_string(),
        };
        for (i, part) in published.parts.iter().enumerate() {
            let image = &part.image;
            let rootfs = result.parts().get(i).and_then(|p| p.rootfs);
            let mount_from = mount_source(rootfs, &self.names);
            if let Some(f) = rootfs.filter(|_| mount_from.is_none()) {
                cx.worker.fetch_blobs(f)?;
            }
            let mut blobs: Vec<(Descriptor, BlobSource)> = vec![(
                image.config.clone(),
                BlobSource::File(content.blob_path(&image.config.digest)),
            )];
            for l in &image.layers {
                // A layer listed twice (two steps that made the same bytes) is uploaded once.
                if blobs.iter().any(|(d, _)| d.digest == l.blob.digest) {
                    continue;
                }
                blobs.push((
                    l.blob.clone(),
                    BlobSource::File(content.blob_path(&l.blob.digest)),
                ));
            }
            // The manifests an index lists go first, by digest (a reference with a digest
            // and no tag is pushed under that digest).
            let to = if published.index.is_some() {
                pinned(&image.manifest.digest)?
            } else {
                targets.clone()
            };
            cx.runtime
                .block_on(
                    cx.client
                        .push_image(&to, &image.manifest, &blobs, mount_from.as_ref()),
                )
                .map_err(failed)?;
        }
        for att in published
            .parts
            .iter()
            .filter_map(|p| p.attestation.as_ref())
        {
            let att_blobs: Vec<(Descriptor, BlobSource)> = att
                .blobs
                .iter()
                .map(|(d, _)| (d.clone(), BlobSource::File(content.blob_path(&d.digest))))
                .collect();
            let att_targets = pinned(&att.manifest.digest)?;
            cx.runtime
                .block_on(
                    cx.client
                        .push_image(&att_targets, &att.manifest, &att_blobs, None),
                )
                .map_err(failed)?;
        }
        if let Some(index) = &published.index {
            for t in &targets {
                cx.runtime
                    .block_on(cx.client.push_manifest(t, index))
                    .map_err(failed)?;
            }
        }
        Ok(())
    }
}

impl Exporter for ImageExporter {
    fn kind(&self) -> &str {
        if self.registry {
            "registry"
        } else {
            "image"
        }
    }

    fn makes_image(&self) -> bool {
        true
    }

    fn layer_compression(&self) -> Option<Compression> {
        self.compression
    }

    fn forces_compression(&self) -> bool {
        self.force_compression
    }

    fn image_names(&self) -> &[String] {
        &self.names
    }

    fn insecure_names(&self) -> &[String] {
        if self.registry_insecure {
            &self.names
        } else {
            &[]
        }
    }

    fn export(
        &self,
        cx: &ExportContext<'_>,
        result: &BuildResult<'_>,
    ) -> Result<ExportReport, ExportError> {
        let published = result.publish(
            cx.store,
            self.oci_mediatypes.unwrap_or(true),
            &self.names,
            &self.annotations,
            true,
        )?;
        // kiln's store names the image manifest: `FROM` a local name reads one image. Of a
        // multi-platform result it names the first platform's.
        kiln_worker::images::tag_image(cx.store, published.image(), &self.names)?;
        if self.push || self.registry {
            self.push(cx, &published, result)?;
        }
        Ok(ExportReport {
            kind: self.kind().to_owned(),
            image: published.single_image(),
        })
    }
}

/// The repository to mount `rootfs`'s blobs from when pushing to `names`: its source, when
/// that is a repository of the same registry (blobs then never travel through this machine).
fn mount_source(rootfs: Option<&Rootfs>, names: &[String]) -> Option<Reference> {
    let repo = rootfs?.source()?.repository()?;
    let target: Reference = names.first()?.parse().ok()?;
    (repo.registry() == target.registry()).then_some(repo)
}
