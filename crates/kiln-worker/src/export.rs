//! Exporters: a solved target becomes an OCI or Docker tarball, a directory, or a rootfs tar.
//! (The image in the local store and in registries is made by [`crate::images`] and the
//! registry client.)

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use kiln_oci::{OciLayout, Reference};

use crate::engine::{Rootfs, Worker, WorkerError};
use crate::fileop::{self, CopyOptions, Owner};
use crate::images::StoredImage;

fn io_at(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> WorkerError {
    let path = path.to_owned();
    move |source| WorkerError::Io { what, path, source }
}

fn layout_err(e: kiln_oci::LayoutError) -> WorkerError {
    WorkerError::Internal(e.to_string())
}

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
fn temp_beside(dest: &Path) -> Result<(PathBuf, String), WorkerError> {
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
    pub fn create(dest: &Path) -> Result<Self, WorkerError> {
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
    pub fn finish(self) -> Result<(), WorkerError> {
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
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), WorkerError> {
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

fn parse_names(names: &[String]) -> Result<Vec<Reference>, WorkerError> {
    names
        .iter()
        .map(|n| {
            n.parse::<Reference>().map_err(|e| WorkerError::Image {
                reference: n.clone(),
                message: e.to_string(),
            })
        })
        .collect()
}

/// Writes `image` as an OCI layout tarball (`--output type=oci,dest=FILE`).
pub fn oci_archive(
    worker: &Worker,
    fs_: Option<&Rootfs>,
    image: &StoredImage,
    names: &[String],
    dest: &Path,
) -> Result<(), WorkerError> {
    if let Some(f) = fs_ {
        worker.fetch_blobs(f)?;
    }
    let store = worker.store();
    let tmp = tempfile_dir(store.root())?;
    let result = (|| {
        let layout = OciLayout::create(tmp.join("layout")).map_err(layout_err)?;
        let digests = std::iter::once(&image.manifest.digest)
            .chain(std::iter::once(&image.config.digest))
            .chain(image.layers.iter().map(|l| &l.blob.digest));
        for d in digests {
            let to = layout.blob_path(d);
            // An image may list one layer twice (two steps that made the same bytes): the
            // blob is in the layout once. Copying onto the existing name would truncate the
            // store's own blob, which that name is a hard link to.
            if to.exists() {
                continue;
            }
            if let Some(dir) = to.parent() {
                fs::create_dir_all(dir).map_err(io_at("creating", dir))?;
            }
            let from = store.content().blob_path(d);
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
        layout
            .add_manifest(image.manifest.descriptor(), &ref_name)
            .map_err(layout_err)?;
        let mut out = ExportFile::create(dest)?;
        layout.write_archive(&mut out).map_err(layout_err)?;
        out.finish()
    })();
    let _ = fs::remove_dir_all(&tmp);
    result
}

/// Writes `image` in `docker save` format (`--output type=docker,dest=FILE`).
pub fn docker_archive(
    worker: &Worker,
    fs_: Option<&Rootfs>,
    image: &StoredImage,
    names: &[String],
    dest: &Path,
) -> Result<(), WorkerError> {
    if let Some(f) = fs_ {
        worker.fetch_blobs(f)?;
    }
    let refs = parse_names(names)?;
    let mut out = ExportFile::create(dest)?;
    let store = worker.store();
    kiln_oci::write_docker_archive(&mut out, &image.manifest, &refs, &|d| {
        store.content().blob_path(d)
    })
    .map_err(layout_err)?;
    out.finish()
}

/// Runs `f` on a read-only view of the root filesystem (an empty dir for an empty one).
fn with_view<T>(
    worker: &Worker,
    fs_: Option<&Rootfs>,
    f: impl FnOnce(&Path) -> Result<T, WorkerError>,
) -> Result<T, WorkerError> {
    let store = worker.store();
    let snap = match fs_ {
        Some(r) => worker.materialize(r)?,
        None => None,
    };
    let view = match snap {
        Some(s) => store.view(s, None)?,
        None => store.prepare(None, None)?,
    };
    let r = f(&view.rootfs);
    let _ = store.remove(view.id);
    r
}

/// Copies the final filesystem into `dest` (`--output type=local,dest=DIR`).
///
/// A `dest` that is absent or empty gets the files in a temporary directory beside it, renamed
/// into place at the end, so a killed export leaves no half-written tree. A `dest` that already
/// holds files is written into (its other files are the user's and stay).
pub fn local_dir(worker: &Worker, fs_: Option<&Rootfs>, dest: &Path) -> Result<(), WorkerError> {
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
    with_view(worker, fs_, |root| {
        let opts = CopyOptions {
            dest_is_dir: true,
            parents: false,
            exclude: vec![],
            owner: Owner::Preserve,
            chmod: None,
            source_name: "build result".into(),
            extract_archives: false,
        };
        fileop::copy(root, &[".".into()], target, "/", &opts)?;
        Ok(())
    })?;
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
    Ok(())
}

/// Writes the final filesystem as a tar (`--output type=tar,dest=FILE`).
pub fn rootfs_tar(worker: &Worker, fs_: Option<&Rootfs>, dest: &Path) -> Result<(), WorkerError> {
    with_view(worker, fs_, |root| {
        let mut out = ExportFile::create(dest)?;
        let mut b = tar::Builder::new(&mut out);
        b.follow_symlinks(false);
        b.mode(tar::HeaderMode::Complete);
        b.append_dir_all(".", root)
            .map_err(io_at("archiving", root))?;
        b.finish().map_err(io_at("writing", dest))?;
        drop(b);
        out.finish()
    })
}

fn tempfile_dir(root: &Path) -> Result<std::path::PathBuf, WorkerError> {
    let dir = root
        .join("tmp")
        .join(format!("export-{}-{}", std::process::id(), unique()));
    fs::create_dir_all(&dir).map_err(io_at("creating", &dir))?;
    Ok(dir)
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
