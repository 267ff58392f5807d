//! Exporters: a solved target becomes an OCI or Docker tarball, a directory, or a rootfs tar.
//! (The image in the local store and in registries is made by [`crate::images`] and the
//! registry client.)

use std::fs;
use std::io::{self, Write};
use std::path::Path;

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

/// Opens `dest` for writing, `-` meaning standard output.
fn open_dest(dest: &Path) -> Result<Box<dyn Write>, WorkerError> {
    if dest.as_os_str() == "-" {
        return Ok(Box::new(io::stdout().lock()));
    }
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io_at("creating", dir))?;
    }
    let f = fs::File::create(dest).map_err(io_at("creating", dest))?;
    Ok(Box::new(io::BufWriter::with_capacity(1 << 20, f)))
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
            if let Some(dir) = to.parent() {
                fs::create_dir_all(dir).map_err(io_at("creating", dir))?;
            }
            let from = store.content().blob_path(d);
            // Hard links cost nothing; fall back to a copy across filesystems.
            if fs::hard_link(&from, &to).is_err() {
                fs::copy(&from, &to).map_err(io_at("copying", &from))?;
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
        let mut out = open_dest(dest)?;
        layout.write_archive(&mut out).map_err(layout_err)?;
        out.flush().map_err(io_at("writing", dest))
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
    let mut out = open_dest(dest)?;
    let store = worker.store();
    kiln_oci::write_docker_archive(&mut out, &image.manifest, &refs, &|d| {
        store.content().blob_path(d)
    })
    .map_err(layout_err)?;
    out.flush().map_err(io_at("writing", dest))
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
pub fn local_dir(worker: &Worker, fs_: Option<&Rootfs>, dest: &Path) -> Result<(), WorkerError> {
    fs::create_dir_all(dest).map_err(io_at("creating", dest))?;
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
        fileop::copy(root, &[".".into()], dest, "/", &opts)?;
        Ok(())
    })
}

/// Writes the final filesystem as a tar (`--output type=tar,dest=FILE`).
pub fn rootfs_tar(worker: &Worker, fs_: Option<&Rootfs>, dest: &Path) -> Result<(), WorkerError> {
    with_view(worker, fs_, |root| {
        let mut out = open_dest(dest)?;
        let mut b = tar::Builder::new(&mut out);
        b.follow_symlinks(false);
        b.mode(tar::HeaderMode::Complete);
        b.append_dir_all(".", root)
            .map_err(io_at("archiving", root))?;
        b.finish().map_err(io_at("writing", dest))?;
        drop(b);
        out.flush().map_err(io_at("writing", dest))
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
