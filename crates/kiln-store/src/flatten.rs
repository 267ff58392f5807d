//! Merging a stack of overlay layer dirs into one plain tree, for chains deeper than
//! overlayfs can stack.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::snapshot::copy_one;
use crate::sys;

/// Builds in `dst` the tree an overlay mount of `layers` (nearest first) would show.
pub(crate) fn merge_layers(layers: &[PathBuf], dst: &Path) -> io::Result<()> {
    fs::create_dir_all(dst)?;
    for layer in layers.iter().rev() {
        overlay_onto(layer, dst)?;
    }
    Ok(())
}

fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn overlay_onto(src: &Path, dst: &Path) -> io::Result<()> {
    let mut ents: Vec<_> = fs::read_dir(src)?.collect::<io::Result<Vec<_>>>()?;
    ents.sort_by_key(|e| e.file_name());
    for e in ents {
        let s = e.path();
        let d = dst.join(e.file_name());
        let md = fs::symlink_metadata(&s)?;
        if md.file_type().is_char_device() && md.rdev() == 0 {
            remove_any(&d)?;
            continue;
        }
        if md.is_dir() {
            let opaque = sys::lgetxattr(&sys::cpath(&s)?, sys::overlay_opaque_xattr())?.as_deref()
                == Some(b"y");
            let is_dir = fs::symlink_metadata(&d)
                .map(|m| m.is_dir())
                .unwrap_or(false);
            if opaque || !is_dir {
                remove_any(&d)?;
                fs::create_dir(&d)?;
            }
            overlay_onto(&s, &d)?;
            crate::snapshot::copy_meta(&s, &d, &md)?;
        } else {
            remove_any(&d)?;
            copy_one(&s, &d)?;
        }
    }
    Ok(())
}
