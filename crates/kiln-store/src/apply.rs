//! Safe extraction of a layer tar into a directory.
//!
//! Every path is resolved from a directory fd with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_MAGICLINKS)`, never by joining strings: a parent that is a symlink is followed
//! only while it stays inside the rootfs, and a final component is never followed (existing
//! entries are unlinked, new ones created with `O_EXCL | O_NOFOLLOW`). `..` components,
//! whiteouts of `.`/`..`, device nodes from untrusted layers and anything over the configured
//! limits are refused with an error that names the layer and the path.
//!
//! Layers are read the way containerd and Docker apply them, since real tools write all of
//! these shapes: absolute member names (`/`, `/bin/sh`) and hardlink targets are taken
//! relative to the rootfs, a root entry is ignored, a directory entry may come after its
//! children, and a path that appears twice takes the later entry (a directory over a
//! directory merges; anything else replaces). `trusted.overlay.*` xattrs in a layer are
//! dropped: they would steer overlayfs itself (opaque, redirect, metacopy).
//!
//! Two targets: an overlay upper dir (whiteouts become char devices 0/0, opaque markers the
//! `trusted.overlay.opaque=y` xattr, as overlayfs itself writes them) or a full merged tree
//! (whiteouts delete, opaque markers empty the dir of what lower layers had).

use std::collections::HashSet;
use std::ffi::{CStr, OsStr};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use kiln_oci::{Algorithm, Digest, Hasher};

use crate::error::{Result, StoreError};
use crate::sys::{self, Resolve};
use crate::tarfmt::{EntryKind, Piece, TarError, TarHeader, TarReader};

/// What to do with character and block device entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevicePolicy {
    /// Refuse the layer.
    Reject,
    /// Leave them out and list them in [`ApplyStats::skipped`].
    Skip,
    /// Create them when running as root (only for layers kiln trusts); else skip.
    CreateIfRoot,
}

/// Limits and policies for extracting a layer or a build context.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Most bytes of file data the layer may hold in total.
    pub max_total_bytes: u64,
    /// Most entries the layer may hold.
    pub max_entries: u64,
    /// Largest PAX or GNU long-name header accepted.
    pub max_header_bytes: u64,
    /// Device node handling.
    pub devices: DevicePolicy,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            max_total_bytes: 64 << 30,
            max_entries: 4_000_000,
            max_header_bytes: 1 << 20,
            devices: DevicePolicy::Skip,
        }
    }
}

/// What an extraction did.
#[derive(Debug, Clone)]
pub struct ApplyStats {
    /// sha256 of the uncompressed tar stream (the layer's diff id).
    pub diff_id: Digest,
    /// Entries processed.
    pub entries: u64,
    /// Bytes of file data written.
    pub bytes: u64,
    /// Entries left out by policy (device nodes), as paths.
    pub skipped: Vec<String>,
}

/// Where the extracted layer goes.
#[derive(Debug, Clone)]
pub(crate) enum ApplyTarget {
    /// An overlay upper dir over `lowers` (nearest first).
    OverlayUpper { lowers: Vec<PathBuf> },
    /// A complete tree that already holds the parent's content.
    Merged,
    /// A plain archive unpacked into a directory (`ADD file.tar`): `.wh.` names are ordinary
    /// files, as Docker's untar treats them.
    Archive,
}

struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    count: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

struct Extractor<'a> {
    root: OwnedFd,
    target: &'a ApplyTarget,
    opts: &'a ApplyOptions,
    layer: String,
    seen: HashSet<Vec<u8>>,
    dirs: Vec<(Vec<u8>, TarHeader)>,
    cache: Option<(Vec<u8>, OwnedFd)>,
    /// Whether the cached parent dir is set-gid (its new files take its group, not ours).
    cache_setgid: bool,
    lower_roots: Vec<OwnedFd>,
    stats_entries: u64,
    stats_bytes: u64,
    skipped: Vec<String>,
    root_user: bool,
    /// This process's effective group: the group a new file gets outside set-gid dirs.
    egid: u32,
    buf: Vec<u8>,
}

/// Extracts the uncompressed tar `input` into `root`, returning stats and the diff id.
pub(crate) fn apply_tar<R: Read>(
    root: &std::path::Path,
    input: R,
    target: &ApplyTarget,
    opts: &ApplyOptions,
    layer: Option<&Digest>,
) -> Result<ApplyStats> {
    let layer_name = layer.map_or_else(|| "(unknown digest)".to_owned(), |d| d.to_string());
    let rootfd = sys::open_dir(root).map_err(|e| StoreError::io("opening rootfs", root, e))?;
    let mut lower_roots = Vec::new();
    if let ApplyTarget::OverlayUpper { lowers } = target {
        for l in lowers {
            lower_roots
                .push(sys::open_dir(l).map_err(|e| StoreError::io("opening lower dir", l, e))?);
        }
    }
    let mut hr = HashingReader {
        inner: input,
        hasher: Hasher::new(Algorithm::Sha256),
        count: 0,
    };
    let mut ex = Extractor {
        root: rootfd,
        target,
        opts,
        layer: layer_name.clone(),
        seen: HashSet::new(),
        dirs: Vec::new(),
        cache: None,
        cache_setgid: true,
        lower_roots,
        stats_entries: 0,
        stats_bytes: 0,
        skipped: Vec::new(),
        root_user: sys::is_root(),
        // SAFETY: getegid has no preconditions and cannot fail.
        egid: unsafe { libc::getegid() },
        buf: Vec::new(),
    };
    {
        let mut tr = TarReader::new(&mut hr, opts.max_header_bytes);
        loop {
            let h = match tr.next_header() {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return Err(ex.tar_error(e)),
            };
            ex.entry(&h, &mut tr)?;
        }
    }
    // The diff id covers the whole stream, including any padding after the end marker.
    let mut sink = [0u8; 64 << 10];
    loop {
        match hr.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {
                if hr.count > opts.max_total_bytes.saturating_add(1 << 30) {
                    return Err(StoreError::LimitExceeded {
                        layer: layer_name,
                        what: "trailing data after the archive",
                        limit: opts.max_total_bytes,
                    });
                }
            }
            Err(e) => return Err(ex.tar_error(TarError::Io(e))),
        }
    }
    ex.finish_dirs()?;
    Ok(ApplyStats {
        diff_id: hr.hasher.finish(),
        entries: ex.stats_entries,
        bytes: ex.stats_bytes,
        skipped: ex.skipped,
    })
}

/// Unpacks the plain (uncompressed) tar `input` into the directory `dir`, with every check
/// layers get (no write leaves `dir`, limits hold) but no whiteouts: this is `ADD file.tar`.
/// FIFOs are created, and device nodes too under [`DevicePolicy::CreateIfRoot`] as root,
/// as BuildKit's `ADD` does.
pub fn unpack_archive<R: Read>(
    dir: &std::path::Path,
    input: R,
    opts: &ApplyOptions,
) -> Result<ApplyStats> {
    apply_tar(dir, input, &ApplyTarget::Archive, opts, None)
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&b'/')
}

/// Splits an archive path into components relative to the rootfs, refusing `..`. A leading
/// `/` names the rootfs itself (umoci writes its root as `/`), as in containerd.
fn components(raw: &[u8]) -> std::result::Result<Vec<&[u8]>, &'static str> {
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("path contains '..'"),
            _ => out.push(c),
        }
    }
    Ok(out)
}

impl Extractor<'_> {
    fn unsafe_entry(&self, path: &[u8], reason: impl Into<String>) -> StoreError {
        StoreError::UnsafeEntry {
            layer: self.layer.clone(),
            path: String::from_utf8_lossy(path).into_owned(),
            reason: reason.into(),
        }
    }

    fn entry_io(&self, path: &[u8], what: &str, e: io::Error) -> StoreError {
        StoreError::BadArchive {
            layer: self.layer.clone(),
            reason: format!("{what} {:?}: {e}", String::from_utf8_lossy(path)),
        }
    }

    fn tar_error(&self, e: TarError) -> StoreError {
        match e {
            TarError::HeaderTooLarge => StoreError::LimitExceeded {
                layer: self.layer.clone(),
                what: "an extended (PAX/long name) header",
                limit: self.opts.max_header_bytes,
            },
            TarError::Malformed(m) => StoreError::BadArchive {
                layer: self.layer.clone(),
                reason: m,
            },
            TarError::Io(e) => StoreError::BadArchive {
                layer: self.layer.clone(),
                reason: format!("reading the archive failed (truncated or corrupt?): {e}"),
            },
        }
    }

    /// Opens (creating missing dirs) the directory `comps` beneath the root.
    fn parent(&mut self, raw: &[u8], comps: &[&[u8]]) -> Result<BorrowedFd<'_>> {
        let key = join(comps);
        let hit = matches!(&self.cache, Some((k, _)) if *k == key);
        if !hit {
            let fd = self.resolve_dir(raw, comps, true)?;
            self.cache_setgid = sys::fstat(fd.as_fd())
                .map(|st| st.st_mode & libc::S_ISGID != 0)
                .unwrap_or(true);
            self.cache = Some((key, fd));
        }
        match &self.cache {
            Some((_, fd)) => Ok(fd.as_fd()),
            None => Err(self.unsafe_entry(raw, "internal: parent cache empty")),
        }
    }

    fn resolve_dir(&self, raw: &[u8], comps: &[&[u8]], create: bool) -> Result<OwnedFd> {
        let flags = libc::O_RDONLY | libc::O_DIRECTORY;
        let key = join(comps);
        match sys::openat2(self.root.as_fd(), &key, flags, Resolve::Beneath) {
            Ok(fd) => return Ok(fd),
            Err(e) if errno(&e) == libc::ENOENT && create => {}
            Err(e) => return Err(self.resolve_error(raw, e)),
        }
        let mut cur = sys::openat2(self.root.as_fd(), b".", flags, Resolve::Beneath)
            .map_err(|e| self.resolve_error(raw, e))?;
        for (i, c) in comps.iter().enumerate() {
            let next = match sys::openat2(cur.as_fd(), c, flags, Resolve::Beneath) {
                Ok(fd) => fd,
                Err(e) if errno(&e) == libc::ENOENT => {
                    if let Some(why) = self.lower_blocks_dir(&comps[..=i]) {
                        return Err(self.unsafe_entry(raw, why));
                    }
                    let name = sys::cstr(c).map_err(|e| self.resolve_error(raw, e))?;
                    sys::mkdir_at(cur.as_fd(), &name, 0o755)
                        .map_err(|e| self.entry_io(raw, "creating parent dir of", e))?;
                    let fd = sys::openat2(cur.as_fd(), c, flags, Resolve::NoSymlinks)
                        .map_err(|e| self.resolve_error(raw, e))?;
                    self.copy_lower_dir_metadata(&comps[..=i], fd.as_fd());
                    fd
                }
                Err(e) => return Err(self.resolve_error(raw, e)),
            };
            cur = next;
        }
        Ok(cur)
    }

    /// In an upper dir a missing parent may exist in a lower layer as a symlink or a file;
    /// creating a dir there would silently replace it, and following it is what an escape
    /// needs, so such an entry is refused.
    fn lower_blocks_dir(&self, comps: &[&[u8]]) -> Option<&'static str> {
        let key = join(comps);
        for l in &self.lower_roots {
            match sys::openat2(
                l.as_fd(),
                &key,
                libc::O_PATH | libc::O_NOFOLLOW,
                Resolve::NoSymlinks,
            ) {
                Ok(fd) => {
                    let st = sys::fstat(fd.as_fd()).ok()?;
                    return match st.st_mode & libc::S_IFMT {
                        libc::S_IFDIR => None,
                        libc::S_IFLNK => Some("a parent directory is a symlink in a lower layer; layers may not write through symlinks"),
                        libc::S_IFCHR if st.st_rdev == 0 => None, // whited out below: a fresh dir
                        _ => Some("a parent path component is not a directory in a lower layer"),
                    };
                }
                Err(e) if errno(&e) == libc::ENOENT => continue,
                Err(_) => {
                    return Some("a parent path component cannot be resolved in a lower layer")
                }
            }
        }
        None
    }

    /// A dir created only because a deeper entry needed it must not change what the lower
    /// layers show for it (an upper dir's owner and mode win in overlayfs).
    fn copy_lower_dir_metadata(&self, comps: &[&[u8]], fd: BorrowedFd<'_>) {
        let key = join(comps);
        for l in &self.lower_roots {
            if let Ok(lfd) = sys::openat2(
                l.as_fd(),
                &key,
                libc::O_RDONLY | libc::O_DIRECTORY,
                Resolve::NoSymlinks,
            ) {
                if let Ok(st) = sys::fstat(lfd.as_fd()) {
                    let _ = sys::fchown(fd, st.st_uid, st.st_gid);
                    let _ = sys::fchmod(fd, st.st_mode & 0o7777);
                    let _ = sys::futimens(fd, st.st_mtime, st.st_mtime_nsec);
                }
                return;
            }
        }
    }

    fn resolve_error(&self, raw: &[u8], e: io::Error) -> StoreError {
        match errno(&e) {
            libc::EXDEV | libc::ELOOP => self.unsafe_entry(
                raw,
                "a parent directory resolves outside the rootfs through a symlink",
            ),
            libc::ENOTDIR => self.unsafe_entry(raw, "a parent path component is not a directory"),
            _ => self.entry_io(raw, "resolving parent of", e),
        }
    }

    fn invalidate_cache(&mut self, key: &[u8]) {
        if let Some((k, _)) = &self.cache {
            if k.starts_with(key) && (k.len() == key.len() || k[key.len()] == b'/') {
                self.cache = None;
            }
        }
    }

    fn entry<R: Read>(&mut self, h: &TarHeader, tr: &mut TarReader<R>) -> Result<()> {
        let raw = h.path.clone();
        self.stats_entries += 1;
        if self.stats_entries > self.opts.max_entries {
            return Err(StoreError::LimitExceeded {
                layer: self.layer.clone(),
                what: "the number of entries",
                limit: self.opts.max_entries,
            });
        }
        if h.size > self.opts.max_total_bytes.saturating_sub(self.stats_bytes) {
            return Err(StoreError::LimitExceeded {
                layer: self.layer.clone(),
                what: "the total size of file data",
                limit: self.opts.max_total_bytes,
            });
        }
        let comps = components(&raw).map_err(|r| self.unsafe_entry(&raw, r))?;
        let Some((&name, parents)) = comps.split_last() else {
            return Ok(()); // the root dir itself: its metadata belongs to the base
        };
        let key = join(&comps);
        // A path seen before is replaced by this entry below, as containerd does.
        self.seen.insert(key.clone());
        if let Some(target) = name.strip_prefix(b".wh.") {
            if !matches!(self.target, ApplyTarget::Archive) {
                return self.whiteout(&raw, parents, target);
            }
        }
        self.invalidate_cache(&key);
        let cname = sys::cstr(name).map_err(|e| self.entry_io(&raw, "naming", e))?;
        let root_user = self.root_user;
        let layer = self.layer.clone();
        // Replace whatever is there (never following it), except dir-over-dir. Files, dirs
        // and symlinks are created first, as tar does, and only a name already taken is
        // inspected: in a fresh snapshot almost none is, which saves an lstat per entry.
        let parent = self.parent(&raw, parents)?;
        let replacing = |e: io::Error| io_err(&layer, &raw, "replacing", e);
        if !matches!(
            h.kind,
            EntryKind::Dir | EntryKind::File | EntryKind::Symlink
        ) {
            clear_name(parent, &cname, false).map_err(replacing)?;
        }
        match h.kind {
            EntryKind::Dir => {
                match sys::mkdir_at(parent, &cname, 0o700) {
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        if !clear_name(parent, &cname, true).map_err(replacing)? {
                            sys::mkdir_at(parent, &cname, 0o700)
                                .map_err(|e| io_err(&layer, &raw, "creating dir", e))?;
                        }
                    }
                    r => r.map_err(|e| io_err(&layer, &raw, "creating dir", e))?,
                }
                self.dirs.push((key, h.clone()));
            }
            EntryKind::File => {
                let mut f = match sys::create_file_at(parent, &cname, 0o600) {
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        clear_name(parent, &cname, false).map_err(replacing)?;
                        sys::create_file_at(parent, &cname, 0o600)
                    }
                    r => r,
                }
                .map_err(|e| io_err(&layer, &raw, "creating file", e))?;
                // One buffer for the whole layer: zeroing a fresh one per file costs more
                // than the copy for small files.
                let mut buf = std::mem::take(&mut self.buf);
                buf.resize(256 << 10, 0);
                let mut holes = false;
                loop {
                    match tr
                        .read_piece(&mut buf)
                        .map_err(|e| self.tar_error(TarError::Io(e)))?
                    {
                        Piece::Data(n) => f
                            .write_all(&buf[..n])
                            .map_err(|e| io_err(&layer, &raw, "writing file", e))?,
                        // Holes of a sparse file stay unallocated, as tar -S leaves them.
                        Piece::Hole(n) => {
                            holes = true;
                            let n = i64::try_from(n).map_err(|_| {
                                self.unsafe_entry(&raw, "sparse hole larger than a file can be")
                            })?;
                            f.seek(SeekFrom::Current(n))
                                .map_err(|e| io_err(&layer, &raw, "writing file", e))?;
                        }
                        Piece::End => break,
                    }
                }
                if holes {
                    f.set_len(h.size)
                        .map_err(|e| io_err(&layer, &raw, "writing file", e))?;
                }
                self.buf = buf;
                self.stats_bytes += h.size;
                // A file root creates is root's, in root's group unless its dir is set-gid:
                // the chown is skipped when that is already what the entry says.
                let owned = h.uid == 0 && h.gid == self.egid && !self.cache_setgid;
                set_fd_metadata(f.as_fd(), h, root_user && !owned)
                    .map_err(|e| io_err(&layer, &raw, "setting metadata of", e))?;
            }
            EntryKind::Symlink => {
                match sys::symlink_at(&h.link, parent, &cname) {
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        clear_name(parent, &cname, false).map_err(replacing)?;
                        sys::symlink_at(&h.link, parent, &cname)
                    }
                    r => r,
                }
                .map_err(|e| io_err(&layer, &raw, "creating symlink", e))?;
                set_link_metadata(parent, &cname, h, root_user)
                    .map_err(|e| io_err(&layer, &raw, "setting metadata of", e))?;
            }
            EntryKind::Hardlink => self.hardlink(&raw, parents, &cname, h)?,
            EntryKind::Char | EntryKind::Block => {
                let allowed = match self.opts.devices {
                    DevicePolicy::Reject => {
                        return Err(self.unsafe_entry(
                            &raw,
                            "device nodes are not allowed in untrusted layers",
                        ))
                    }
                    DevicePolicy::Skip => false,
                    DevicePolicy::CreateIfRoot => root_user,
                };
                if !allowed {
                    self.skipped
                        .push(String::from_utf8_lossy(&raw).into_owned());
                    return Ok(());
                }
                let t = if h.kind == EntryKind::Char {
                    libc::S_IFCHR
                } else {
                    libc::S_IFBLK
                };
                let parent = self.parent(&raw, parents)?;
                sys::mknod_at(parent, &cname, t | 0o600, sys::makedev(h.dev.0, h.dev.1))
                    .map_err(|e| io_err(&layer, &raw, "creating device", e))?;
                self.node_metadata(&raw, parents, &cname, h)?;
            }
            EntryKind::Fifo => {
                sys::mknod_at(parent, &cname, libc::S_IFIFO | 0o600, 0)
                    .map_err(|e| io_err(&layer, &raw, "creating fifo", e))?;
                self.node_metadata(&raw, parents, &cname, h)?;
            }
        }
        Ok(())
    }

    fn node_metadata(
        &mut self,
        raw: &[u8],
        parents: &[&[u8]],
        name: &CStr,
        h: &TarHeader,
    ) -> Result<()> {
        let layer = self.layer.clone();
        let root_user = self.root_user;
        let parent = self.parent(raw, parents)?;
        if root_user {
            sys::lchown_at(parent, name, h.uid, h.gid)
                .map_err(|e| io_err(&layer, raw, "chown", e))?;
        }
        // The node was just created by us, so the last component is not a symlink.
        sys::chmod_at(parent, name, h.mode).map_err(|e| io_err(&layer, raw, "chmod", e))?;
        if layer_xattrs(h).next().is_some() {
            let cc = sys::cstr(&proc_child(parent, name))
                .map_err(|e| io_err(&layer, raw, "naming", e))?;
            for (k, v) in layer_xattrs(h) {
                xattr_result(sys::lsetxattr(&cc, k, v))
                    .map_err(|e| io_err(&layer, raw, "setting xattr on", e))?;
            }
        }
        sys::set_times_at(parent, name, h.mtime, 0)
            .map_err(|e| io_err(&layer, raw, "setting times", e))
    }

    fn whiteout(&mut self, raw: &[u8], parents: &[&[u8]], target: &[u8]) -> Result<()> {
        let layer = self.layer.clone();
        if target == b".wh..opq" {
            let pkey = join(parents);
            self.invalidate_cache(&pkey);
            let is_overlay = matches!(self.target, ApplyTarget::OverlayUpper { .. });
            let seen: Vec<Vec<u8>> = if is_overlay {
                Vec::new()
            } else {
                self.seen
                    .iter()
                    .filter(|p| is_child(p, &pkey))
                    .cloned()
                    .collect()
            };
            let parent = self.parent(raw, parents)?;
            if is_overlay {
                sys::fsetxattr(parent, sys::overlay_opaque_xattr(), b"y")
                    .map_err(|e| io_err(&layer, raw, "marking opaque", e))?;
            } else {
                // Keep what this layer already put there; drop what lower layers had.
                let dir = sys::proc_fd_path(parent);
                let rd = fs::read_dir(OsStr::from_bytes(dir.as_bytes()))
                    .map_err(|e| io_err(&layer, raw, "listing", e))?;
                for ent in rd {
                    let ent = ent.map_err(|e| io_err(&layer, raw, "listing", e))?;
                    let n = ent.file_name();
                    let child = join(&[&pkey, n.as_bytes()]);
                    let child = if pkey.is_empty() {
                        n.as_bytes().to_vec()
                    } else {
                        child
                    };
                    if seen.contains(&child) {
                        continue;
                    }
                    let cn =
                        sys::cstr(n.as_bytes()).map_err(|e| io_err(&layer, raw, "naming", e))?;
                    let is_dir = ent.file_type().map(|t| t.is_dir()).unwrap_or(false);
                    remove_at(parent, &cn, is_dir)
                        .map_err(|e| io_err(&layer, raw, "clearing", e))?;
                }
            }
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." || target.starts_with(b".wh.") {
            return Err(self.unsafe_entry(raw, "whiteout of '.', '..' or an empty name"));
        }
        let mut tkey = join(parents);
        if !tkey.is_empty() {
            tkey.push(b'/');
        }
        tkey.extend_from_slice(target);
        self.invalidate_cache(&tkey);
        let is_overlay = matches!(self.target, ApplyTarget::OverlayUpper { .. });
        let parent = self.parent(raw, parents)?;
        let cname = sys::cstr(target).map_err(|e| io_err(&layer, raw, "naming", e))?;
        if let Some(st) =
            sys::lstat_at(parent, &cname).map_err(|e| io_err(&layer, raw, "inspecting", e))?
        {
            let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
            remove_at(parent, &cname, is_dir).map_err(|e| io_err(&layer, raw, "deleting", e))?;
        }
        if is_overlay {
            sys::mknod_at(parent, &cname, libc::S_IFCHR, 0)
                .map_err(|e| io_err(&layer, raw, "creating whiteout", e))?;
        }
        Ok(())
    }

    fn hardlink(
        &mut self,
        raw: &[u8],
        parents: &[&[u8]],
        name: &CStr,
        h: &TarHeader,
    ) -> Result<()> {
        let layer = self.layer.clone();
        let tcomps = components(&h.link).map_err(|r| {
            self.unsafe_entry(
                raw,
                format!(
                    "hardlink target {:?}: {r}",
                    String::from_utf8_lossy(&h.link)
                ),
            )
        })?;
        let Some((&tname, tparents)) = tcomps.split_last() else {
            return Err(self.unsafe_entry(raw, "hardlink to the root directory"));
        };
        let tparent = self
            .resolve_dir(raw, tparents, false)
            .map_err(|e| match e {
                StoreError::UnsafeEntry { .. } => e,
                _ => self.unsafe_entry(
                    raw,
                    "hardlink target's directory does not exist in the rootfs",
                ),
            })?;
        let tc = sys::cstr(tname).map_err(|e| io_err(&layer, raw, "naming", e))?;
        let st = sys::lstat_at(tparent.as_fd(), &tc)
            .map_err(|e| io_err(&layer, raw, "inspecting", e))?;
        match st {
            Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                return Err(self.unsafe_entry(raw, "hardlink to a directory"));
            }
            Some(_) => {}
            None => {
                if !self.copy_up(&tcomps, tparent.as_fd(), &tc)? {
                    return Err(self.unsafe_entry(
                        raw,
                        format!(
                            "hardlink target {:?} does not exist",
                            String::from_utf8_lossy(&h.link)
                        ),
                    ));
                }
            }
        }
        let parent = self.parent(raw, parents)?;
        sys::link_at(tparent.as_fd(), &tc, parent, name)
            .map_err(|e| io_err(&layer, raw, "linking", e))
    }

    /// Copies a regular file from the nearest lower layer into the upper dir so a hardlink
    /// in this layer can point at it. Returns false when no lower has it.
    fn copy_up(&self, comps: &[&[u8]], into: BorrowedFd<'_>, name: &CStr) -> Result<bool> {
        let key = join(comps);
        for l in &self.lower_roots {
            let Ok(src) = sys::openat2(
                l.as_fd(),
                &key,
                libc::O_RDONLY | libc::O_NOFOLLOW,
                Resolve::NoSymlinks,
            ) else {
                continue;
            };
            let st = sys::fstat(src.as_fd())
                .map_err(|e| io_err(&self.layer, &key, "copy-up stat", e))?;
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Ok(false);
            }
            let mut dst = sys::create_file_at(into, name, 0o600)
                .map_err(|e| io_err(&self.layer, &key, "copy-up create", e))?;
            io::copy(&mut File::from(src), &mut dst)
                .map_err(|e| io_err(&self.layer, &key, "copy-up", e))?;
            let mut h = TarHeader::new(key.clone(), EntryKind::File);
            h.uid = st.st_uid;
            h.gid = st.st_gid;
            h.mode = st.st_mode & 0o7777;
            h.mtime = st.st_mtime;
            set_fd_metadata(dst.as_fd(), &h, self.root_user)
                .map_err(|e| io_err(&self.layer, &key, "copy-up metadata", e))?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Directory metadata last, deepest first, so creating children does not bump mtimes.
    fn finish_dirs(&mut self) -> Result<()> {
        self.cache = None;
        let mut dirs = std::mem::take(&mut self.dirs);
        // A dir listed twice takes its later entry's metadata; children before parents so
        // setting a parent's mode or times is the last thing that touches it.
        let mut done = HashSet::new();
        dirs.reverse();
        dirs.retain(|(k, _)| done.insert(k.clone()));
        dirs.sort_by_key(|(k, _)| std::cmp::Reverse(k.iter().filter(|&&c| c == b'/').count()));
        for (key, h) in &dirs {
            let fd = match sys::openat2(
                self.root.as_fd(),
                key,
                libc::O_RDONLY | libc::O_DIRECTORY,
                Resolve::NoSymlinks,
            ) {
                Ok(fd) => fd,
                // Replaced or whited out later in the same layer.
                Err(_) => continue,
            };
            set_fd_metadata(fd.as_fd(), h, self.root_user)
                .map_err(|e| io_err(&self.layer, key, "setting metadata of", e))?;
        }
        Ok(())
    }
}

fn io_err(layer: &str, path: &[u8], what: &str, e: io::Error) -> StoreError {
    StoreError::BadArchive {
        layer: layer.to_owned(),
        reason: format!("{what} {:?}: {e}", String::from_utf8_lossy(path)),
    }
}

fn is_child(p: &[u8], dir: &[u8]) -> bool {
    if dir.is_empty() {
        return !p.contains(&b'/');
    }
    p.len() > dir.len() + 1
        && p.starts_with(dir)
        && p[dir.len()] == b'/'
        && !p[dir.len() + 1..].contains(&b'/')
}

fn proc_child(parent: BorrowedFd<'_>, name: &CStr) -> Vec<u8> {
    let mut v = sys::proc_fd_path(parent).into_bytes();
    v.push(b'/');
    v.extend_from_slice(name.to_bytes());
    v
}

fn set_fd_metadata(fd: BorrowedFd<'_>, h: &TarHeader, root_user: bool) -> io::Result<()> {
    if root_user {
        sys::fchown(fd, h.uid, h.gid)?;
    }
    // After chown, which clears setuid/setgid.
    sys::fchmod(fd, h.mode & 0o7777)?;
    for (k, v) in layer_xattrs(h) {
        xattr_result(sys::fsetxattr(fd, k, v))?;
    }
    sys::futimens(fd, h.mtime, 0)
}

/// The xattrs of an entry that are applied: all but overlayfs's own (`trusted.overlay.*`,
/// and `user.overlay.*` which it reads in a user namespace), which only overlayfs may write (a layer carrying them could make lower content vanish or redirect
/// lookups).
fn layer_xattrs(h: &TarHeader) -> impl Iterator<Item = (&[u8], &[u8])> {
    h.xattrs
        .iter()
        .filter(|(k, _)| !sys::is_overlay_xattr(k))
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
}

/// An xattr the filesystem cannot hold (`EOPNOTSUPP`) is left out, as containerd does;
/// every other failure is an error.
fn xattr_result(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if errno(&e) == libc::EOPNOTSUPP => Ok(()),
        other => other,
    }
}

fn set_link_metadata(
    parent: BorrowedFd<'_>,
    name: &CStr,
    h: &TarHeader,
    root_user: bool,
) -> io::Result<()> {
    if root_user {
        sys::lchown_at(parent, name, h.uid, h.gid)?;
    }
    if layer_xattrs(h).next().is_some() {
        let c = sys::cstr(&proc_child(parent, name))?;
        for (k, v) in layer_xattrs(h) {
            xattr_result(sys::lsetxattr(&c, k, v))?;
        }
    }
    sys::set_times_at(parent, name, h.mtime, 0)
}

/// Removes `name` from `dir`, recursively for directories, never following symlinks.
/// Removes whatever is at `name` in `dir` (never following it) so an entry can be made
/// there; a dir is kept when `keep_dir`. Returns whether a dir was kept.
fn clear_name(dir: BorrowedFd<'_>, name: &CStr, keep_dir: bool) -> io::Result<bool> {
    if let Some(st) = sys::lstat_at(dir, name)? {
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if is_dir && keep_dir {
            return Ok(true);
        }
        remove_at(dir, name, is_dir)?;
    }
    Ok(false)
}

pub(crate) fn remove_at(dir: BorrowedFd<'_>, name: &CStr, is_dir: bool) -> io::Result<()> {
    if !is_dir {
        return sys::unlink_at(dir, name, false);
    }
    let sub = sys::open_at(dir, name, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let p = sys::proc_fd_path(sub.as_fd());
    for ent in fs::read_dir(OsStr::from_bytes(p.as_bytes()))? {
        let ent = ent?;
        let n = sys::cstr(ent.file_name().as_bytes())?;
        let d = ent.file_type()?.is_dir();
        remove_at(sub.as_fd(), &n, d)?;
    }
    sys::unlink_at(dir, name, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_refuse_dotdot_and_reroot_absolute_names() {
        assert!(components(b"../x").is_err());
        assert!(components(b"a/../../x").is_err());
        assert!(components(b"/../x").is_err());
        assert_eq!(
            components(b"/etc/passwd").unwrap(),
            vec![&b"etc"[..], &b"passwd"[..]]
        );
        assert!(components(b"/").unwrap().is_empty());
        assert_eq!(components(b"./a//b/").unwrap(), vec![&b"a"[..], &b"b"[..]]);
    }

    #[test]
    fn child_test_is_one_level() {
        assert!(is_child(b"a/b", b"a"));
        assert!(!is_child(b"a/b/c", b"a"));
        assert!(is_child(b"x", b""));
        assert!(!is_child(b"ab", b"a"));
    }
}
