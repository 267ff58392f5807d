//! The copying snapshotter: every snapshot is a full tree; preparing copies the parent's.
//! Used where overlayfs cannot be mounted (no root, nested overlay, old kernels).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{ApplyLayout, DiffSource, Mount, Snapshotter, SnapshotterKind};
use crate::error::{Result, StoreError};
use crate::sys;

/// Full-copy snapshots.
#[derive(Debug, Default)]
pub struct CopySnapshotter;

impl Snapshotter for CopySnapshotter {
    fn kind(&self) -> SnapshotterKind {
        SnapshotterKind::Copy
    }

    fn prepare(&self, dir: &Path, parents: &[PathBuf]) -> Result<PathBuf> {
        let fsd = dir.join("fs");
        fs::create_dir_all(dir).map_err(|e| StoreError::io("creating", dir, e))?;
        match parents.first() {
            Some(p) => {
                copy_tree(p, &fsd).map_err(|e| StoreError::io("copying parent snapshot", p, e))?
            }
            None => fs::create_dir_all(&fsd).map_err(|e| StoreError::io("creating", &fsd, e))?,
        }
        Ok(fsd)
    }

    fn view(&self, dir: &Path, parents: &[PathBuf]) -> Result<PathBuf> {
        // A view must not be written to; copying would be as slow as prepare, so the view
        // is the parent's tree itself and read-only by contract.
        fs::create_dir_all(dir).map_err(|e| StoreError::io("creating", dir, e))?;
        match parents.first() {
            Some(p) => Ok(p.clone()),
            None => {
                let fsd = dir.join("fs");
                fs::create_dir_all(&fsd).map_err(|e| StoreError::io("creating", &fsd, e))?;
                Ok(fsd)
            }
        }
    }

    fn commit(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }

    fn mounts(&self, dir: &Path, parents: &[PathBuf], writable: bool) -> Vec<Mount> {
        let source = if writable {
            dir.join("fs")
        } else {
            parents.first().cloned().unwrap_or_else(|| dir.join("fs"))
        };
        let mut options = vec!["rbind".to_owned()];
        options.push(if writable { "rw" } else { "ro" }.to_owned());
        vec![Mount {
            fstype: "bind".into(),
            source,
            options,
        }]
    }

    fn diff_source(&self, dir: &Path, parents: &[PathBuf]) -> DiffSource {
        DiffSource::Trees {
            old: parents.first().cloned(),
            new: dir.join("fs"),
        }
    }

    fn apply_layout(&self) -> ApplyLayout {
        ApplyLayout::Merged
    }
}

/// Copies one non-directory entry with its metadata (hardlinks are not preserved).
pub(crate) fn copy_one(src: &Path, dst: &Path) -> io::Result<()> {
    copy_entry(src, dst, &mut HashMap::new())
}

/// Copies a tree keeping types, modes, owners, xattrs, times, symlinks and hardlinks.
pub(crate) fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let mut links = HashMap::new();
    copy_entry(src, dst, &mut links)?;
    Ok(())
}

fn copy_entry(src: &Path, dst: &Path, links: &mut HashMap<(u64, u64), PathBuf>) -> io::Result<()> {
    let md = fs::symlink_metadata(src)?;
    let ft = md.file_type();
    if !ft.is_dir() && md.nlink() > 1 {
        if let Some(first) = links.get(&(md.dev(), md.ino())) {
            return fs::hard_link(first, dst);
        }
        links.insert((md.dev(), md.ino()), dst.to_owned());
    }
    if ft.is_dir() {
        fs::create_dir(dst)?;
        let mut names: Vec<_> = fs::read_dir(src)?.collect::<io::Result<Vec<_>>>()?;
        names.sort_by_key(|e| e.file_name());
        for e in names {
            copy_entry(&e.path(), &dst.join(e.file_name()), links)?;
        }
    } else if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, dst)?;
    } else if ft.is_file() {
        fs::copy(src, dst)?;
    } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
        let c = sys::cpath(dst)?;
        // SAFETY: valid C string.
        let r = unsafe {
            libc::mknod(
                c.as_ptr(),
                md.mode() as libc::mode_t,
                md.rdev() as libc::dev_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
    } else {
        return Ok(()); // sockets
    }
    copy_metadata(src, dst, &md)
}

pub(crate) fn copy_metadata(src: &Path, dst: &Path, md: &fs::Metadata) -> io::Result<()> {
    let parent = sys::open_dir(dst.parent().unwrap_or(Path::new("/")))?;
    let name = sys::cstr(dst.file_name().map(|n| n.as_bytes()).unwrap_or(b"."))?;
    use std::os::fd::AsFd;
    if sys::is_root() {
        sys::lchown_at(parent.as_fd(), &name, md.uid(), md.gid())?;
    }
    let sc = sys::cpath(src)?;
    let dc = sys::cpath(dst)?;
    for k in sys::llistxattr(&sc)? {
        if let Some(v) = sys::lgetxattr(&sc, &k)? {
            sys::lsetxattr(&dc, &k, &v)?;
        }
    }
    if !md.file_type().is_symlink() {
        fs::set_permissions(
            dst,
            std::os::unix::fs::PermissionsExt::from_mode(md.mode() & 0o7777),
        )?;
    }
    sys::set_times_at(parent.as_fd(), &name, md.mtime(), md.mtime_nsec())
}
