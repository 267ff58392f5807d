//! The content store: immutable blobs addressed by digest under `<root>/content/`.
//!
//! Layout: `blobs/<alg>/<hex>` for committed blobs, `ingest/<pid>-<n>.tmp` for blobs being
//! written. A writer holds an exclusive `flock` on its ingest file for its whole life, so a
//! checker can tell a live ingest from one left by a killed process without trusting pids. A
//! blob only appears under `blobs/` by `rename(2)` after its bytes were hashed, compared with
//! the expected digest and size, and fsynced, so no reader ever sees a partial blob.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_oci::{Algorithm, Digest, Hasher};

use crate::error::{Result, StoreError};
use crate::sys;
use kiln_fs::{FileLock, LockMode};

static INGEST_SEQ: AtomicU64 = AtomicU64::new(0);

/// Blobs by digest. Cheap to clone; safe to share between threads and processes.
#[derive(Debug, Clone)]
pub struct ContentStore {
    root: PathBuf,
}

/// A committed blob's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// The content digest.
    pub digest: Digest,
    /// The size in bytes.
    pub size: u64,
}

impl ContentStore {
    /// Opens (creating if needed) the content store at `root` (normally `<state>/content`).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for sub in ["blobs/sha256", "blobs/sha512", "ingest"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(|e| StoreError::io("creating", p, e))?;
        }
        Ok(ContentStore { root })
    }

    /// Where the blob with `digest` lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    pub(crate) fn ingest_dir(&self) -> PathBuf {
        self.root.join("ingest")
    }

    /// Whether the blob is present.
    pub fn has(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// The blob's size, or `None` when it is absent.
    pub fn size(&self, digest: &Digest) -> Result<Option<u64>> {
        let p = self.blob_path(digest);
        match fs::metadata(&p) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("reading blob metadata", p, e)),
        }
    }

    /// Opens the blob for streaming reads (the file is `Read + Seek`).
    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        let p = self.blob_path(digest);
        File::open(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                StoreError::BlobNotFound(digest.clone())
            } else {
                StoreError::io("opening blob", p, e)
            }
        })
    }

    /// Starts writing a new blob hashed with sha256.
    pub fn writer(&self) -> Result<BlobWriter> {
        self.writer_with(Algorithm::Sha256)
    }

    /// Starts writing a blob whose digest will be computed with `algorithm` (use the
    /// algorithm of the digest you will pass to [`BlobWriter::commit`]).
    pub fn writer_with(&self, algorithm: Algorithm) -> Result<BlobWriter> {
        let name = format!(
            "{}-{}.tmp",
            std::process::id(),
            INGEST_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = self.ingest_dir().join(name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| StoreError::io("creating ingest file", &path, e))?;
        // The lock is on the open file description, which `file` (a duplicate) shares.
        let lock = FileLock::try_lock(file, LockMode::Exclusive)
            .and_then(|l| l.ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock)))
            .map_err(|e| StoreError::io("locking ingest file", &path, e))?;
        let file = lock
            .file()
            .try_clone()
            .map_err(|e| StoreError::io("locking ingest file", &path, e))?;
        Ok(BlobWriter {
            store: self.clone(),
            file: Some(io::BufWriter::with_capacity(1 << 20, file)),
            _lock: lock,
            path,
            hasher: Hasher::new(algorithm),
            written: 0,
        })
    }

    /// Stores `data` as a blob and returns its identity.
    pub fn put_bytes(&self, data: &[u8]) -> Result<BlobInfo> {
        let mut w = self.writer()?;
        w.write_all(data)
            .map_err(|e| StoreError::io("writing blob", w.path.clone(), e))?;
        w.commit_computed()
    }

    /// Deletes a blob (GC only: the caller checks that nothing references it).
    pub fn delete(&self, digest: &Digest) -> Result<bool> {
        let p = self.blob_path(digest);
        match fs::remove_file(&p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io("deleting blob", p, e)),
        }
    }

    /// Every committed blob with its size. Names that are not valid digests are reported as
    /// `Err` paths so a checker can list them.
    pub fn list(&self) -> Result<Vec<std::result::Result<BlobInfo, PathBuf>>> {
        let mut out = Vec::new();
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = self.root.join("blobs").join(alg.name());
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io("listing blobs", dir, e)),
            };
            for ent in rd {
                let ent = ent.map_err(|e| StoreError::io("listing blobs", &dir, e))?;
                let name = ent.file_name();
                let parsed = name.to_str().and_then(|n| Digest::new(alg, n).ok());
                let meta = ent
                    .metadata()
                    .map_err(|e| StoreError::io("stat", ent.path(), e))?;
                match parsed {
                    Some(d) if meta.is_file() => out.push(Ok(BlobInfo {
                        digest: d,
                        size: meta.len(),
                    })),
                    _ => out.push(Err(ent.path())),
                }
            }
        }
        Ok(out)
    }

    /// Ingest files whose writer is gone (no process holds their lock, and the file is more
    /// than a few seconds old): left by a crash. Every writer of this directory locks its
    /// file for its whole life: [`BlobWriter`]s and registry downloads alike
    /// (`RegistryClient::pull_blob_to_file` locks its temporary file until it is renamed), so
    /// one process's reclaim never takes another's download in flight.
    pub fn stale_ingests(&self) -> Result<Vec<PathBuf>> {
        let dir = self.ingest_dir();
        let mut out = Vec::new();
        let rd = fs::read_dir(&dir).map_err(|e| StoreError::io("listing ingest", &dir, e))?;
        for ent in rd {
            let ent = ent.map_err(|e| StoreError::io("listing ingest", &dir, e))?;
            let p = ent.path();
            // A writer locks its file right after creating it; a file younger than a few
            // seconds may be in that instant.
            let young = ent
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < std::time::Duration::from_secs(5));
            if young {
                continue;
            }
            let Ok(f) = File::open(&p) else { continue };
            if matches!(FileLock::try_lock(f, LockMode::Exclusive), Ok(Some(_))) {
                out.push(p);
            }
        }
        out.sort();
        Ok(out)
    }
}

/// A blob being written. Implements `Write`; bytes are hashed as they stream in. Nothing is
/// visible to readers until [`BlobWriter::commit`]; dropping the writer discards it.
pub struct BlobWriter {
    store: ContentStore,
    file: Option<io::BufWriter<File>>,
    /// Held for the writer's whole life (declared after `file`, so dropped after it), so
    /// `stale_ingests` in another process never takes a file still being written.
    _lock: FileLock,
    path: PathBuf,
    hasher: Hasher,
    written: u64,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Verifies that the content is exactly `expected` of `size` bytes and makes it visible.
    /// On a mismatch the data is discarded and [`StoreError::DigestMismatch`] returned.
    pub fn commit(self, expected: &Digest, size: u64) -> Result<BlobInfo> {
        self.finish(Some((expected, size)))
    }

    /// Makes the content visible under the digest computed while it streamed in (for content
    /// kiln produced itself, e.g. an exported layer).
    pub fn commit_computed(self) -> Result<BlobInfo> {
        self.finish(None)
    }

    // The only place where a blob becomes visible: verify, fsync, rename, fsync the dir.
    fn finish(mut self, expected: Option<(&Digest, u64)>) -> Result<BlobInfo> {
        let buf = self.file.take().ok_or_else(|| {
            StoreError::io(
                "committing blob",
                &self.path,
                io::Error::other("already committed"),
            )
        })?;
        let file = buf
            .into_inner()
            .map_err(|e| StoreError::io("writing blob", &self.path, e.into_error()))?;
        let hasher = std::mem::replace(&mut self.hasher, Hasher::new(Algorithm::Sha256));
        let actual = hasher.finish();
        if let Some((want, want_size)) = expected {
            if *want != actual || want_size != self.written {
                return Err(StoreError::DigestMismatch {
                    expected: want.clone(),
                    expected_size: want_size,
                    actual,
                    actual_size: self.written,
                });
            }
        }
        file.sync_all()
            .map_err(|e| StoreError::io("syncing blob", &self.path, e))?;
        let dest = self.store.blob_path(&actual);
        // A concurrent writer may have committed the same content; renaming over it is
        // harmless (same bytes), and readers holding it open keep their inode.
        fs::rename(&self.path, &dest).map_err(|e| StoreError::io("committing blob", &dest, e))?;
        if let Some(dir) = dest.parent() {
            sys::fsync_dir(dir).map_err(|e| StoreError::io("syncing blob dir", dir, e))?;
        }
        drop(file);
        Ok(BlobInfo {
            digest: actual,
            size: self.written,
        })
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("blob already committed"))?;
        let n = f.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Not committed (or the commit failed): the ingest file is garbage.
        if self.file.is_some() || self.path.exists() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Reads a blob in full and checks it against its name (used by fsck).
pub(crate) fn verify_blob(path: &Path, digest: &Digest) -> io::Result<Option<(Digest, u64)>> {
    let mut f = File::open(path)?;
    let mut h = Hasher::new(digest.algorithm());
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = io::Read::read(&mut f, &mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    let got = h.finish();
    Ok(if got == *digest { None } else { Some((got, n)) })
}
