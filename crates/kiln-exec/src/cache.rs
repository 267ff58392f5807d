//! `RUN --mount=type=cache` directories: persistent, keyed by id, shared between runs and
//! between kiln processes on one state dir, with BuildKit's `sharing` modes.

use kiln_fs::{FileLock, LockMode};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// BuildKit's `sharing=` for cache mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheSharing {
    /// Any number of steps use the same directory at once.
    Shared,
    /// A step gets a directory no other running step uses: a second instance is made when the
    /// first is busy.
    Private,
    /// Steps take turns: a second step waits until the first releases the directory.
    Locked,
}

/// What a step asks for: `id` plus the owner and mode used when the directory is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheMountRequest {
    /// The cache id (BuildKit defaults it to the target path).
    pub id: String,
    /// Sharing mode.
    pub sharing: CacheSharing,
    /// Owner on creation.
    pub uid: u32,
    /// Group on creation.
    pub gid: u32,
    /// Mode on creation (BuildKit's default 0755).
    pub mode: u32,
}

impl CacheMountRequest {
    /// A request with BuildKit's defaults: shared, root-owned, 0755.
    pub fn new(id: impl Into<String>) -> Self {
        CacheMountRequest {
            id: id.into(),
            sharing: CacheSharing::Shared,
            uid: 0,
            gid: 0,
            mode: 0o755,
        }
    }
}

/// Why a cache mount could not be acquired.
#[derive(Debug, thiserror::Error)]
#[error("cache mount {id:?}: {what} {path}: {source}")]
pub struct CacheMountError {
    /// The cache id.
    pub id: String,
    /// What failed.
    pub what: &'static str,
    /// On what.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

/// The cache-mount directories under one state dir (e.g. `<state>/cache-mounts`).
#[derive(Debug, Clone)]
pub struct CacheMounts {
    dir: PathBuf,
}

/// A cache directory in use by one step; the lock (if any) is released on drop.
#[derive(Debug)]
pub struct CacheMount {
    path: PathBuf,
    _lock: FileLock,
}

impl CacheMount {
    /// The host directory to mount ([`crate::MountKind::Cache`]).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// File-name-safe form of an id: `[A-Za-z0-9._-]` kept, everything else `%XX`.
fn encode_id(id: &str) -> String {
    let mut out = String::from("id-");
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl CacheMounts {
    /// Cache mounts kept under `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CacheMounts { dir: dir.into() }
    }

    /// Takes the cache directory for `req`, blocking for `Locked` while another step (in this
    /// or another kiln process) holds it. Locks are `flock`s, so they die with the process.
    pub fn acquire(&self, req: &CacheMountRequest) -> Result<CacheMount, CacheMountError> {
        let err = |what, path: &Path, source| CacheMountError {
            id: req.id.clone(),
            what,
            path: path.to_path_buf(),
            source,
        };
        let base = self.dir.join(encode_id(&req.id));
        fs::create_dir_all(&base).map_err(|e| err("creating", &base, e))?;
        let mut instance = 0u32;
        loop {
            let lock_path = base.join(format!("{instance}.lock"));
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| err("opening lock", &lock_path, e))?;
            let lock = match req.sharing {
                CacheSharing::Shared => FileLock::lock(file, LockMode::Shared).map(Some),
                CacheSharing::Locked => FileLock::lock(file, LockMode::Exclusive).map(Some),
                CacheSharing::Private => FileLock::try_lock(file, LockMode::Exclusive),
            }
            .map_err(|e| err("locking", &lock_path, e))?;
            let Some(lock) = lock else {
                instance += 1;
                continue;
            };
            let path = base.join(instance.to_string());
            self.create_instance(&path, req)
                .map_err(|e| err("creating", &path, e))?;
            return Ok(CacheMount { path, _lock: lock });
        }
    }

    fn create_instance(&self, path: &Path, req: &CacheMountRequest) -> io::Result<()> {
        if path.is_dir() {
            return Ok(());
        }
        // Made aside and renamed in, so a concurrent step never sees it half set up. The
        // name aside is this call's own: two steps of one build may set up one id at once.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("new-{}-{seq}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::DirBuilder::new().mode(0o700).create(&tmp)?;
        std::os::unix::fs::chown(&tmp, Some(req.uid), Some(req.gid))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(req.mode & 0o7777))?;
        // Never over a directory another step made meanwhile (rename(2) would replace it
        // while it is still empty, from under the step that uses it).
        match rename_noreplace(&tmp, path) {
            Ok(()) => Ok(()),
            Err(_) if path.is_dir() => fs::remove_dir_all(&tmp),
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }
}

/// `rename(2)` that fails with `EEXIST` when `to` exists.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: two valid C strings; renameat2 does not keep them.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn steps_setting_up_one_new_cache_id_at_once_all_get_it() {
        let d = tempfile::tempdir().unwrap();
        let c = std::sync::Arc::new(CacheMounts::new(d.path()));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (c, barrier) = (c.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    c.acquire(&CacheMountRequest::new("meet"))
                        .map(|m| m.path().to_owned())
                })
            })
            .collect();
        for t in threads {
            let path = t.join().unwrap().expect("every step gets the cache dir");
            assert!(path.ends_with("0") && path.is_dir());
        }
        let names: Vec<String> = fs::read_dir(d.path().join(encode_id("meet")))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| n == "0" || n == "0.lock"),
            "leftovers: {names:?}"
        );
    }

    #[test]
    fn private_sharing_hands_out_a_second_dir_while_the_first_is_busy() {
        let d = tempfile::tempdir().unwrap();
        let c = CacheMounts::new(d.path());
        let mut req = CacheMountRequest::new("/root/.cache");
        req.sharing = CacheSharing::Private;
        let a = c.acquire(&req).unwrap();
        let b = c.acquire(&req).unwrap();
        assert_ne!(a.path(), b.path());
        drop(a);
        let again = c.acquire(&req).unwrap();
        assert!(again.path().ends_with("0"));
    }

    #[test]
    fn shared_sharing_hands_out_the_same_dir() {
        let d = tempfile::tempdir().unwrap();
        let c = CacheMounts::new(d.path());
        let req = CacheMountRequest::new("go-build");
        let a = c.acquire(&req).unwrap();
        let b = c.acquire(&req).unwrap();
        assert_eq!(a.path(), b.path());
    }

    #[test]
    fn new_dirs_get_the_requested_mode_and_odd_ids_stay_inside() {
        let d = tempfile::tempdir().unwrap();
        let c = CacheMounts::new(d.path());
        let mut req = CacheMountRequest::new("../../etc");
        req.mode = 0o700;
        let a = c.acquire(&req).unwrap();
        assert!(a.path().starts_with(d.path()));
        assert_eq!(fs::metadata(a.path()).unwrap().mode() & 0o7777, 0o700);
    }
}
