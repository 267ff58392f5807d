//! Snapshotters: how a chain of committed snapshots becomes a writable or read-only rootfs.
//!
//! Each snapshot lives in `<root>/snapshots/<id>/`: `fs/` holds its content (for overlay: the
//! upper dir, i.e. only what changed; for copy: the full tree), `work/` is overlay's work dir
//! and `rootfs/` the mount point. The [`Snapshotter`] trait is the containerd-sized interface;
//! [`crate::Store`] keeps the records and calls it.

mod copy;
mod overlay;

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub use copy::CopySnapshotter;
pub(crate) use copy::{copy_metadata as copy_meta, copy_one};
pub use overlay::OverlaySnapshotter;

use crate::error::{Result, StoreError};

/// How many lower dirs one overlay mount may stack.
pub(crate) fn overlay_max_lowers() -> usize {
    overlay::MAX_LOWER_LAYERS
}

/// Which snapshotter a store uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SnapshotterKind {
    /// overlayfs: a snapshot stores only its changes; a rootfs is an overlay mount.
    Overlay,
    /// Full copies: works anywhere, costs a copy per prepare.
    Copy,
}

/// A mount as containerd describes one: what a runtime would pass to mount(2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Filesystem type ("overlay", "bind").
    pub fstype: String,
    /// Source ("overlay" or a path).
    pub source: PathBuf,
    /// Options, e.g. `lowerdir+=…`, `upperdir=…`, `ro`.
    pub options: Vec<String>,
}

/// Disk usage of one snapshot's own content.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotUsage {
    /// Bytes allocated on disk.
    pub bytes: u64,
    /// Inodes.
    pub inodes: u64,
}

/// Where a snapshot's changes are read from when it is exported as a layer.
#[derive(Debug, Clone)]
pub enum DiffSource {
    /// An overlay upper dir: whiteouts are 0/0 char devices, opaque dirs carry an xattr.
    Upper(PathBuf),
    /// Two full trees to compare (`old` is `None` for a base snapshot).
    Trees {
        /// The parent's tree.
        old: Option<PathBuf>,
        /// The snapshot's tree.
        new: PathBuf,
    },
}

/// How a layer is unpacked into a new snapshot's `fs/` dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyLayout {
    /// Into an empty upper dir, whiteouts written as overlay whiteouts.
    OverlayUpper,
    /// Into a full copy of the parent, whiteouts deleting.
    Merged,
}

/// The snapshot operations, sized like containerd's. `dir` is the snapshot's own directory;
/// `parents` are the `fs/` dirs of its committed ancestors, nearest first.
pub trait Snapshotter: Send + Sync + std::fmt::Debug {
    /// Which implementation this is.
    fn kind(&self) -> SnapshotterKind;
    /// Creates a writable snapshot in `dir` over `parents` and returns its mounted rootfs.
    fn prepare(&self, dir: &Path, parents: &[PathBuf]) -> Result<PathBuf>;
    /// Creates a read-only view of `parents` in `dir` and returns its rootfs.
    fn view(&self, dir: &Path, parents: &[PathBuf]) -> Result<PathBuf>;
    /// Turns the writable snapshot in `dir` into a committed one (unmounts it).
    fn commit(&self, dir: &Path) -> Result<()>;
    /// The mounts that would make up the rootfs of `dir` over `parents`.
    fn mounts(&self, dir: &Path, parents: &[PathBuf], writable: bool) -> Vec<Mount>;
    /// Where to read the snapshot's changes for a layer.
    fn diff_source(&self, dir: &Path, parents: &[PathBuf]) -> DiffSource;
    /// How to unpack a layer into a new snapshot of this kind.
    fn apply_layout(&self) -> ApplyLayout;
    /// Unmounts (if mounted) and deletes the snapshot.
    fn remove(&self, dir: &Path) -> Result<()> {
        let rootfs = dir.join("rootfs");
        crate::sys::unmount(&rootfs).map_err(|e| StoreError::Mount {
            target: rootfs.clone(),
            message: format!("unmounting: {e}"),
        })?;
        match fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io("removing snapshot", dir, e)),
        }
    }
    /// Disk usage of the snapshot's own content.
    fn usage(&self, dir: &Path) -> Result<SnapshotUsage> {
        let mut u = SnapshotUsage::default();
        let mut seen = std::collections::HashSet::new();
        du(&dir.join("fs"), &mut u, &mut seen).map_err(|e| StoreError::io("measuring", dir, e))?;
        Ok(u)
    }
}

fn du(
    p: &Path,
    u: &mut SnapshotUsage,
    seen: &mut std::collections::HashSet<(u64, u64)>,
) -> io::Result<()> {
    let md = match fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if seen.insert((md.dev(), md.ino())) {
        u.bytes += md.blocks() * 512;
        u.inodes += 1;
    }
    if md.is_dir() {
        for e in fs::read_dir(p)? {
            du(&e?.path(), u, seen)?;
        }
    }
    Ok(())
}

/// Picks overlayfs when a probe mount under `snapshots` works, else the copying snapshotter.
/// Returns the choice and a sentence saying why, for `kiln` to report.
pub fn detect(snapshots: &Path) -> (Box<dyn Snapshotter>, String) {
    match overlay::probe(snapshots) {
        Ok(()) => (
            Box::new(OverlaySnapshotter::new(snapshots.to_path_buf())),
            "overlayfs (probe mount succeeded)".to_owned(),
        ),
        Err(why) => (
            Box::new(CopySnapshotter),
            format!("copy (overlayfs unavailable: {why})"),
        ),
    }
}
