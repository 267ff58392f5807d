//! File operations on a root filesystem, with Docker's semantics: `COPY`/`ADD` (globs,
//! directory-contents copies, trailing-slash rules, `--parents`, `--exclude`, `--chown`,
//! `--chmod`), heredoc files and `WORKDIR` creation.
//!
//! Every path is resolved *inside* its root the way a chroot would resolve it: `..` stops at
//! the root and symlinks (absolute or relative) are followed relative to the root, so neither
//! a source tree nor a destination rootfs can send a write outside itself.
//!
//! FIFOs and device nodes are copied as what they are, and `ADD` unpacks them from archives
//! as such (BuildKit does both; checked with buildkitd v0.24 and `FROM scratch` builds).

use std::fs;
use std::io;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Why a file operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FileOpError {
    #[error("{pattern}: no such file or directory in the {source_name}")]
    NotFound {
        pattern: String,
        source_name: String,
    },
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path}: too many levels of symbolic links")]
    SymlinkLoop { path: String },
    /// A path the operation needs as a directory is something else (a file, a link).
    #[error("{path}: exists and is not a directory")]
    NotADirectory { path: String },
    #[error("--chmod={0}: only octal modes (e.g. 0755) are supported")]
    BadChmod(String),
    #[error("user {0:?} not found in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("group {0:?} not found in the image's /etc/group")]
    UnknownGroup(String),
    #[error("unpacking {path}: {source}")]
    Archive {
        path: String,
        source: kiln_store::StoreError,
    },
}

fn io_at(path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> FileOpError {
    let path = path.as_ref().display().to_string();
    move |source| FileOpError::Io { path, source }
}

/// Splits a path into its normal components, dropping `.`, the root and leading `..`s.
fn clean_components(path: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(s) => out.push(s.to_string_lossy().into_owned()),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Resolves `path` inside `root` as if `root` were `/`: symlinks are followed relative to
/// the root (the last component only when `follow_last`), `..` never climbs above it.
/// The result may not exist yet.
pub fn resolve_in_root(root: &Path, path: &str, follow_last: bool) -> Result<PathBuf, FileOpError> {
    let mut pending: Vec<String> = clean_components(path);
    pending.reverse();
    let mut resolved: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&name);
        let is_last = pending.is_empty();
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() && (!is_last || follow_last) => {
                hops += 1;
                if hops > 40 {
                    return Err(FileOpError::SymlinkLoop {
                        path: path.to_owned(),
                    });
                }
                let target = fs::read_link(&candidate).map_err(io_at(&candidate))?;
                let target = target.to_string_lossy().into_owned();
                if target.starts_with('/') {
                    resolved.clear();
                }
                let mut parts: Vec<String> = Path::new(&target)
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                        Component::ParentDir => Some("..".to_owned()),
                        _ => None,
                    })
                    .collect();
                parts.reverse();
                pending.extend(parts);
            }
            _ => resolved.push(name),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&resolved);
    Ok(out)
}

/// Ownership to give copied or created entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Keep the source's uid/gid (`COPY --from` a stage or image).
    Preserve,
    /// Set these ids (`--chown`, or 0:0 for files from a local context).
    Ids(u32, u32),
}

/// Creates `path` and its missing parents inside `root` (mode `mode`, owned by `owner` for
/// the directories it creates). Returns the host path.
pub fn mkdir_all(root: &Path, path: &str, mode: u32, owner: Owner) -> Result<PathBuf, FileOpError> {
    let mut so_far = String::new();
    let mut host = root.to_path_buf();
    for part in clean_components(path) {
        so_far.push('/');
        so_far.push_str(&part);
        host = resolve_in_root(root, &so_far, true)?;
        match fs::symlink_metadata(&host) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => return Err(FileOpError::NotADirectory { path: so_far }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Resolution replaced every symlink, so the existing part of `host` is real
                // directories inside the root; create whatever is missing below them.
                fs::create_dir_all(&host).map_err(io_at(&so_far))?;
                fs::set_permissions(&host, fs::Permissions::from_mode(mode))
                    .map_err(io_at(&so_far))?;
                if let Owner::Ids(u, g) = owner {
                    std::os::unix::fs::lchown(&host, Some(u), Some(g)).map_err(io_at(&so_far))?;
                }
            }
            Err(e) => return Err(io_at(&so_far)(e)),
        }
    }
    Ok(host)
}

/// Options of one copy.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// The destination names a directory (`dest/`, `.`, the WORKDIR).
    pub dest_is_dir: bool,
    /// Keep each source's path relative to the source root (`--parents`).
    pub parents: bool,
    /// Paths (relative to the source root) to leave out (`--exclude`).
    pub exclude: Vec<String>,
    /// Ownership of copied entries.
    pub owner: Owner,
    /// Permission bits for copied entries (`--chmod`).
    pub chmod: Option<u32>,
    /// Name of the source for error messages ("build context", "stage app").
    pub source_name: String,
    /// `ADD`: a source file that is a tar archive (plain, gzip or zstd) is unpacked into the
    /// destination directory instead of copied.
    pub extract_archives: bool,
}

/// Parses `--chmod` (octal only).
pub fn parse_chmod(s: &str) -> Result<u32, FileOpError> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| FileOpError::BadChmod(s.to_owned()))
}

/// Does a glob pattern (Go `filepath.Match` syntax: `*`, `?`, `[...]`, `\` escapes) match
/// `name`, one path segment at a time?
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<&str> = pattern.split('/').filter(|s| !s.is_empty()).collect();
    let n: Vec<&str> = name.split('/').filter(|s| !s.is_empty()).collect();
    p.len() == n.len()
        && p.iter()
            .zip(&n)
            .all(|(p, n)| segment_match(p.as_bytes(), n.as_bytes()))
}

fn segment_match(p: &[u8], n: &[u8]) -> bool {
    match p.first() {
        None => n.is_empty(),
        Some(b'*') => (0..=n.len()).any(|i| segment_match(&p[1..], &n[i..])),
        Some(b'?') => !n.is_empty() && segment_match(&p[1..], &n[1..]),
        Some(b'[') => {
            let Some(close) = p.iter().skip(1).position(|&c| c == b']').map(|i| i + 1) else {
                return false;
            };
            let Some(&c) = n.first() else { return false };
            let class = &p[1..close];
            let (negate, class) = match class.first() {
                Some(b'^') | Some(b'!') => (true, &class[1..]),
                _ => (false, class),
            };
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == b'-' {
                    hit |= class[i] <= c && c <= class[i + 2];
                    i += 3;
                } else {
                    hit |= class[i] == c;
                    i += 1;
                }
            }
            hit != negate && segment_match(&p[close + 1..], &n[1..])
        }
        Some(b'\\') if p.len() > 1 => n.first() == Some(&p[1]) && segment_match(&p[2..], &n[1..]),
        Some(&c) => n.first() == Some(&c) && segment_match(&p[1..], &n[1..]),
    }
}

fn has_glob(s: &str) -> bool {
    s.bytes().any(|b| matches!(b, b'*' | b'?' | b'['))
}

/// Expands one source pattern against `src_root`: relative paths of what it names.
pub fn expand_source(src_root: &Path, pattern: &str) -> Result<Vec<String>, FileOpError> {
    let parts = clean_components(pattern);
    if !parts.iter().any(|p| has_glob(p)) {
        let host = resolve_in_root(src_root, pattern, true)?;
        if fs::symlink_metadata(&host).is_ok() {
            return Ok(vec![parts.join("/")]);
        }
        return Ok(vec![]);
    }
    let mut found = vec![String::new()];
    for part in &parts {
        let mut next = Vec::new();
        for base in &found {
            let dir = resolve_in_root(src_root, base, true)?;
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            let mut names: Vec<String> = rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            for name in names {
                if segment_match(part.as_bytes(), name.as_bytes()) {
                    next.push(if base.is_empty() {
                        name
                    } else {
                        format!("{base}/{name}")
                    });
                }
            }
        }
        found = next;
    }
    Ok(found)
}

/// Does the folder a wildcard pattern is searched in (its components before the first
/// wildcard) exist in `src_root`?
fn glob_base_exists(src_root: &Path, pattern: &str) -> Result<bool, FileOpError> {
    let base: Vec<String> = clean_components(pattern)
        .into_iter()
        .take_while(|p| !has_glob(p))
        .collect();
    let host = resolve_in_root(src_root, &base.join("/"), true)?;
    Ok(fs::metadata(&host).map(|m| m.is_dir()).unwrap_or(false))
}

/// Does any of `patterns` (COPY sources or `--exclude`s) name `rel` or a directory above it?
/// `.` (or `/`) names everything. To test many paths, compile the patterns once with
/// [`PathSelector::new`].
pub fn selects(patterns: &[String], rel: &str) -> bool {
    PathSelector::new(patterns).selects(rel)
}

/// Patterns (COPY sources, `--exclude`s, mount sources) compiled once: cleaned and split
/// into path segments, so testing a path (a context of thousands of files is tested path by
/// path for every COPY's cache key) allocates nothing and re-parses no pattern.
#[derive(Debug, Clone, Default)]
pub struct PathSelector {
    patterns: Vec<Vec<PatternSegment>>,
    /// A pattern cleaned to nothing (`.`, `/`) names everything.
    everything: bool,
}

/// One segment of a compiled pattern: compared as bytes when it has no wildcard or escape.
#[derive(Debug, Clone)]
enum PatternSegment {
    Literal(String),
    Glob(String),
}

impl PatternSegment {
    fn matches(&self, name: &str) -> bool {
        match self {
            PatternSegment::Literal(l) => l == name,
            PatternSegment::Glob(g) => segment_match(g.as_bytes(), name.as_bytes()),
        }
    }
}

impl PathSelector {
    /// Compiles `patterns` (relative, Go `filepath.Match` syntax per segment).
    pub fn new(patterns: &[String]) -> Self {
        let mut sel = PathSelector::default();
        for p in patterns {
            let parts = clean_components(p);
            if parts.is_empty() {
                sel.everything = true;
                continue;
            }
            sel.patterns.push(
                parts
                    .into_iter()
                    .map(|s| {
                        if s.bytes().any(|b| matches!(b, b'*' | b'?' | b'[' | b'\\')) {
                            PatternSegment::Glob(s)
                        } else {
                            PatternSegment::Literal(s)
                        }
                    })
                    .collect(),
            );
        }
        sel
    }

    /// Whether no pattern was given (an empty `--exclude` list selects nothing).
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty() && !self.everything
    }

    /// Does a pattern name `rel` or a directory above it? A pattern of `k` segments names
    /// `rel` or one of its ancestors exactly when it matches `rel`'s first `k` segments.
    pub fn selects(&self, rel: &str) -> bool {
        self.everything
            || self.patterns.iter().any(|p| {
                let mut segs = rel.split('/').filter(|s| !s.is_empty());
                p.iter()
                    .all(|ps| segs.next().is_some_and(|s| ps.matches(s)))
            })
    }
}

/// Counts of what a copy wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

/// Copies `srcs` (patterns relative to `src_root`) to `dest` inside `dest_root`, as Docker's
/// `COPY` does: a directory's contents (not the directory itself) go into the destination; a
/// file goes to `dest` itself unless `dest` is (or names) a directory.
pub fn copy(
    src_root: &Path,
    srcs: &[String],
    dest_root: &Path,
    dest: &str,
    opts: &CopyOptions,
) -> Result<CopyStats, FileOpError> {
    copy_filtered(src_root, srcs, dest_root, dest, opts, &|_| true)
}

/// [`copy`], but only paths for which `include` holds exist in the source (a build context
/// after `.dockerignore`).
pub fn copy_filtered(
    src_root: &Path,
    srcs: &[String],
    dest_root: &Path,
    dest: &str,
    opts: &CopyOptions,
    include: &dyn Fn(&str) -> bool,
) -> Result<CopyStats, FileOpError> {
    COPY_RANGE_REFUSED.set(false);
    // `--exclude` compiled once for every path of the copy.
    let exclude = PathSelector::new(&opts.exclude);
    let keep = |rel: &str| include(rel) && (exclude.is_empty() || !exclude.selects(rel));
    let include: &dyn Fn(&str) -> bool = &keep;
    let mut matched = Vec::new();
    for pattern in srcs {
        let found: Vec<String> = expand_source(src_root, pattern)?
            .into_iter()
            .filter(|rel| rel.is_empty() || include(rel))
            .collect();
        let globbed = clean_components(pattern).iter().any(|p| has_glob(p));
        // BuildKit copies nothing for a wildcard that matches nothing (`COPY package.json
        // yarn.lock* ./`), but still fails one whose folder before the first wildcard is
        // missing, and any source named without a wildcard.
        if found.is_empty() && globbed && glob_base_exists(src_root, pattern)? {
            continue;
        }
        if found.is_empty() {
            return Err(FileOpError::NotFound {
                pattern: pattern.clone(),
                source_name: opts.source_name.clone(),
            });
        }
        matched.extend(found.into_iter().map(|rel| (rel, globbed)));
    }
    // Several sources onto a path without a trailing `/` are each copied onto that path, the
    // last one winning, as BuildKit does (`COPY build/libs/*.jar app.jar`).
    let dest_dir_named = opts.dest_is_dir || dest.ends_with('/');
    let mut stats = CopyStats::default();
    for (rel, globbed) in &matched {
        let followed = resolve_in_root(src_root, rel, true)?;
        let (src, meta) = match fs::metadata(&followed) {
            Ok(m) => (followed, m),
            // A wildcard match that is a symlink leading nowhere inside the source (an
            // absolute link to a host path, say) is copied as the link, as `COPY .` copies
            // it; only a source named exactly must resolve.
            Err(e) if *globbed && e.kind() == io::ErrorKind::NotFound => {
                let link = resolve_in_root(src_root, rel, false)?;
                let m = fs::symlink_metadata(&link).map_err(io_at(&link))?;
                (link, m)
            }
            Err(e) => return Err(io_at(&followed)(e)),
        };
        // What `.dockerignore` and `--exclude` see below a source reached through a
        // symlink is where the files really are.
        let real_rel = src
            .strip_prefix(src_root)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| rel.clone());
        let base_name = Path::new(rel)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target = if opts.parents {
            let parent = Path::new(rel)
                .parent()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            if meta.is_dir() {
                format!("{dest}/{rel}")
            } else {
                format!("{dest}/{parent}/{base_name}")
            }
        } else if meta.is_dir() {
            dest.to_owned()
        } else if dest_dir_named
            || resolve_in_root(dest_root, dest, true)
                .map(|p| p.is_dir())
                .unwrap_or(false)
        {
            format!("{dest}/{base_name}")
        } else {
            dest.to_owned()
        };
        if meta.is_dir() {
            let dir = mkdir_all(dest_root, &target, 0o755, Owner::Ids(0, 0))?;
            apply_meta(&dir, &meta, opts)?;
            copy_tree(&src, &dir, &real_rel, opts, include, &mut stats)?;
            keep_mtime(&dir, &meta)?;
        } else if opts.extract_archives && meta.is_file() && is_tar_archive(&src) {
            // Docker unpacks into the destination as a directory.
            let dir = mkdir_all(dest_root, dest, 0o755, Owner::Ids(0, 0))?;
            extract_archive(&src, &dir, &mut stats)?;
        } else {
            let parent = Path::new(&target)
                .parent()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            mkdir_all(dest_root, &parent, 0o755, Owner::Ids(0, 0))?;
            // The parent is resolved inside the root; the last component is replaced, never
            // followed.
            let host = resolve_in_root(dest_root, &target, false)?;
            copy_entry(&src, &meta, &host, opts, &mut stats)?;
        }
    }
    Ok(stats)
}

/// Copies the entries of `src_dir` into `dest_dir`, a real directory on the host that the
/// caller resolved inside the destination root (or created there). Each child is addressed
/// as `dest_dir/name`: a single component that is replaced, never followed, so no path is
/// resolved again per file; with tens of thousands of files, per-file resolution of every
/// ancestor was most of a large `COPY --from`'s system calls.
fn copy_tree(
    src_dir: &Path,
    dest_dir: &Path,
    rel_dir: &str,
    opts: &CopyOptions,
    include: &dyn Fn(&str) -> bool,
    stats: &mut CopyStats,
) -> Result<(), FileOpError> {
    let mut names: Vec<_> = fs::read_dir(src_dir)
        .map_err(io_at(src_dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    names.sort();
    for name in names {
        let name_str = name.to_string_lossy();
        let rel = if rel_dir.is_empty() {
            name_str.into_owned()
        } else {
            format!("{rel_dir}/{name_str}")
        };
        // `include` holds the copy's `--exclude`s too (compiled once in `copy_filtered`).
        if !include(&rel) {
            continue;
        }
        let src = src_dir.join(&name);
        let meta = fs::symlink_metadata(&src).map_err(io_at(&src))?;
        let host = dest_dir.join(&name);
        if meta.is_dir() {
            match fs::symlink_metadata(&host) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    fs::remove_file(&host).map_err(io_at(&host))?;
                    fs::create_dir(&host).map_err(io_at(&host))?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&host).map_err(io_at(&host))?;
                }
                Err(e) => return Err(io_at(&host)(e)),
            }
            apply_meta(&host, &meta, opts)?;
            stats.dirs += 1;
            copy_tree(&src, &host, &rel, opts, include, stats)?;
            keep_mtime(&host, &meta)?;
        } else {
            copy_entry(&src, &meta, &host, opts, stats)?;
        }
    }
    Ok(())
}

/// Copies one non-directory entry `src` (described by `meta`) to `host`, replacing what is
/// there.
fn copy_entry(
    src: &Path,
    meta: &fs::Metadata,
    host: &Path,
    opts: &CopyOptions,
    stats: &mut CopyStats,
) -> Result<(), FileOpError> {
    let ft = meta.file_type();
    if ft.is_file() {
        copy_regular_file(src, meta, host, opts)?;
        stats.files += 1;
        stats.bytes += meta.len();
        return Ok(());
    }
    clear_for(host, meta)?;
    if ft.is_symlink() {
        let link = fs::read_link(src).map_err(io_at(src))?;
        std::os::unix::fs::symlink(&link, host).map_err(io_at(host))?;
        stats.symlinks += 1;
    } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
        make_node(host, meta).map_err(io_at(host))?;
        stats.files += 1;
    } else {
        // Sockets cannot be copied (BuildKit leaves them out too).
        return Ok(());
    }
    apply_meta(host, meta, opts)
}

/// Removes what is at `host` so that an entry like `meta`'s can be created there: a
/// directory is replaced by a non-directory, any other entry by anything.
fn clear_for(host: &Path, meta: &fs::Metadata) -> Result<(), FileOpError> {
    if let Ok(existing) = fs::symlink_metadata(host) {
        if existing.is_dir() && !meta.is_dir() {
            fs::remove_dir_all(host).map_err(io_at(host))?;
        } else if !existing.is_dir() {
            fs::remove_file(host).map_err(io_at(host))?;
        }
    }
    Ok(())
}

/// Copies a regular file's bytes and sets its owner, mode and mtime through the open
/// descriptor: two path lookups per file (source and destination) instead of six, and no
/// `stat` of either side. The destination is created exclusively, so an entry already there
/// (a file, a symlink that could lead out of the root, a directory) is removed first and
/// never written through.
fn copy_regular_file(
    src: &Path,
    meta: &fs::Metadata,
    host: &Path,
    opts: &CopyOptions,
) -> Result<(), FileOpError> {
    use std::os::unix::fs::OpenOptionsExt;
    let from = fs::File::open(src).map_err(io_at(src))?;
    let create = || {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(host)
    };
    let to = match create() {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            clear_for(host, meta)?;
            create().map_err(io_at(host))?
        }
        Err(e) => return Err(io_at(host)(e)),
    };
    copy_bytes(&from, &to, meta.len()).map_err(io_at(host))?;
    let (uid, gid) = match opts.owner {
        Owner::Preserve => (meta.uid(), meta.gid()),
        Owner::Ids(u, g) => (u, g),
    };
    // chown before chmod: changing the owner clears set-id bits.
    std::os::unix::fs::fchown(&to, Some(uid), Some(gid)).map_err(io_at(host))?;
    let mode = opts.chmod.unwrap_or(meta.mode() & 0o7777);
    to.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_at(host))?;
    let mtime = meta.modified().map_err(io_at(src))?;
    to.set_times(fs::FileTimes::new().set_modified(mtime))
        .map_err(io_at(host))
}

thread_local! {
    /// Set once `copy_file_range` was refused between the two trees of the current copy
    /// (two overlay mounts are two filesystems to it), so later files go straight to
    /// `sendfile` instead of failing the same call first. Reset by [`copy_filtered`].
    static COPY_RANGE_REFUSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Copies the `len` bytes `from` had when it was stat'ed to `to`: with `copy_file_range`
/// (in-kernel, and a reflink where the filesystem shares extents), else with `sendfile`
/// where the kernel or the filesystems refuse it. A source snapshot does not change under
/// a copy; the length saves the call that would only find the end.
fn copy_bytes(from: &fs::File, to: &fs::File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (src, dst) = (from.as_raw_fd(), to.as_raw_fd());
    let mut left = len;
    while left > 0 && !COPY_RANGE_REFUSED.get() {
        let chunk = left.min(1 << 30) as usize;
        // SAFETY: both descriptors are open for the life of the call; null offsets use and
        // advance the files' own positions.
        let n = unsafe {
            libc::copy_file_range(
                src,
                std::ptr::null_mut(),
                dst,
                std::ptr::null_mut(),
                chunk,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(
                    libc::ENOSYS | libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::EPERM,
                ) => COPY_RANGE_REFUSED.set(true),
                _ => return Err(e),
            }
            continue;
        }
        if n == 0 {
            // The source is shorter than when it was stat'ed: it ends here.
            return Ok(());
        }
        left -= n as u64;
    }
    // Positions advanced only by what was copied; go on from there.
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        // SAFETY: as above; a null offset reads from and advances the source's position.
        let n = unsafe { libc::sendfile(dst, src, std::ptr::null_mut(), chunk) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        left -= n as u64;
    }
    Ok(())
}

/// Sets a copied directory's mtime back to its source's once its children are written
/// (creating them bumped it), so copying the same tree twice gives the same layer.
fn keep_mtime(dir: &Path, meta: &fs::Metadata) -> Result<(), FileOpError> {
    let mtime = filetime::FileTime::from_last_modification_time(meta);
    filetime::set_file_mtime(dir, mtime).map_err(io_at(dir))
}

/// Creates a FIFO or device node like `meta`'s at `host` (which does not exist).
fn make_node(host: &Path, meta: &fs::Metadata) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(host.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let kind = meta.mode() & libc::S_IFMT;
    // SAFETY: a valid C string; mknod does not follow a final symlink, and `host` was just
    // cleared of any entry.
    let r = unsafe { libc::mknod(c.as_ptr(), kind | 0o600, meta.rdev() as libc::dev_t) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn apply_meta(host: &Path, meta: &fs::Metadata, opts: &CopyOptions) -> Result<(), FileOpError> {
    let (uid, gid) = match opts.owner {
        Owner::Preserve => (meta.uid(), meta.gid()),
        Owner::Ids(u, g) => (u, g),
    };
    std::os::unix::fs::lchown(host, Some(uid), Some(gid)).map_err(io_at(host))?;
    let mtime = filetime::FileTime::from_last_modification_time(meta);
    let ft = meta.file_type();
    if !ft.is_symlink() {
        let mode = opts.chmod.unwrap_or(meta.mode() & 0o7777);
        fs::set_permissions(host, fs::Permissions::from_mode(mode)).map_err(io_at(host))?;
    }
    if ft.is_file() || ft.is_dir() {
        filetime::set_file_mtime(host, mtime).map_err(io_at(host))?;
    } else {
        // Without opening it (opening a FIFO waits for a writer), and for a symlink its own
        // time, so a copied tree's links do not carry "now" into its layer.
        filetime::set_symlink_file_times(host, mtime, mtime).map_err(io_at(host))?;
    }
    Ok(())
}

/// Writes an inline (heredoc) file to `dest` inside `root` — into `dest` when it names a
/// directory.
pub fn write_inline(
    root: &Path,
    name: &str,
    content: &str,
    dest: &str,
    dest_is_dir: bool,
    owner: Owner,
    chmod: Option<u32>,
) -> Result<(), FileOpError> {
    let into_dir =
        dest_is_dir || dest.ends_with('/') || resolve_in_root(root, dest, true)?.is_dir();
    let target = if into_dir {
        format!("{dest}/{name}")
    } else {
        dest.to_owned()
    };
    let parent = Path::new(&target)
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    mkdir_all(root, &parent, 0o755, Owner::Ids(0, 0))?;
    let host = resolve_in_root(root, &target, false)?;
    if fs::symlink_metadata(&host).is_ok() {
        fs::remove_file(&host).map_err(io_at(&host))?;
    }
    fs::write(&host, content).map_err(io_at(&host))?;
    fs::set_permissions(&host, fs::Permissions::from_mode(chmod.unwrap_or(0o644)))
        .map_err(io_at(&host))?;
    if let Owner::Ids(u, g) = owner {
        std::os::unix::fs::lchown(&host, Some(u), Some(g)).map_err(io_at(&host))?;
    }
    Ok(())
}

/// Resolves `user[:group]` (names or ids) against the rootfs's `/etc/passwd` and
/// `/etc/group`, as `--chown` and `WORKDIR` ownership need.
pub fn resolve_owner(
    root: &Path,
    user: &str,
    group: Option<&str>,
) -> Result<(u32, u32), FileOpError> {
    let read = |file: &str| fs::read(resolve_in_root(root, file, true).ok()?).ok();
    let lookup =
        |db: &Option<Vec<u8>>, name: &str, id_field: usize| -> Option<(u32, Option<u32>)> {
            let db = db.as_ref()?;
            db.split(|&b| b == b'\n').find_map(|line| {
                let f: Vec<&[u8]> = line.split(|&b| b == b':').collect();
                (f.len() > id_field && f[0] == name.as_bytes()).then(|| {
                    let id = std::str::from_utf8(f[id_field]).ok()?.parse().ok()?;
                    let gid = f
                        .get(3)
                        .and_then(|g| std::str::from_utf8(g).ok()?.parse().ok());
                    Some((id, gid))
                })?
            })
        };
    let passwd = read("/etc/passwd");
    let (uid, primary_gid) = match user.parse::<u32>() {
        Ok(id) => (id, None),
        Err(_) => {
            lookup(&passwd, user, 2).ok_or_else(|| FileOpError::UnknownUser(user.to_owned()))?
        }
    };
    let gid = match group {
        None => primary_gid.unwrap_or(uid),
        Some(g) => match g.parse::<u32>() {
            Ok(id) => id,
            Err(_) => lookup(&read("/etc/group"), g, 2)
                .map(|(g, _)| g)
                .ok_or_else(|| FileOpError::UnknownGroup(g.to_owned()))?,
        },
    };
    Ok((uid, gid))
}

/// Whether `path` holds a tar archive, plain or compressed (gzip, zstd): its first 512-byte
/// block, decompressed, has the `ustar` magic.
pub fn is_tar_archive(path: &Path) -> bool {
    use std::io::Read;
    let Ok(f) = fs::File::open(path) else {
        return false;
    };
    let Ok((_, mut r)) = kiln_oci::compression::decompressing_reader(io::BufReader::new(f)) else {
        return false;
    };
    let mut block = [0u8; 512];
    let mut n = 0;
    while n < block.len() {
        match r.read(&mut block[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => return false,
        }
    }
    n == 512 && &block[257..262] == b"ustar"
}

/// Unpacks the archive at `src` into the directory `dir` with the layer extractor's checks:
/// an entry that would land outside `dir` (`..`, links leading out) fails the step, as in
/// BuildKit. FIFOs and (as root) device nodes are created; `.wh.` names are plain files.
fn extract_archive(src: &Path, dir: &Path, stats: &mut CopyStats) -> Result<(), FileOpError> {
    let f = fs::File::open(src).map_err(io_at(src))?;
    let (_, r) =
        kiln_oci::compression::decompressing_reader(io::BufReader::new(f)).map_err(io_at(src))?;
    let opts = kiln_store::ApplyOptions {
        devices: kiln_store::DevicePolicy::CreateIfRoot,
        ..Default::default()
    };
    let st = kiln_store::unpack_archive(dir, r, &opts).map_err(|source| FileOpError::Archive {
        path: src.display().to_string(),
        source,
    })?;
    stats.files += st.entries;
    stats.bytes += st.bytes;
    Ok(())
}
