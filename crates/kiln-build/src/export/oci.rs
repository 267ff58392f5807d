//! `--output type=oci,dest=FILE`: the image as an OCI image-layout tarball.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use kiln_oci::compression::Compression;
use kiln_oci::OciLayout;

use super::archive::TarballSettings;
use super::{io_at, Attrs, BuildResult, ExportContext, ExportError, ExportFile, ExportReport};
use super::{parse_names, Exporter, PublishedImage};
use crate::spec::SpecError;

/// Writes the image as an OCI layout tarball (OCI media types unless `oci-mediatypes=false`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciExporter {
    /// The tarball's settings.
    pub settings: TarballSettings,
}

impl OciExporter {
    /// Reads `type=oci` attributes.
    pub fn from_attrs(a: &Attrs<'_>) -> Result<Self, SpecError> {
        Ok(OciExporter {
            settings: TarballSettings::from_attrs(a)?,
        })
    }
}

impl Exporter for OciExporter {
    fn kind(&self) -> &str {
        "oci"
    }

    fn image_names(&self) -> &[String] {
        &self.settings.names
    }

    fn makes_image(&self) -> bool {
        true
    }

    fn layer_compression(&self) -> Option<Compression> {
        self.settings.compression
    }

    fn forces_compression(&self) -> bool {
        self.settings.force_compression
    }

    fn export(
        &self,
        cx: &ExportContext<'_>,
        result: &BuildResult<'_>,
    ) -> Result<ExportReport, ExportError> {
        let s = &self.settings;
        let oci = s.oci_mediatypes.unwrap_or(true);
        // Lazily pulled blobs fetched, then every platform's image annotated and attested.
        self.settings.fetch_blobs(cx, result)?;
        let published = result.publish(cx.store, oci, &s.names, &s.annotations, true)?;
        kiln_worker::images::tag_image(cx.store, published.image(), &s.names)?;
        let tmp = scratch_dir(cx.store.root())?;
        let written = write_layout(cx, &published, &s.names, &tmp, &s.dest);
        let _ = fs::remove_dir_all(&tmp);
        written?;
        Ok(ExportReport {
            kind: self.kind().to_owned(),
            image: published.single_image(),
        })
    }
}

/// Lays the image out in `tmp` (blobs hard-linked from the store) and writes it as a
/// tarball: every platform's image, its attestation manifest, and the index when made, which
/// `index.json` then names.
fn write_layout(
    cx: &ExportContext<'_>,
    published: &PublishedImage,
    names: &[String],
    tmp: &Path,
    dest: &Path,
) -> Result<(), ExportError> {
    let layout = OciLayout::create(tmp.join("layout"))?;
    let images = published.parts.iter().flat_map(|p| {
        let image = &p.image;
        std::iter::once(&image.manifest.digest)
            .chain(std::iter::once(&image.config.digest))
            .chain(image.layers.iter().map(|l| &l.blob.digest))
    });
    let attestation = published
        .parts
        .iter()
        .filter_map(|p| p.attestation.as_ref())
        .flat_map(|a| {
            std::iter::once(&a.manifest.digest).chain(a.blobs.iter().map(|(d, _)| &d.digest))
        });
    let digests = images
        .chain(attestation)
        .chain(published.index.iter().map(|i| &i.digest));
    for d in digests {
        let to = layout.blob_path(d);
        // An image may list one layer twice (two steps that made the same bytes), and two
        // platforms may share a layer: the blob is in the layout once. Copying onto the existing name would truncate the store's own
        // blob, which that name is a hard link to.
        if to.exists() {
            continue;
        }
        if let Some(dir) = to.parent() {
            fs::create_dir_all(dir).map_err(io_at("creating", dir))?;
        }
        let from = cx.store.content().blob_path(d);
        // Hard links cost nothing; fall back to a copy across filesystems.
        match fs::hard_link(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(_) => {
                fs::copy(&from, &to).map_err(io_at("copying", &from))?;
            }
        }
    }
    let refs = parse_names(names)?;
    // The full name: podman and docker name the loaded image after it.
    let ref_name = refs
        .first()
        .map(|r| r.familiar())
        .unwrap_or_else(|| "latest".into());
    let mut top = published.top();
    top.annotations
        .extend(published.index_descriptor_annotations.clone());
    layout.add_manifest(top, &ref_name)?;
    let mut out = ExportFile::create(dest)?;
    layout.write_archive(&mut out)?;
    out.finish()
}

/// A fresh directory under the state dir's `tmp/` for one export's layout.
fn scratch_dir(root: &Path) -> Result<PathBuf, ExportError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = root.join("tmp").join(format!(
        "export-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).map_err(io_at("creating", &dir))?;
    Ok(dir)
}
