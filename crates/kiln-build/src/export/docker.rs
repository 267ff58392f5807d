//! `--output type=docker,dest=FILE`: the image in `docker save` format. A multi-platform
//! result is written as the same kind of tarball holding the index: `index.json` names the
//! image index (a Docker manifest list unless attestations or `oci-mediatypes=true` ask for
//! an OCI index), every platform's blobs are in it once, and `manifest.json` lists every
//! platform's image, the names on the one of this machine's platform (a `docker load` of
//! the classic kind takes one image per name).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

use kiln_oci::compression::Compression;
use kiln_oci::{Digest, ImageIndex, Platform};

use super::archive::TarballSettings;
use super::{io_at, parse_names, Attrs, BuildResult, ExportContext, ExportError, ExportFile};
use super::{ExportReport, Exporter, PublishedImage};
use crate::spec::SpecError;

/// Writes the image as a `docker load` tarball (Docker media types unless
/// `oci-mediatypes=true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerExporter {
    /// The tarball's settings.
    pub settings: TarballSettings,
}

impl DockerExporter {
    /// Reads `type=docker` attributes.
    pub fn from_attrs(a: &Attrs<'_>) -> Result<Self, SpecError> {
        Ok(DockerExporter {
            settings: TarballSettings::from_attrs(a)?,
        })
    }
}

impl Exporter for DockerExporter {
    fn kind(&self) -> &str {
        "docker"
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
        if result.is_multi_platform() {
            s.fetch_blobs(cx, result)?;
            let oci = s.oci_mediatypes.unwrap_or(false);
            let published = result.publish(cx.store, oci, &s.names, &s.annotations, false)?;
            kiln_worker::images::tag_image(cx.store, published.image(), &s.names)?;
            let mut out = ExportFile::create(&s.dest)?;
            write_multi_platform(cx, &published, &s.names, &mut out, &s.dest)?;
            out.finish()?;
            return Ok(ExportReport {
                kind: self.kind().to_owned(),
                image: None,
            });
        }
        let image = s.image(cx, result, false)?;
        let refs = parse_names(&s.names)?;
        let mut out = ExportFile::create(&s.dest)?;
        let content = cx.store.content();
        kiln_oci::write_docker_archive(&mut out, &image.manifest, &refs, &|d| {
            content.blob_path(d)
        })?;
        out.finish()?;
        Ok(ExportReport {
            kind: self.kind().to_owned(),
            image: Some(image),
        })
    }
}

/// The name of a blob in the tarball (`blobs/sha256/HEX`), as the OCI layout has it.
fn blob_name(d: &Digest) -> String {
    format!("blobs/{}/{}", d.algorithm().name(), d.hex())
}

/// Writes the tarball of a multi-platform `published` result to `w`: the blobs (each once),
/// `oci-layout`, `index.json` naming the index, and `manifest.json`.
fn write_multi_platform(
    cx: &ExportContext<'_>,
    published: &PublishedImage,
    names: &[String],
    w: impl Write,
    dest: &Path,
) -> Result<(), ExportError> {
    let refs = parse_names(names)?;
    let tags: Vec<String> = refs
        .iter()
        .filter(|r| r.tag().is_some())
        .map(|r| r.familiar())
        .collect();
    let host = Platform::host();
    let named = published
        .parts
        .iter()
        .position(|p| host.matches(&p.platform))
        .unwrap_or(0);
    let manifest_json: Vec<serde_json::Value> = published
        .parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let layers: Vec<String> = p
                .image
                .layers
                .iter()
                .filter(|l| !kiln_oci::media_type::is_non_distributable(&l.blob.media_type))
                .map(|l| blob_name(&l.blob.digest))
                .collect();
            serde_json::json!({
                "Config": blob_name(&p.image.config.digest),
                "RepoTags": if i == named { tags.clone() } else { Vec::new() },
                "Layers": layers,
            })
        })
        .collect();
    let mut top = published.top();
    if let Some(first) = refs.first() {
        top.annotations
            .insert("io.containerd.image.name".into(), first.to_string());
        if let Some(t) = first.tag() {
            top.annotations
                .insert(kiln_oci::layout::REF_NAME_ANNOTATION.into(), t.to_owned());
        }
    }
    let mut index = ImageIndex::new();
    index.manifests.push(top);

    let content = cx.store.content();
    let mut tar = tar::Builder::new(w);
    let mut seen = BTreeSet::new();
    for p in &published.parts {
        let image = &p.image;
        let blobs = std::iter::once(&image.config.digest)
            .chain(image.layers.iter().map(|l| &l.blob.digest))
            .chain(std::iter::once(&image.manifest.digest));
        for d in blobs {
            if seen.insert(d.clone()) {
                let path = content.blob_path(d);
                let f = std::fs::File::open(&path).map_err(io_at("reading", &path))?;
                let len = f.metadata().map_err(io_at("reading", &path))?.len();
                append(&mut tar, &blob_name(d), len, f, dest)?;
            }
        }
    }
    if let Some(i) = &published.index {
        append(
            &mut tar,
            &blob_name(&i.digest),
            i.bytes.len() as u64,
            &i.bytes[..],
            dest,
        )?;
    }
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    append(
        &mut tar,
        "oci-layout",
        layout.len() as u64,
        &layout[..],
        dest,
    )?;
    let index = serde_json::to_vec(&index).unwrap_or_default();
    append(&mut tar, "index.json", index.len() as u64, &index[..], dest)?;
    let manifest = serde_json::to_vec(&manifest_json).unwrap_or_default();
    append(
        &mut tar,
        "manifest.json",
        manifest.len() as u64,
        &manifest[..],
        dest,
    )?;
    tar.into_inner()
        .and_then(|mut w| w.flush())
        .map_err(io_at("writing", dest))
}

/// Appends one regular file of `len` bytes read from `data` (fixed owner, mode and time, so
/// the same result gives the same bytes).
fn append(
    tar: &mut tar::Builder<impl Write>,
    name: &str,
    len: u64,
    data: impl std::io::Read,
    dest: &Path,
) -> Result<(), ExportError> {
    let mut h = tar::Header::new_ustar();
    h.set_size(len);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, name, data)
        .map_err(io_at("writing", dest))
}
