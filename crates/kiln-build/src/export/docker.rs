//! `--output type=docker,dest=FILE`: the image in `docker save` format.

use kiln_oci::compression::Compression;

use super::archive::TarballSettings;
use super::{parse_names, Attrs, BuildResult, ExportContext, ExportError, ExportFile};
use super::{ExportReport, Exporter};
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
        let image = self.settings.image(cx, result, false)?;
        let refs = parse_names(&self.settings.names)?;
        let mut out = ExportFile::create(&self.settings.dest)?;
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
