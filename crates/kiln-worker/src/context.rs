//! The local build context: a walk of the directory honouring `.dockerignore`, with every
//! regular file's sha256 — hashed in parallel, and skipped when a stat cache says the file
//! has not changed since the last build (same inode, size, mtime and ctime).
//!
//! Keys derived from the context use file content, mode and ownership, never mtimes.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use kiln_oci::{Algorithm, Digest, Hasher};

use crate::fileop;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Why the context could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("cannot read build context {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("build context {0} is not a directory")]
    NotADirectory(PathBuf),
}

/// What kind of entry a context path is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum EntryKind {
    Dir,
    File {
        size: u64,
        digest: Digest,
    },
    Symlink {
        target: String,
    },
    /// A named pipe: `COPY` recreates it, as BuildKit does.
    Fifo,
    /// A character (`block: false`) or block device node, keyed by its device number.
    Device {
        block: bool,
        rdev: u64,
    },
}

/// One path of the context, relative to its root, with `/` separators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextEntry {
    pub kind: EntryKind,
    /// Permission bits and setuid/setgid/sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A hashed build context: every path that survived `.dockerignore`, in sorted order.
#[derive(Debug, Clone)]
pub struct ContextIndex {
    root: PathBuf,
    entries: BTreeMap<String, ContextEntry>,
    /// Files hashed this time (not found unchanged in the stat cache).
    pub hashed_files: usize,
}

/// The stat fields that must all match for a cached file digest to be reused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StatStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl StatStamp {
    fn of(m: &fs::Metadata) -> Self {
        StatStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        }
    }
}

/// One walked path: its entry, its stat stamp (files), and whether it was hashed afresh.
type Hashed = (String, ContextEntry, Option<(StatStamp, Digest)>, bool);

#[derive(Default, Serialize, Deserialize)]
struct StatCache {
    files: BTreeMap<String, (StatStamp, Digest)>,
}

impl ContextIndex {
    /// Walks and hashes `root`. `excluded(path, is_dir)` says whether a relative path is
    /// left out (`.dockerignore`); an excluded directory is still entered when
    /// `may_reinclude` says an exception pattern could bring back something below it.
    /// `stat_cache` is a file where digests of unchanged files are remembered between builds.
    pub fn scan(
        root: &Path,
        excluded: &(dyn Fn(&str, bool) -> bool + Sync),
        may_reinclude: &(dyn Fn(&str) -> bool + Sync),
        stat_cache: Option<&Path>,
    ) -> Result<Self, ContextError> {
        let io_err = |path: &Path, source| ContextError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(root).map_err(|e| io_err(root, e))?;
        if !meta.is_dir() {
            return Err(ContextError::NotADirectory(root.to_owned()));
        }
        let cache: StatCache = stat_cache
            .and_then(|p| fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();

        // Walk first (cheap, sequential), then hash the files that need it in parallel.
        let mut listed: Vec<(String, fs::Metadata, PathBuf)> = Vec::new();
        let mut walker = walkdir::WalkDir::new(root)
            .follow_links(false)
            .sort_by_file_name()
            .into_iter();
        while let Some(item) = walker.next() {
            let item = item.map_err(|e| {
                let path = e.path().unwrap_or(root).to_owned();
                ContextError::Io {
                    path,
                    source: e.into(),
                }
            })?;
            if item.depth() == 0 {
                continue;
            }
            let rel = relative(root, item.path());
            let is_dir = item.file_type().is_dir();
            if excluded(&rel, is_dir) {
                if is_dir && !may_reinclude(&rel) {
                    walker.skip_current_dir();
                }
                continue;
            }
            let m = item.metadata().map_err(|e| io_err(item.path(), e.into()))?;
            listed.push((rel, m, item.path().to_owned()));
        }

        let hashed: Vec<Result<Hashed, ContextError>> = listed
            .into_par_iter()
            .map(|(rel, m, path)| {
                let ft = m.file_type();
                let (kind, stamp, fresh) = if ft.is_dir() {
                    (EntryKind::Dir, None, false)
                } else if ft.is_symlink() {
                    let target = fs::read_link(&path).map_err(|e| io_err(&path, e))?;
                    (
                        EntryKind::Symlink {
                            target: target.to_string_lossy().into_owned(),
                        },
                        None,
                        false,
                    )
                } else if ft.is_file() {
                    let stamp = StatStamp::of(&m);
                    let (digest, fresh) = match cache.files.get(&rel) {
                        Some((s, d)) if *s == stamp => (d.clone(), false),
                        _ => (hash_file(&path).map_err(|e| io_err(&path, e))?, true),
                    };
                    let kind = EntryKind::File {
                        size: m.size(),
                        digest: digest.clone(),
                    };
                    (kind, Some((stamp, digest)), fresh)
                } else if ft.is_fifo() {
                    (EntryKind::Fifo, None, false)
                } else if ft.is_char_device() || ft.is_block_device() {
                    let kind = EntryKind::Device {
                        block: ft.is_block_device(),
                        rdev: m.rdev(),
                    };
                    (kind, None, false)
                } else {
                    // Sockets are not part of a context (BuildKit leaves them out too).
                    return Ok((
                        rel,
                        ContextEntry {
                            kind: EntryKind::Dir,
                            mode: u32::MAX,
                            uid: 0,
                            gid: 0,
                        },
                        None,
                        false,
                    ));
                };
                let entry = ContextEntry {
                    kind,
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                };
                Ok((rel, entry, stamp, fresh))
            })
            .collect();

        let mut entries = BTreeMap::new();
        let mut new_cache = StatCache::default();
        let mut hashed_files = 0;
        for r in hashed {
            let (rel, entry, stamp, fresh) = r?;
            if entry.mode == u32::MAX {
                continue;
            }
            hashed_files += fresh as usize;
            if let Some(s) = stamp {
                new_cache.files.insert(rel.clone(), s);
            }
            entries.insert(rel, entry);
        }
        if let Some(p) = stat_cache {
            // Best effort: a lost stat cache only costs re-hashing next time.
            if hashed_files > 0 || cache.files.len() != new_cache.files.len() {
                let _ = write_rebuildable(p, &serde_json::to_vec(&new_cache).unwrap_or_default());
            }
        }
        Ok(ContextIndex {
            root: root.to_owned(),
            entries,
            hashed_files,
        })
    }

    /// The directory on the host.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// All entries, sorted by path.
    pub fn entries(&self) -> &BTreeMap<String, ContextEntry> {
        &self.entries
    }

    /// The entry at a relative path.
    pub fn get(&self, rel: &str) -> Option<&ContextEntry> {
        self.entries.get(rel)
    }

    /// Which entries `COPY srcs` (with its `--exclude`s) reads from this context: the paths
    /// its sources name, and, for a source reached through a symlink (`link -> realdir`,
    /// `COPY link/ /x/`), the entries where the copy really reads them. The symlinks are
    /// resolved as [`fileop::copy_filtered`] resolves them, so a content key built on this
    /// changes when the files behind the link change, not only when the link does.
    pub fn copy_reads(&self, srcs: &[String], exclude: &[String]) -> impl Fn(&str) -> bool {
        // Compiled once: the returned test runs for every entry of the context.
        let named = fileop::PathSelector::new(srcs);
        let exclude = fileop::PathSelector::new(exclude);
        let mut roots: Vec<String> = Vec::new();
        for pattern in srcs {
            // A pattern the copy cannot expand fails the copy itself; the named paths below
            // still key it.
            let Ok(found) = fileop::expand_source(&self.root, pattern) else {
                continue;
            };
            for rel in found {
                // The copy's own filter: present in the context (after `.dockerignore`) and
                // not excluded.
                if !rel.is_empty() && (self.get(&rel).is_none() || exclude.selects(&rel)) {
                    continue;
                }
                let Ok(followed) = fileop::resolve_in_root(&self.root, &rel, true) else {
                    continue;
                };
                // A link leading nowhere inside the context is copied as the link itself.
                let read = if fs::symlink_metadata(&followed).is_ok() {
                    followed
                } else {
                    match fileop::resolve_in_root(&self.root, &rel, false) {
                        Ok(p) => p,
                        Err(_) => continue,
                    }
                };
                if let Ok(real) = read.strip_prefix(&self.root) {
                    roots.push(real.to_string_lossy().into_owned());
                }
            }
        }
        move |p: &str| {
            let named = named.selects(p);
            let below_real_source = roots.iter().any(|r| {
                r.is_empty()
                    || p == r
                    || p.strip_prefix(r.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            });
            (named || below_real_source) && !exclude.selects(p)
        }
    }

    /// Digest of the entries whose paths satisfy `selected`, with their content, kind, mode
    /// and ownership (never mtimes). Equal selections of equal files give equal digests.
    pub fn digest_of(&self, selected: impl Fn(&str) -> bool) -> Digest {
        let mut h = Hasher::new(Algorithm::Sha256);
        for (path, e) in self.entries.iter().filter(|(p, _)| selected(p)) {
            let line = serde_json::to_vec(&(path, e)).unwrap_or_default();
            h.update(&(line.len() as u64).to_le_bytes());
            h.update(&line);
        }
        h.finish()
    }
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

fn hash_file(path: &Path) -> io::Result<Digest> {
    let mut f = fs::File::open(path)?;
    let mut h = Hasher::new(Algorithm::Sha256);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

/// Writes a file kiln can rebuild (a stat cache, a download record) in a directory created
/// if missing: atomic for readers, not fsynced (a crash only costs redoing the work).
pub(crate) fn write_rebuildable(path: &Path, data: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    Ok(kiln_fs::write_atomic(
        path,
        data,
        kiln_fs::Durability::NoSync,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: &str, _: bool) -> bool {
        false
    }
    fn never(_: &str) -> bool {
        false
    }

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("src/lib")).unwrap();
        fs::write(d.path().join("composer.lock"), "lock v1").unwrap();
        fs::write(d.path().join("src/lib/a.php"), "<?php a").unwrap();
        fs::write(d.path().join("src/b.php"), "<?php b").unwrap();
        std::os::unix::fs::symlink("lib/a.php", d.path().join("src/link.php")).unwrap();
        d
    }

    #[test]
    fn scan_lists_files_dirs_and_symlinks_in_order() {
        let d = tree();
        let idx = ContextIndex::scan(d.path(), &none, &never, None).unwrap();
        let paths: Vec<_> = idx.entries().keys().cloned().collect();
        assert_eq!(
            paths,
            [
                "composer.lock",
                "src",
                "src/b.php",
                "src/lib",
                "src/lib/a.php",
                "src/link.php"
            ]
        );
        assert_eq!(
            idx.get("src/link.php").unwrap().kind,
            EntryKind::Symlink {
                target: "lib/a.php".into()
            }
        );
        assert_eq!(idx.hashed_files, 3);
    }

    #[test]
    fn excluded_directories_are_not_entered() {
        let d = tree();
        let excl = |p: &str, _dir: bool| p == "src";
        let idx = ContextIndex::scan(d.path(), &excl, &never, None).unwrap();
        assert_eq!(idx.entries().keys().collect::<Vec<_>>(), ["composer.lock"]);
    }

    #[test]
    fn selection_digest_ignores_unselected_changes_and_mtimes() {
        let d = tree();
        let lock_only = |p: &str| p == "composer.lock";
        let before = ContextIndex::scan(d.path(), &none, &never, None)
            .unwrap()
            .digest_of(lock_only);
        fs::write(d.path().join("src/b.php"), "<?php changed").unwrap();
        filetime::set_file_mtime(
            d.path().join("composer.lock"),
            filetime::FileTime::from_unix_time(7, 0),
        )
        .unwrap();
        let after = ContextIndex::scan(d.path(), &none, &never, None).unwrap();
        assert_eq!(after.digest_of(lock_only), before);
        fs::write(d.path().join("composer.lock"), "lock v2").unwrap();
        let changed = ContextIndex::scan(d.path(), &none, &never, None).unwrap();
        assert_ne!(changed.digest_of(lock_only), before);
    }

    #[test]
    fn mode_change_changes_the_digest() {
        use std::os::unix::fs::PermissionsExt;
        let d = tree();
        let all = |_: &str| true;
        let before = ContextIndex::scan(d.path(), &none, &never, None)
            .unwrap()
            .digest_of(all);
        fs::set_permissions(
            d.path().join("src/b.php"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let after = ContextIndex::scan(d.path(), &none, &never, None)
            .unwrap()
            .digest_of(all);
        assert_ne!(before, after);
    }

    #[test]
    fn copy_through_a_symlinked_folder_is_keyed_by_the_files_behind_the_link() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("realdir")).unwrap();
        fs::write(d.path().join("realdir/file"), "v1").unwrap();
        fs::write(d.path().join("other"), "unrelated").unwrap();
        std::os::unix::fs::symlink("realdir", d.path().join("link")).unwrap();
        let key = |srcs: &[&str]| {
            let srcs: Vec<String> = srcs.iter().map(|s| s.to_string()).collect();
            let idx = ContextIndex::scan(d.path(), &none, &never, None).unwrap();
            let reads = idx.copy_reads(&srcs, &[]);
            assert!(reads("realdir/file"), "{srcs:?} reads realdir/file");
            assert!(!reads("other"), "{srcs:?} does not read other");
            idx.digest_of(reads)
        };
        let before: Vec<Digest> = [&["link/"][..], &["link"], &["lin*"]]
            .iter()
            .map(|s| key(s))
            .collect();
        fs::write(d.path().join("realdir/file"), "v2").unwrap();
        let after: Vec<Digest> = [&["link/"][..], &["link"], &["lin*"]]
            .iter()
            .map(|s| key(s))
            .collect();
        for (b, a) in before.iter().zip(&after) {
            assert_ne!(b, a, "editing realdir/file must change the COPY key");
        }
        // Files outside what the copy reads do not move the key.
        fs::write(d.path().join("other"), "changed").unwrap();
        assert_eq!(key(&["link/"]), after[0]);
    }

    #[test]
    fn fifos_and_device_nodes_are_context_entries_keyed_by_kind() {
        let d = tree();
        let fifo = d.path().join("src/pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let idx = ContextIndex::scan(d.path(), &none, &never, None).unwrap();
        assert_eq!(idx.get("src/pipe").unwrap().kind, EntryKind::Fifo);
        let with_fifo = idx.digest_of(|_| true);
        fs::remove_file(&fifo).unwrap();
        fs::write(&fifo, "").unwrap();
        let with_file = ContextIndex::scan(d.path(), &none, &never, None)
            .unwrap()
            .digest_of(|_| true);
        assert_ne!(with_fifo, with_file, "a fifo and an empty file differ");
    }

    #[test]
    fn stat_cache_skips_unchanged_files_and_catches_edits() {
        let d = tree();
        let state = tempfile::tempdir().unwrap();
        let cache = state.path().join("ctx.json");
        let first = ContextIndex::scan(d.path(), &none, &never, Some(&cache)).unwrap();
        assert_eq!(first.hashed_files, 3);
        let second = ContextIndex::scan(d.path(), &none, &never, Some(&cache)).unwrap();
        assert_eq!(second.hashed_files, 0);
        assert_eq!(second.digest_of(|_| true), first.digest_of(|_| true));
        // Same size, rewritten: the mtime/ctime stamp differs, so it is hashed again.
        fs::write(d.path().join("src/b.php"), "<?php B").unwrap();
        let third = ContextIndex::scan(d.path(), &none, &never, Some(&cache)).unwrap();
        assert_eq!(third.hashed_files, 1);
        assert_ne!(third.digest_of(|_| true), first.digest_of(|_| true));
    }
}
