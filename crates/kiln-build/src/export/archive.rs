//! What the OCI and Docker tarball exporters share: their attributes, and the fetch of
//! lazily pulled layers before the blobs are read.

use std::path::PathBuf;

use kiln_oci::compression::Compression;

use super::{Attrs, BuildResult, ExportContext, ExportError};
use crate::attest::Annotation;
use crate::spec::SpecError;
use kiln_worker::images::StoredImage;

/// The keys `type=oci` and `type=docker` accept.
const TARBALL_KEYS: &[&str] = &[
    "dest",
    "tar",
    "name",
    "oci-mediatypes",
    "compression",
    "compression-level",
    "force-compression",
    "rewrite-timestamp",
    "dangling-name-prefix",
];

/// The settings of an image tarball (`type=oci` or `type=docker`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarballSettings {
    /// The file to write; `-` is standard output.
    pub dest: PathBuf,
    /// Image names (`name=a,b`); the first names the image inside the tarball.
    pub names: Vec<String>,
    /// `oci-mediatypes=`: OCI media types, or Docker's; `None` is the type's default.
    pub oci_mediatypes: Option<bool>,
    /// `compression=`: the compression layers are made with.
    pub compression: Option<Compression>,
    /// `compression-level=`.
    pub compression_level: Option<u32>,
    /// `force-compression=`: recompress layers that exist with another compression.
    pub force_compression: bool,
    /// `annotation[-TYPE][[PLATFORM]].KEY=V` attributes (OCI layouts apply them).
    pub annotations: Vec<Annotation>,
}

impl TarballSettings {
    /// Reads the tarball attributes; `dest=` is required.
    pub fn from_attrs(a: &Attrs<'_>) -> Result<Self, SpecError> {
        let (mut s, dest) = Self::read(a)?;
        s.dest = dest.ok_or_else(|| a.missing_dest())?;
        Ok(s)
    }

    /// Reads the tarball attributes and gives `dest=` apart, when set: the settings' own
    /// `dest` stays empty (an image streamed to a store, `--load`, has none).
    pub(crate) fn read(a: &Attrs<'_>) -> Result<(Self, Option<PathBuf>), SpecError> {
        let mut dest = None;
        let mut s = TarballSettings {
            dest: PathBuf::new(),
            names: Vec::new(),
            oci_mediatypes: None,
            compression: None,
            compression_level: None,
            force_compression: false,
            annotations: super::annotation_attrs(a)?,
        };
        a.read(TARBALL_KEYS, true, |k, v| {
            match k {
                "dest" => dest = Some(a.dest(v)?),
                "name" => s.names = super::split_list(v),
                "oci-mediatypes" => s.oci_mediatypes = Some(a.bool(k, v)?),
                "compression" => s.compression = Some(a.compression(v)?),
                "compression-level" => s.compression_level = Some(a.compression_level(v)?),
                "force-compression" => s.force_compression = a.bool(k, v)?,
                "tar" | "rewrite-timestamp" => {
                    a.bool(k, v)?;
                }
                _ => {}
            }
            Ok(())
        })?;
        Ok((s, dest))
    }

    /// The image to write, with blobs a lazy pull left in the registry fetched first.
    pub fn image(
        &self,
        cx: &ExportContext<'_>,
        result: &BuildResult<'_>,
        oci_default: bool,
    ) -> Result<StoredImage, ExportError> {
        let image = result.image(cx.store, self.oci_mediatypes.unwrap_or(oci_default))?;
        kiln_worker::images::tag_image(cx.store, &image, &self.names)?;
        self.fetch_blobs(cx, result)?;
        Ok(image)
    }

    /// Fetches the blobs a lazy pull left in the registry, of every platform's result.
    pub fn fetch_blobs(
        &self,
        cx: &ExportContext<'_>,
        result: &BuildResult<'_>,
    ) -> Result<(), ExportError> {
        for f in result.parts().iter().filter_map(|p| p.rootfs) {
            cx.worker.fetch_blobs(f)?;
        }
        Ok(())
    }
}
