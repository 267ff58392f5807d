//! `--output type=tar,dest=FILE` (and buildx's `-o -`): the target's files as a tar.

use std::path::PathBuf;

use super::{io_at, with_rootfs_view, Attrs, BuildResult, ExportContext, ExportError};
use super::{ExportFile, ExportReport, Exporter};
use crate::spec::SpecError;

/// Writes the final filesystem as a tar archive; `dest` `-` is standard output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarExporter {
    /// The file to write.
    pub dest: PathBuf,
}

impl TarExporter {
    /// Reads `type=tar` attributes; `dest=` is required.
    pub fn from_attrs(a: &Attrs<'_>) -> Result<Self, SpecError> {
        Ok(TarExporter {
            dest: a.rootfs_dest()?,
        })
    }
}

impl Exporter for TarExporter {
    fn kind(&self) -> &str {
        "tar"
    }

    fn export(
        &self,
        cx: &ExportContext<'_>,
        result: &BuildResult<'_>,
    ) -> Result<ExportReport, ExportError> {
        let dest = self.dest.as_path();
        with_rootfs_view(cx.worker, result.rootfs, |root| {
            let mut out = ExportFile::create(dest)?;
            let mut b = tar::Builder::new(&mut out);
            b.follow_symlinks(false);
            b.mode(tar::HeaderMode::Complete);
            b.append_dir_all(".", root)
                .map_err(io_at("archiving", root))?;
            b.finish().map_err(io_at("writing", dest))?;
            drop(b);
            out.finish()
        })?;
        Ok(ExportReport {
            kind: self.kind().to_owned(),
            image: None,
        })
    }
}
