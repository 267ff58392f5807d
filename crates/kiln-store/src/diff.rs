//! Turning a snapshot into an OCI layer tar.
//!
//! Two ways to find what changed: read an overlay upper dir directly (its whiteouts are char
//! devices 0/0 and its opaque dirs carry `trusted.overlay.opaque=y`), or compare two full
//! trees (the copying snapshotter). Both produce a sorted change list, and one writer turns it
//! into tar entries: whiteouts become `.wh.<name>`, opaque dirs get `.wh..wh..opq` right after
//! their own entry (OCI image spec, layer.md "Whiteouts").

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::sys;
use crate::tarfmt::{EntryKind, TarHeader, TarWriter};

/// Options that change the bytes of an exported layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiffOptions {
    /// Clamp every mtime to at most this (the build's `SOURCE_DATE_EPOCH`), for reproducible
    /// layers. The library never reads the environment itself.
    pub source_date_epoch: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// Add or replace this path with what is in the tree.
    Entry(Vec<u8>),
    /// Delete this path.
    Whiteout(Vec<u8>),
    /// Hide everything below this dir that lower layers had.
    Opaque(Vec<u8>),
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    if rel.is_empty() {
        return name.to_vec();
    }
    let mut v = Vec::with_capacity(rel.len() + 1 + name.len());
    v.extend_from_slice(rel);
    v.push(b'/');
    v.extend_from_slice(name);
    v
}

fn sorted_entries(dir: &Path) -> io::Result<Vec<(Vec<u8>, fs::Metadata)>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let md = e.metadata()?;
        v.push((e.file_name().as_bytes().to_vec(), md));
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

fn is_overlay_whiteout(md: &fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

/// Changes recorded in an overlay upper dir.
pub(crate) fn upper_changes(upper: &Path) -> io::Result<Vec<Change>> {
    let mut out = Vec::new();
    walk_upper(upper, b"", &mut out)?;
    Ok(out)
}

fn walk_upper(dir: &Path, rel: &[u8], out: &mut Vec<Change>) -> io::Result<()> {
    for (name, md) in sorted_entries(dir)? {
        let p = join(rel, &name);
        if is_overlay_whiteout(&md) {
            out.push(Change::Whiteout(p));
            continue;
        }
        out.push(Change::Entry(p.clone()));
        if md.is_dir() {
            let abs = dir.join(std::ffi::OsStr::from_bytes(&name));
            let c = sys::cpath(&abs)?;
            if sys::lgetxattr(&c, sys::overlay_opaque_xattr())?.as_deref() == Some(b"y") {
                out.push(Change::Opaque(p.clone()));
            }
            walk_upper(&abs, &p, out)?;
        }
    }
    Ok(())
}

/// Changes between a parent tree (`None`: empty) and a full child tree.
pub(crate) fn tree_changes(old: Option<&Path>, new: &Path) -> io::Result<Vec<Change>> {
    let mut out = Vec::new();
    compare(old, new, b"", &mut out)?;
    Ok(out)
}

fn add_all(dir: &Path, rel: &[u8], out: &mut Vec<Change>) -> io::Result<()> {
    for (name, md) in sorted_entries(dir)? {
        let p = join(rel, &name);
        out.push(Change::Entry(p.clone()));
        if md.is_dir() {
            add_all(&dir.join(std::ffi::OsStr::from_bytes(&name)), &p, out)?;
        }
    }
    Ok(())
}

fn xattrs_of(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = sys::cpath(path)?;
    let mut v = Vec::new();
    for name in sys::llistxattr(&c)? {
        if sys::is_overlay_xattr(&name) {
            continue;
        }
        if let Some(val) = sys::lgetxattr(&c, &name)? {
            v.push((name, val));
        }
    }
    v.sort();
    Ok(v)
}

fn same_metadata(a: &fs::Metadata, b: &fs::Metadata, pa: &Path, pb: &Path) -> io::Result<bool> {
    if a.mode() != b.mode()
        || a.uid() != b.uid()
        || a.gid() != b.gid()
        || a.rdev() != b.rdev()
        || (!a.is_dir()
            && (a.size() != b.size() || a.mtime() != b.mtime() || a.mtime_nsec() != b.mtime_nsec()))
    {
        return Ok(false);
    }
    if a.file_type().is_symlink() && fs::read_link(pa)? != fs::read_link(pb)? {
        return Ok(false);
    }
    Ok(xattrs_of(pa)? == xattrs_of(pb)?)
}

fn compare(old: Option<&Path>, new: &Path, rel: &[u8], out: &mut Vec<Change>) -> io::Result<()> {
    let news = sorted_entries(new)?;
    let olds = match old {
        Some(o) => sorted_entries(o)?,
        None => Vec::new(),
    };
    let old_map: HashMap<&[u8], &fs::Metadata> =
        olds.iter().map(|(n, m)| (n.as_slice(), m)).collect();
    let new_names: std::collections::HashSet<&[u8]> =
        news.iter().map(|(n, _)| n.as_slice()).collect();
    // Merge both name lists in sorted order so whiteouts sit where the names were.
    let mut names: Vec<&[u8]> = news.iter().map(|(n, _)| n.as_slice()).collect();
    names.extend(
        olds.iter()
            .map(|(n, _)| n.as_slice())
            .filter(|n| !new_names.contains(n)),
    );
    names.sort();
    let new_map: HashMap<&[u8], &fs::Metadata> =
        news.iter().map(|(n, m)| (n.as_slice(), m)).collect();
    for name in names {
        let p = join(rel, name);
        let os = std::ffi::OsStr::from_bytes(name);
        let npath = new.join(os);
        match (old_map.get(name), new_map.get(name)) {
            (Some(_), None) => out.push(Change::Whiteout(p)),
            (None, Some(nm)) => {
                out.push(Change::Entry(p.clone()));
                if nm.is_dir() {
                    add_all(&npath, &p, out)?;
                }
            }
            (Some(om), Some(nm)) => {
                let opath = old.map(|o| o.join(os)).unwrap_or_default();
                if om.is_dir() && nm.is_dir() {
                    let mut sub = Vec::new();
                    compare(Some(&opath), &npath, &p, &mut sub)?;
                    if !sub.is_empty() || !same_metadata(om, nm, &opath, &npath)? {
                        out.push(Change::Entry(p.clone()));
                        out.extend(sub);
                    }
                } else if om.file_type() != nm.file_type() {
                    out.push(Change::Entry(p.clone()));
                    if nm.is_dir() {
                        add_all(&npath, &p, out)?;
                    }
                } else if !same_metadata(om, nm, &opath, &npath)? {
                    out.push(Change::Entry(p));
                }
            }
            (None, None) => {}
        }
    }
    Ok(())
}

fn whiteout_path(p: &[u8], marker: &[u8]) -> Vec<u8> {
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => {
            let mut v = p[..=i].to_vec();
            v.extend_from_slice(marker);
            v.extend_from_slice(&p[i + 1..]);
            v
        }
        None => {
            let mut v = marker.to_vec();
            v.extend_from_slice(p);
            v
        }
    }
}

/// Writes `changes` (paths relative to `root`) as tar entries.
pub(crate) fn write_changes<W: Write>(
    root: &Path,
    changes: &[Change],
    tar: &mut TarWriter<W>,
    opts: &DiffOptions,
) -> io::Result<()> {
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let clamp = |t: i64| match opts.source_date_epoch {
        Some(e) if t > e => e,
        _ => t,
    };
    for c in changes {
        match c {
            Change::Whiteout(p) => {
                let h = TarHeader::new(whiteout_path(p, b".wh."), EntryKind::File);
                tar.append(&h, None)?;
            }
            Change::Opaque(p) => {
                let mut q = p.clone();
                q.extend_from_slice(b"/.wh..wh..opq");
                tar.append(&TarHeader::new(q, EntryKind::File), None)?;
            }
            Change::Entry(p) => {
                let abs: PathBuf = root.join(std::ffi::OsStr::from_bytes(p));
                let md = fs::symlink_metadata(&abs)?;
                let ft = md.file_type();
                let kind = if ft.is_dir() {
                    EntryKind::Dir
                } else if ft.is_symlink() {
                    EntryKind::Symlink
                } else if ft.is_file() {
                    EntryKind::File
                } else if ft.is_char_device() {
                    EntryKind::Char
                } else if ft.is_block_device() {
                    EntryKind::Block
                } else if ft.is_fifo() {
                    EntryKind::Fifo
                } else {
                    continue; // sockets are not archivable
                };
                let mut h = TarHeader::new(p.clone(), kind);
                h.mode = md.mode() & 0o7777;
                h.uid = md.uid();
                h.gid = md.gid();
                h.mtime = clamp(md.mtime());
                h.xattrs = xattrs_of(&abs)?;
                if matches!(kind, EntryKind::Char | EntryKind::Block) {
                    h.dev = sys::dev_parts(md.rdev());
                }
                if kind == EntryKind::Symlink {
                    h.link = fs::read_link(&abs)?.as_os_str().as_bytes().to_vec();
                }
                if kind != EntryKind::Dir && md.nlink() > 1 {
                    let key = (md.dev(), md.ino());
                    if let Some(first) = links.get(&key) {
                        h.kind = EntryKind::Hardlink;
                        h.link = first.clone();
                        h.xattrs.clear();
                        tar.append(&h, None)?;
                        continue;
                    }
                    links.insert(key, p.clone());
                }
                if kind == EntryKind::File {
                    h.size = md.len();
                    let mut f = File::open(&abs)?;
                    tar.append(&h, Some(&mut f))?;
                } else {
                    tar.append(&h, None)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whiteout_names_keep_the_parent() {
        assert_eq!(whiteout_path(b"a/b/c", b".wh."), b"a/b/.wh.c");
        assert_eq!(whiteout_path(b"top", b".wh."), b".wh.top");
    }

    #[test]
    fn tree_compare_finds_adds_changes_and_deletes() {
        let old = tempfile::tempdir().unwrap();
        let new = tempfile::tempdir().unwrap();
        for d in [old.path(), new.path()] {
            fs::create_dir(d.join("keep")).unwrap();
            fs::write(d.join("keep/same"), "x").unwrap();
        }
        let t = filetime_of(&old.path().join("keep/same"));
        set_mtime(&new.path().join("keep/same"), t);
        set_mtime(
            &new.path().join("keep"),
            filetime_of(&old.path().join("keep")),
        );
        fs::write(old.path().join("gone"), "x").unwrap();
        fs::write(new.path().join("added"), "y").unwrap();
        let ch = tree_changes(Some(old.path()), new.path()).unwrap();
        assert_eq!(
            ch,
            vec![
                Change::Entry(b"added".to_vec()),
                Change::Whiteout(b"gone".to_vec())
            ]
        );
    }

    fn filetime_of(p: &Path) -> (i64, i64) {
        let m = fs::symlink_metadata(p).unwrap();
        (m.mtime(), m.mtime_nsec())
    }

    fn set_mtime(p: &Path, (s, ns): (i64, i64)) {
        let dir = sys::open_dir(p.parent().unwrap()).unwrap();
        let name = sys::cstr(p.file_name().unwrap().as_bytes()).unwrap();
        use std::os::fd::AsFd;
        sys::set_times_at(dir.as_fd(), &name, s, ns).unwrap();
    }
}
