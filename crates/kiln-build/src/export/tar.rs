//! `--output type=tar,dest=FILE` (and buildx's `-o -`): the target's files as a tar.

use std::path::PathBuf;

use super::{check_no_clash, part_dirs};
use super::{io_at, with_rootfs_view, Attrs, BuildResult, ExportContext, ExportError};
use super::{ExportFile, ExportReport, Exporter};
use crate::spec::SpecError;

/// Writes the final filesystem as a tar archive; `dest` `-` is standard output. A
/// multi-platform result's files are under one directory per platform (`linux_amd64/`), or
/// merged at the root with `platform-split=false` (a file two platforms both have is an
/// error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarExporter {
    /// The file to write.
    pub dest: PathBuf,
    /// `platform-split=`: one directory per platform (unset: when there are several).
    pub platform_split: Option<bool>,
}

impl TarExporter {
    /// Reads `type=tar` attributes; `dest=` is required.
    pub fn from_attrs(a: &Attrs<'_>) -> Result<Self, SpecError> {
        let (dest, platform_split) = a.rootfs_dest()?;
        Ok(TarExporter {
            dest,
            platform_split,
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
        let dirs = part_dirs(result, self.platform_split);
        if result.is_multi_platform() && dirs.iter().all(Option::is_none) {
            check_no_clash(cx.worker, result)?;
        }
        let mut out = ExportFile::create(dest)?;
        let mut b = tar::Builder::new(&mut out);
        b.follow_symlinks(false);
        b.mode(tar::HeaderMode::Complete);
        for (part, dir) in result.parts().iter().zip(&dirs) {
            let prefix = dir.as_deref().unwrap_or(".");
            with_rootfs_view(cx.worker, part.rootfs, |root| {
                b.append_dir_all(prefix, root)
                    .map_err(io_at("archiving", root))
            })?;
        }
        b.finish().map_err(io_at("writing", dest))?;
        drop(b);
        out.finish()?;
        Ok(ExportReport {
            kind: self.kind().to_owned(),
            image: None,
        })
    }
}
