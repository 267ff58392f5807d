//! Deleting snapshot trees off the build's path.
//!
//! On ext4, deleting a tree of ~100,000 files makes every file created in the following
//! minutes slow: before reusing a free inode the allocator reads the deletion time of each
//! recently freed one near it (`recently_deleted` in the kernel's `fs/ext4/ialloc.c`; up to
//! 60 s after the deletion, 6 min while the inode table block is dirty) and skips it, so each
//! create walks past all of them. A profile of a 11,108-file copy right after deleting
//! 100,000 files spent 57 % of its time in `recently_deleted` and `find_get_block_common`
//! (kernel time 2.2 s against 0.4 s on a quiet filesystem). So the leftovers a build finds
//! when it starts (snapshots of killed builds) are renamed into `snapshots/trash/` — one
//! metadata write per tree, whatever it holds — and deleted by `prune`, the command users run
//! to get space back, rather than just before the build creates its own files.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Result, StoreError};

/// The trash directory's name under `snapshots/` (not a number, so never taken for a
/// snapshot or a leftover).
pub(crate) const TRASH_DIR: &str = "trash";

/// Moves the tree at `dir` into `trash` (created if missing). Returns false, leaving `dir`
/// where it is, when it cannot be renamed there (another filesystem); true when it was moved
/// or was already gone.
pub(crate) fn move_to_trash(dir: &Path, trash: &Path) -> Result<bool> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    fs::create_dir_all(trash).map_err(|e| StoreError::io("creating the trash dir", trash, e))?;
    let base = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = format!(
        "{base}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    match fs::rename(dir, trash.join(name)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => Ok(false),
        Err(e) => Err(StoreError::io("moving a snapshot into the trash", dir, e)),
    }
}

/// Deletes everything in `trash`; returns how many trees went. Trees another process is
/// deleting at the same time are skipped without error.
pub(crate) fn empty_trash(trash: &Path) -> Result<usize> {
    let entries: Vec<PathBuf> = match fs::read_dir(trash) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(StoreError::io("reading the trash dir", trash, e)),
    };
    let mut gone = 0;
    for p in entries {
        let res = match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&p),
            Ok(_) => fs::remove_file(&p),
            Err(e) => Err(e),
        };
        match res {
            Ok(()) => gone += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("emptying the trash", &p, e)),
        }
    }
    Ok(gone)
}

impl crate::Store {
    /// Where discarded snapshot trees wait for [`Store::empty_trash`](crate::Store::empty_trash).
    pub(crate) fn trash_dir(&self) -> PathBuf {
        self.root().join("snapshots").join(TRASH_DIR)
    }

    /// Unmounts the snapshot tree `dir` and moves it into the trash (deleting it only when it
    /// cannot be moved there).
    pub(crate) fn discard_snapshot_dir(&self, dir: &Path) -> Result<()> {
        let rootfs = dir.join("rootfs");
        crate::sys::unmount(&rootfs).map_err(|e| StoreError::Mount {
            target: rootfs.clone(),
            message: format!("unmounting: {e}"),
        })?;
        if !move_to_trash(dir, &self.trash_dir())? {
            self.snapshotter().remove(dir)?;
        }
        Ok(())
    }

    /// Deletes the snapshot trees that reclaiming leftovers moved aside; returns how many.
    /// `prune` calls it. On ext4, files created in the minutes after a large deletion are
    /// slow to create (see the module note), so run it after builds rather than before.
    pub fn empty_trash(&self) -> Result<usize> {
        empty_trash(&self.trash_dir())
    }
}
