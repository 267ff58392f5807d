//! Files and directories an export writes: under a temporary name beside the destination,
//! renamed into place only when complete, so a killed or failed export leaves the previous
//! file whole.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{io_at, ExportError};

/// An export file being written under a temporary name beside its destination. Only
/// [`ExportFile::finish`] puts it in place (flushed, synced, renamed over the old file), so a
/// killed or failed export leaves the previous file whole instead of a truncated one.
pub struct ExportFile {
    dest: PathBuf,
    out: ExportSink,
}

enum ExportSink {
    Stdout(io::StdoutLock<'static>),
    File(io::BufWriter<tempfile::NamedTempFile>),
}

/// The directory `dest` lives in (created if missing) and the `.NAME.tmp-` prefix of the
/// temporary file or directory that is written there and renamed onto `dest` at the end.
pub(crate) fn temp_beside(dest: &Path) -> Result<(PathBuf, String), ExportError> {
    let dir = match dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_owned(),
        None => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(io_at("creating", &dir))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((dir, format!(".{name}.tmp-")))
}

impl ExportFile {
    /// Starts writing `dest`; `-` means standard output (written as it comes).
    pub fn create(dest: &Path) -> Result<Self, ExportError> {
        if dest.as_os_str() == "-" {
            return Ok(ExportFile {
                dest: dest.to_owned(),
                out: ExportSink::Stdout(io::stdout().lock()),
            });
        }
        let (dir, prefix) = temp_beside(dest)?;
        // Same directory, so the final rename never crosses filesystems.
        let tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .tempfile_in(&dir)
            .map_err(io_at("creating a temporary file beside", dest))?;
        Ok(ExportFile {
            dest: dest.to_owned(),
            out: ExportSink::File(io::BufWriter::with_capacity(1 << 20, tmp)),
        })
    }

    /// Makes the written bytes the destination's content (fsync, then rename over it).
    pub fn finish(self) -> Result<(), ExportError> {
        let dest = self.dest;
        match self.out {
            ExportSink::Stdout(mut s) => s.flush().map_err(io_at("writing", &dest)),
            ExportSink::File(buf) => {
                let tmp = buf
                    .into_inner()
                    .map_err(|e| io_at("writing", &dest)(e.into_error()))?;
                tmp.as_file().sync_all().map_err(io_at("syncing", &dest))?;
                tmp.persist(&dest)
                    .map_err(|e| io_at("renaming into place", &dest)(e.error))?;
                if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
                    if let Ok(d) = fs::File::open(dir) {
                        let _ = d.sync_all();
                    }
                }
                Ok(())
            }
        }
    }
}

impl Write for ExportFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.out {
            ExportSink::Stdout(s) => s.write(buf),
            ExportSink::File(f) => f.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            ExportSink::Stdout(s) => s.flush(),
            ExportSink::File(f) => f.flush(),
        }
    }
}

/// Writes `bytes` to `path` atomically (a temporary file beside it, synced, then renamed), for
/// `--metadata-file` and other small result files a script may read while kiln runs.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    if path.as_os_str() == "-" {
        let mut out = io::stdout().lock();
        return out
            .write_all(bytes)
            .and_then(|()| out.flush())
            .map_err(io_at("writing", path));
    }
    // Creates the directory if missing, as `ExportFile::create` does.
    temp_beside(path)?;
    kiln_fs::write_atomic(path, bytes, kiln_fs::Durability::Fsync)
        .map_err(|e| io_at(e.step.action(), path)(e.source))
}
