//! `--output type=local,dest=DIR` (and buildx's `-o DIR`): the target's files in a directory.

use std::fs;
use std::io;
use std::path::PathBuf;

use kiln_worker::fileop::{self, CopyOptions, Owner};

use super::file::temp_beside;
use super::{check_no_clash, part_dirs};
use super::{io_at, with_rootfs_view, Attrs, BuildResult, ExportContext, ExportError};
use super::{ExportReport, Exporter};
use crate::spec::SpecError;

/// Copies the final filesystem into a directory; a multi-platform result's into one
/// directory per platform (`linux_amd64/`, `linux_arm64/`), or all into `dest` with
/// `platform-split=false` (a file two platforms both have is an error).
///
/// A `dest` that is absent or empty gets the files in a temporary directory beside it,
/// renamed into place at the end, so a killed export leaves no half-written tree. A `dest`
/// that already holds files is written into (its other files are the user's and stay).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalExporter {
    /// The directory.
    pub dest: PathBuf,
    /// `platform-split=`: one directory per platform (unset: when there are several).
    pub platform_split: Option<bool>,
}

impl LocalExporter {
    /// Reads `type=local` attributes; `dest=` is required.
    pub fn from_attrs(a: &Attrs<'_>) -> Result<Self, SpecError> {
        let (dest, platform_split) = a.rootfs_dest()?;
        Ok(LocalExporter {
            dest,
            platform_split,
        })
    }
}

impl Exporter for LocalExporter {
    fn kind(&self) -> &str {
        "local"
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
        let empty = match fs::read_dir(dest) {
            Ok(mut d) => d.next().is_none(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => return Err(io_at("reading", dest)(e)),
        };
        let staging = if empty {
            let (dir, prefix) = temp_beside(dest)?;
            Some(
                tempfile::Builder::new()
                    .prefix(&prefix)
                    .tempdir_in(&dir)
                    .map_err(io_at("creating a temporary directory beside", dest))?,
            )
        } else {
            None
        };
        let target = staging.as_ref().map_or(dest, |t| t.path());
        for (part, dir) in result.parts().iter().zip(&dirs) {
            let into = match dir {
                Some(d) => target.join(d),
                None => target.to_owned(),
            };
            fs::create_dir_all(&into).map_err(io_at("creating", &into))?;
            with_rootfs_view(cx.worker, part.rootfs, |root| {
                let opts = CopyOptions {
                    dest_is_dir: true,
                    parents: false,
                    exclude: vec![],
                    owner: Owner::Preserve,
                    chmod: None,
                    source_name: "build result".into(),
                    extract_archives: false,
                };
                fileop::copy(root, &[".".into()], &into, "/", &opts)
                    .map_err(kiln_worker::engine::WorkerError::from)?;
                Ok(())
            })?;
        }
        if let Some(t) = staging {
            let tmp = t.keep();
            // rename(2) replaces an empty directory; the copy is complete, so sync it first.
            if let Ok(d) = fs::File::open(&tmp) {
                use std::os::fd::AsRawFd;
                // SAFETY: plain syscall on a valid fd; a failure only loses the early flush.
                unsafe { libc::syncfs(d.as_raw_fd()) };
            }
            fs::rename(&tmp, dest).map_err(|e| {
                let _ = fs::remove_dir_all(&tmp);
                io_at("renaming into place", dest)(e)
            })?;
        }
        Ok(ExportReport {
            kind: self.kind().to_owned(),
            image: None,
        })
    }
}
