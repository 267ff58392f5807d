//! Work on the rootfs from the host side, before any container process exists: resolving
//! container paths without escaping the rootfs, creating the working dir, and creating mount
//! points ("stubs") that are removed again after the run so that none of them lands in the layer.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::spec::ExecError;

const MAX_SYMLINKS: usize = 40;

/// Resolves `path` (a container path) to a host path under `root`, following symlinks as the
/// kernel would with `root` as `/`: absolute links and `..` never leave `root`. Components
/// that do not exist are kept literally.
pub(crate) fn resolve_in_root(root: &Path, path: &str) -> io::Result<PathBuf> {
    let mut queue: VecDeque<OsString> = Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect();
    let mut resolved: Vec<OsString> = Vec::new();
    let mut links = 0;
    while let Some(comp) = queue.pop_front() {
        if comp == ".." {
            resolved.pop();
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&comp);
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => queue.push_front(n.to_os_string()),
                        Component::ParentDir => queue.push_front(OsString::from("..")),
                        _ => {}
                    }
                }
            }
            _ => resolved.push(comp),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&resolved);
    Ok(out)
}

/// What a mount point must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StubKind {
    Dir,
    File,
}

#[derive(Debug)]
struct TouchedDir {
    host: PathBuf,
    /// Path relative to the rootfs.
    rel: PathBuf,
    atime: (i64, i64),
    mtime: (i64, i64),
    mode: u32,
    uid: u32,
    gid: u32,
    /// Whether the overlay upper dir already had this directory before kiln touched it.
    in_upper_before: bool,
}

/// Mount points kiln created in the rootfs, and how to take them back out without a trace.
///
/// Creating `/etc/hosts` in an overlay rootfs that lacks it writes the file into the upper dir
/// and copies `/etc` up. After the run, [`MountStubs::remove`] deletes the stubs (files that
/// exist only in the upper dir leave no whiteout), restores the parents' times when the step
/// did not change them, and removes from the upper dir the directories that were copied up only
/// because of a stub (empty, not opaque, same metadata as before).
#[derive(Debug)]
pub(crate) struct MountStubs {
    root: PathBuf,
    upper: Option<PathBuf>,
    created: Vec<(PathBuf, StubKind)>,
    touched: Vec<TouchedDir>,
    /// mtimes of touched dirs right after the stubs were made, to tell the step's own changes.
    after: Vec<(i64, i64)>,
}

fn times(m: &fs::Metadata) -> ((i64, i64), (i64, i64)) {
    ((m.atime(), m.atime_nsec()), (m.mtime(), m.mtime_nsec()))
}

impl MountStubs {
    pub(crate) fn new(root: &Path) -> Self {
        MountStubs {
            root: root.to_path_buf(),
            upper: overlay_upper_dir(root),
            created: Vec::new(),
            touched: Vec::new(),
            after: Vec::new(),
        }
    }

    fn record_touched(&mut self, dir: &Path) -> io::Result<()> {
        if self.touched.iter().any(|t| t.host == dir) || self.created.iter().any(|(p, _)| p == dir)
        {
            return Ok(());
        }
        // The dir and its ancestors up to the root all get copied up. The root itself is
        // recorded for its times only: it is the upper dir, never removed.
        let mut cur = dir.to_path_buf();
        while cur.starts_with(&self.root) {
            if self.touched.iter().any(|t| t.host == cur) {
                break;
            }
            let m = fs::symlink_metadata(&cur)?;
            let (atime, mtime) = times(&m);
            let rel = cur.strip_prefix(&self.root).unwrap_or(&cur).to_path_buf();
            let in_upper_before = self
                .upper
                .as_ref()
                .is_some_and(|u| fs::symlink_metadata(u.join(&rel)).is_ok());
            self.touched.push(TouchedDir {
                host: cur.clone(),
                rel,
                atime,
                mtime,
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                in_upper_before: in_upper_before || cur == self.root,
            });
            if cur == self.root || !cur.pop() {
                break;
            }
        }
        Ok(())
    }

    /// Makes sure `container_path` exists as `kind` and returns its host path (symlinks
    /// resolved inside the rootfs).
    pub(crate) fn ensure(
        &mut self,
        container_path: &str,
        kind: StubKind,
    ) -> Result<PathBuf, ExecError> {
        let prep = |what, path: &Path, source| ExecError::Prepare {
            what,
            path: path.to_path_buf(),
            source,
        };
        let host = resolve_in_root(&self.root, container_path).map_err(|e| {
            prep(
                "resolving mount point",
                &self.root.join(container_path.trim_start_matches('/')),
                e,
            )
        })?;
        match fs::metadata(&host) {
            Ok(m) => {
                if (kind == StubKind::Dir) != m.is_dir() {
                    let want = if kind == StubKind::Dir {
                        "a directory"
                    } else {
                        "a file"
                    };
                    return Err(prep(
                        "mount point exists but is not the right type (need ",
                        &host,
                        io::Error::other(format!("{want} at {container_path}")),
                    ));
                }
                return Ok(host);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(prep("checking mount point", &host, e)),
        }
        // Find the nearest existing ancestor, then create the rest.
        let mut missing = vec![host.clone()];
        let mut anc = host.parent().map(Path::to_path_buf);
        while let Some(a) = anc {
            if fs::symlink_metadata(&a).is_ok() {
                if !a.is_dir() {
                    return Err(prep(
                        "creating mount point under a non-directory",
                        &a,
                        io::Error::from_raw_os_error(libc::ENOTDIR),
                    ));
                }
                self.record_touched(&a)
                    .map_err(|e| prep("reading", &a, e))?;
                break;
            }
            missing.push(a.clone());
            anc = a.parent().map(Path::to_path_buf);
        }
        for (i, p) in missing.iter().rev().enumerate() {
            let last = i + 1 == missing.len();
            let res = if last && kind == StubKind::File {
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(p)
                    .map(|_| ())
            } else {
                fs::DirBuilder::new().mode(0o755).create(p)
            };
            res.map_err(|e| prep("creating mount point", p, e))?;
            let k = if last { kind } else { StubKind::Dir };
            self.created.push((p.clone(), k));
        }
        Ok(host)
    }

    /// Call after the last [`MountStubs::ensure`]: remembers the parents' mtimes as the stubs
    /// left them.
    pub(crate) fn seal(&mut self) {
        self.after = self
            .touched
            .iter()
            .map(|t| fs::symlink_metadata(&t.host).map_or((0, 0), |m| times(&m).1))
            .collect();
    }

    /// Removes the stubs and every trace of them; best effort, returns the first error.
    pub(crate) fn remove(&mut self) -> io::Result<()> {
        let mut first_err = None;
        // Which parents the step left alone, decided before our own unlinks touch them.
        let untouched: Vec<bool> = self
            .touched
            .iter()
            .zip(self.after.iter())
            .map(|(t, after)| fs::symlink_metadata(&t.host).is_ok_and(|m| times(&m).1 == *after))
            .collect();
        for (p, kind) in self.created.drain(..).rev() {
            let res = match kind {
                StubKind::Dir => fs::remove_dir(&p),
                StubKind::File => match fs::symlink_metadata(&p) {
                    // Only our empty placeholder; anything else is the step's own file.
                    Ok(m) if m.is_file() && m.len() == 0 => fs::remove_file(&p),
                    _ => Ok(()),
                },
            };
            match res {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // The step put files in a dir we created: that is its change, keep it.
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        for (t, untouched) in self.touched.iter().zip(untouched) {
            if untouched {
                if let Err(e) = set_times(&t.host, t.atime, t.mtime) {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(upper) = &self.upper {
            // Judge every candidate before removing any: removing a child changes its
            // parent's mtime in the upper dir.
            let mut order: Vec<(usize, bool)> = self
                .touched
                .iter()
                .map(|t| {
                    (
                        t.rel.components().count(),
                        !t.in_upper_before && same_as_before(&upper.join(&t.rel), t),
                    )
                })
                .collect();
            let mut idx: Vec<usize> = (0..order.len()).collect();
            // Deepest first: a parent can only go once its child went.
            idx.sort_by_key(|i| std::cmp::Reverse(order[*i].0));
            for i in idx {
                if order[i].1 {
                    let u = upper.join(&self.touched[i].rel);
                    if fs::read_dir(&u)
                        .map(|mut d| d.next().is_none())
                        .unwrap_or(false)
                    {
                        let _ = fs::remove_dir(&u);
                    }
                }
                order[i].1 = false;
            }
        }
        self.touched.clear();
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for MountStubs {
    fn drop(&mut self) {
        if !self.created.is_empty() {
            let _ = self.remove();
        }
    }
}

/// Whether the upper dir's copy of a touched dir still matches what it was before (so it
/// exists only because a mount point was created in it).
fn same_as_before(u: &Path, t: &TouchedDir) -> bool {
    let Ok(m) = fs::symlink_metadata(u) else {
        return false;
    };
    if !m.is_dir() || m.mode() != t.mode || m.uid() != t.uid || m.gid() != t.gid {
        return false;
    }
    if times(&m).1 != t.mtime {
        return false;
    }
    !(xattr_present(u, "trusted.overlay.opaque") || xattr_present(u, "user.overlay.opaque"))
}

fn xattr_present(p: &Path, name: &str) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let (Ok(cp), Ok(cn)) = (
        std::ffi::CString::new(p.as_os_str().as_bytes()),
        std::ffi::CString::new(name),
    ) else {
        return false;
    };
    // SAFETY: valid C strings; size 0 only queries the length.
    let r = unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0) };
    r >= 0
}

fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let cp = std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    // SAFETY: valid path and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cp.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The `upperdir=` of the overlay mounted exactly at `root`, read from `/proc/self/mountinfo`.
pub(crate) fn overlay_upper_dir(root: &Path) -> Option<PathBuf> {
    let root = fs::canonicalize(root).ok()?;
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut found = None;
    for line in info.lines() {
        let (pre, post) = line.split_once(" - ")?;
        let mount_point = pre.split(' ').nth(4)?;
        if Path::new(&unescape_mountinfo(mount_point)) != root {
            continue;
        }
        let mut post = post.split(' ');
        let fstype = post.next()?;
        let _source = post.next()?;
        let opts = post.next().unwrap_or("");
        // Later lines are mounted on top; the last one wins.
        found = if fstype == "overlay" {
            split_mount_options(opts).into_iter().find_map(|o| {
                o.strip_prefix("upperdir=")
                    .map(|u| PathBuf::from(unescape_mountinfo(u)))
            })
        } else {
            None
        };
    }
    found
}

fn split_mount_options(opts: &str) -> Vec<&str> {
    // mountinfo escapes ',' inside a path as octal (\054), so a raw ',' always separates.
    opts.split(',').collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
pub(crate) fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Creates the working dir (and missing parents) owned by `uid:gid`, inside the rootfs.
pub(crate) fn create_workdir(root: &Path, cwd: &str, uid: u32, gid: u32) -> Result<(), ExecError> {
    let host = resolve_in_root(root, cwd).map_err(|e| ExecError::Prepare {
        what: "resolving working dir",
        path: root.join(cwd.trim_start_matches('/')),
        source: e,
    })?;
    if host.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut cur = Some(host.as_path());
    while let Some(c) = cur {
        if fs::symlink_metadata(c).is_ok() || c == root {
            break;
        }
        missing.push(c.to_path_buf());
        cur = c.parent();
    }
    for p in missing.iter().rev() {
        let made = fs::DirBuilder::new().mode(0o755).create(p).and_then(|()| {
            std::os::unix::fs::lchown(p, Some(uid), Some(gid))?;
            fs::set_permissions(p, fs::Permissions::from_mode(0o755))
        });
        made.map_err(|e| ExecError::Prepare {
            what: "creating working dir",
            path: p.clone(),
            source: e,
        })?;
    }
    Ok(())
}

/// Finds `command` in `path_var` inside the rootfs; returns the container path to exec.
pub(crate) fn find_command(
    root: &Path,
    command: &str,
    path_var: &str,
) -> Result<String, ExecError> {
    if command.contains('/') {
        return Ok(command.to_string());
    }
    for dir in path_var.split(':').filter(|d| d.starts_with('/')) {
        let candidate = format!("{}/{command}", dir.trim_end_matches('/'));
        if let Ok(host) = resolve_in_root(root, &candidate) {
            if let Ok(m) = fs::metadata(&host) {
                if m.is_file() && m.mode() & 0o111 != 0 {
                    return Ok(candidate);
                }
            }
        }
    }
    Err(ExecError::CommandNotFound {
        command: command.to_string(),
        path: path_var.to_string(),
        rootfs: root.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("etc")).unwrap();
        std::os::unix::fs::symlink("/../../../etc/shadow", r.join("etc/evil")).unwrap();
        std::os::unix::fs::symlink("../run/x", r.join("etc/rel")).unwrap();
        assert_eq!(
            resolve_in_root(r, "/etc/evil").unwrap(),
            r.join("etc/shadow")
        );
        assert_eq!(resolve_in_root(r, "/etc/rel").unwrap(), r.join("run/x"));
        assert_eq!(resolve_in_root(r, "/../../x").unwrap(), r.join("x"));
        std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
        assert!(resolve_in_root(r, "/loop").is_err());
    }

    #[test]
    fn stubs_are_removed_with_parent_times_restored() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("etc")).unwrap();
        set_times(&r.join("etc"), (1000, 0), (2000, 0)).unwrap();
        let mut s = MountStubs::new(r);
        let p = s.ensure("/etc/hosts", StubKind::File).unwrap();
        s.ensure("/run/secrets/token", StubKind::File).unwrap();
        s.seal();
        assert!(p.is_file() && r.join("run/secrets/token").is_file());
        s.remove().unwrap();
        assert!(!p.exists() && !r.join("run").exists());
        let m = fs::metadata(r.join("etc")).unwrap();
        assert_eq!(m.mtime(), 2000);
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(
            split_mount_options("lowerdir=/a\\054b,upperdir=/u"),
            vec!["lowerdir=/a\\054b", "upperdir=/u"]
        );
    }
}
