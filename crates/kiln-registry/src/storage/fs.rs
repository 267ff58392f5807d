//! [`FsStorage`]: the registry's filesystem layout under `--root`.
//!
//! ```text
//! blobs/<alg>/<hex[0..2]>/<hex>                 content (blobs and manifests), shared
//! uploads/<repo-key>-<id>                       staged upload data
//! repos/<name>/_layers/<alg>/<hex>              empty link: blob visible in <name>
//! repos/<name>/_manifests/revisions/<alg>/<hex> link holding the manifest's media type
//! repos/<name>/_manifests/tags/<tag>            the tagged manifest's digest
//! repos/<name>/_referrers/<alg>/<hex>/<alg>-<hex>  descriptor JSON of a referrer
//! gc.lock                                       flock: commits shared, GC exclusive
//! ```
//!
//! Every file that becomes visible is complete before it gets its name: data is written to
//! a temporary name, fsynced (unless disabled), renamed, and the directory fsynced. Readers
//! only ever look at final names. See `docs/registry.md` for the crash-safety argument.
//!
//! The file operations are blocking; each trait method runs them on tokio's blocking pool.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use kiln_oci::{Algorithm, Digest, Hasher};

use super::upload_hash::{UploadHash, UploadHashes};
use super::{
    BlobContent, BlobInfo, ByteStream, LockMode, ManifestRevision, Storage, StorageError,
    StorageLock, StorageResult, StoredManifest, UploadStats,
};

/// Upload data is written in batches of this size (one blocking write + hash each).
const WRITE_BATCH: usize = 256 << 10;

/// Batches in flight between the receiving task and the blocking writer (or reader).
const PIPELINE_DEPTH: usize = 4;

/// Blobs up to this size are read in one blocking call and sent from memory.
const SMALL_BLOB: u64 = 64 << 10;

/// Hash states kept by default (see [`FsStorage::with_upload_hash_cap`]).
const DEFAULT_HASH_CAP: usize = 10_000;

/// The filesystem storage driver: today's (and every earlier) `--root` layout.
#[derive(Clone)]
pub struct FsStorage {
    layout: Arc<Layout>,
    /// Streaming sha256 state of open uploads, so resumable chunks are hashed once. Lost on
    /// restart; the staged file is then re-hashed.
    hashes: Arc<UploadHashes>,
    /// Chunks whose upload had to be re-hashed from disk because its hash state was gone
    /// (restart, eviction): shows whether hash state is being lost.
    rehashes: Arc<AtomicU64>,
}

/// The directory tree of one registry, and the blocking operations on it.
#[derive(Debug)]
struct Layout {
    root: PathBuf,
    /// fsync files and directories before acknowledging writes (survives power loss, not
    /// only process death).
    sync: bool,
}

/// The repository part of a staged upload's file name: uploads of all repositories share
/// one directory, and a fixed-length key keeps names short whatever the repository name.
fn upload_key(name: &str) -> String {
    Digest::sha256_of(name.as_bytes()).hex()[..16].to_owned()
}

/// The file name under `uploads/` of upload `id` in repository `name`.
fn upload_file_name(name: &str, id: &str) -> String {
    format!("{}-{id}", upload_key(name))
}

/// Splits a staged upload's file name `<repo-key>-<id>` into its parts; `None` for any
/// other file.
fn parse_upload_file(file: &str) -> Option<(&str, &str)> {
    let (k, id) = file.split_once('-')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(k, 16) && hex(id, 32)).then_some((k, id))
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::fill(&mut b[..]);
    hex::encode(b)
}

impl Layout {
    fn open(root: &Path, sync: bool) -> io::Result<Layout> {
        for d in ["blobs", "uploads", "repos"] {
            fs::create_dir_all(root.join(d))?;
        }
        Ok(Layout {
            root: root.to_owned(),
            sync,
        })
    }

    // ---------------------------------------------------------------- locking

    /// Takes `gc.lock` shared (every commit) or exclusive (GC). Blocks.
    fn gc_lock(&self, exclusive: bool) -> io::Result<kiln_fs::FileLock> {
        let mode = if exclusive {
            kiln_fs::LockMode::Exclusive
        } else {
            kiln_fs::LockMode::Shared
        };
        kiln_fs::FileLock::open(&self.root.join("gc.lock"), mode)
    }

    // ---------------------------------------------------------------- paths

    fn blob_path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root
            .join("blobs")
            .join(d.algorithm().name())
            .join(&hex[..2])
            .join(hex)
    }

    fn repo_dir(&self, name: &str) -> PathBuf {
        self.root.join("repos").join(name)
    }

    fn layer_link(&self, name: &str, d: &Digest) -> PathBuf {
        self.repo_dir(name)
            .join("_layers")
            .join(d.algorithm().name())
            .join(d.hex())
    }

    fn revision_link(&self, name: &str, d: &Digest) -> PathBuf {
        self.repo_dir(name)
            .join("_manifests/revisions")
            .join(d.algorithm().name())
            .join(d.hex())
    }

    fn tags_dir(&self, name: &str) -> PathBuf {
        self.repo_dir(name).join("_manifests/tags")
    }

    fn referrers_dir(&self, name: &str, subject: &Digest) -> PathBuf {
        self.repo_dir(name)
            .join("_referrers")
            .join(subject.algorithm().name())
            .join(subject.hex())
    }

    fn upload_path(&self, name: &str, id: &str) -> PathBuf {
        self.root.join("uploads").join(upload_file_name(name, id))
    }

    // ---------------------------------------------------------------- durable writes

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if self.sync {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Renames `from` to `to`, creating `to`'s parent on demand, then syncs the parent.
    fn rename_into_place(&self, from: &Path, to: &Path) -> io::Result<()> {
        let parent = to
            .parent()
            .ok_or_else(|| io::Error::other("path without parent"))?;
        match fs::rename(from, to) {
            Err(e) if e.kind() == ErrorKind::NotFound && from.exists() => {
                fs::create_dir_all(parent)?;
                fs::rename(from, to)?;
            }
            r => r?,
        }
        self.sync_dir(parent)
    }

    /// Writes `data` to `path` atomically: temp file beside it, fsync, rename, fsync dir.
    fn write_atomic(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let parent = path
            .parent()
            .ok_or_else(|| io::Error::other("path without parent"))?;
        let tmp = parent.join(format!(".tmp-{}", random_hex(8)));
        let mut f = match File::create(&tmp) {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                fs::create_dir_all(parent)?;
                File::create(&tmp)?
            }
            r => r?,
        };
        let res = f
            .write_all(data)
            .and_then(|()| if self.sync { f.sync_data() } else { Ok(()) });
        drop(f);
        if let Err(e) = res.and_then(|()| self.rename_into_place(&tmp, path)) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(())
    }

    // ---------------------------------------------------------------- blobs

    fn blob_size(&self, d: &Digest) -> io::Result<Option<u64>> {
        match fs::metadata(self.blob_path(d)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Refreshes a blob's mtime so a GC running now treats it as freshly pushed.
    fn touch_blob(&self, d: &Digest) {
        // Only refresh stale times: a HEAD storm on a hot blob should not write metadata.
        let fresh = fs::metadata(self.blob_path(d))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < Duration::from_secs(60));
        if fresh {
            return;
        }
        let _ = File::options()
            .append(true)
            .open(self.blob_path(d))
            .and_then(|f| f.set_modified(SystemTime::now()));
    }

    /// Opens blob `d` at `offset`: small reads come back whole, larger ones as a stream.
    fn read_blob(&self, d: &Digest, offset: u64, len: u64) -> io::Result<Option<BlobContent>> {
        let mut file = match File::open(self.blob_path(d)) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if offset > 0 {
            file.seek(io::SeekFrom::Start(offset))?;
        }
        if len <= SMALL_BLOB {
            let mut data = Vec::with_capacity(len as usize);
            file.take(len).read_to_end(&mut data)?;
            return Ok(Some(BlobContent::Bytes(Bytes::from(data))));
        }
        Ok(Some(BlobContent::Stream(file_stream(file, len))))
    }

    /// Every blob under `blobs/` with its size and modification time.
    fn blobs(&self) -> io::Result<Vec<BlobInfo>> {
        let mut out = Vec::new();
        for alg in ["sha256", "sha512"] {
            let Ok(prefixes) = fs::read_dir(self.root.join("blobs").join(alg)) else {
                continue;
            };
            for p in prefixes.flatten() {
                let Ok(files) = fs::read_dir(p.path()) else {
                    continue;
                };
                for f in files.flatten() {
                    let name = f.file_name().to_string_lossy().into_owned();
                    let Ok(digest) = format!("{alg}:{name}").parse::<Digest>() else {
                        continue;
                    };
                    let meta = f.metadata().ok();
                    out.push(BlobInfo {
                        digest,
                        size: meta.as_ref().map(|m| m.len()).unwrap_or(0),
                        modified: meta.and_then(|m| m.modified().ok()),
                    });
                }
            }
        }
        Ok(out)
    }

    fn delete_blob(&self, d: &Digest) -> io::Result<bool> {
        remove_if_present(&self.blob_path(d))
    }

    /// Makes an existing blob visible in `name` (push of already-present content, mount).
    fn link_blob(&self, name: &str, d: &Digest) -> io::Result<()> {
        let link = self.layer_link(name, d);
        if link.exists() {
            return Ok(());
        }
        let parent = link
            .parent()
            .ok_or_else(|| io::Error::other("link without parent"))?;
        match File::create(&link) {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                fs::create_dir_all(parent)?;
                File::create(&link)?;
            }
            r => {
                r?;
            }
        }
        self.sync_dir(parent)
    }

    /// Total bytes in the blob store.
    fn stored_bytes(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            let Ok(rd) = fs::read_dir(p) else { return 0 };
            rd.filter_map(|e| e.ok())
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => walk(&e.path()),
                    Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
                    Err(_) => 0,
                })
                .sum()
        }
        walk(&self.root.join("blobs"))
    }

    // ---------------------------------------------------------------- uploads

    /// Starts an upload session for `name`; returns its id.
    fn create_upload(&self, name: &str) -> io::Result<String> {
        let id = random_hex(16);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.upload_path(name, &id))?;
        Ok(id)
    }

    /// Counts staged uploads: `(in all repositories, in name)`. Monolithic uploads in
    /// progress count too; they hold a file for as long as their request runs.
    fn count_uploads(&self, name: &str) -> io::Result<(usize, usize)> {
        let key = upload_key(name);
        let (mut total, mut here) = (0, 0);
        for e in fs::read_dir(self.root.join("uploads"))? {
            let file = e?.file_name();
            let Some(file) = file.to_str() else { continue };
            if let Some((k, _)) = parse_upload_file(file) {
                total += 1;
                if k == key {
                    here += 1;
                }
            }
        }
        Ok((total, here))
    }

    /// Removes staged uploads that hold no data and were created (or last written) more than
    /// `age` ago: sessions a client opened and never used. Returns how many went. A client
    /// that comes back to one later gets `BLOB_UPLOAD_UNKNOWN` and starts over, which costs
    /// it nothing since nothing was sent. Files named in `busy` (see [`upload_file_name`])
    /// have a request writing to them and are kept: a slow body may not have filled its
    /// first write batch yet.
    fn reclaim_empty_uploads(
        &self,
        age: Duration,
        busy: &std::collections::HashSet<String>,
    ) -> io::Result<usize> {
        let now = SystemTime::now();
        let mut removed = 0;
        for e in fs::read_dir(self.root.join("uploads"))? {
            let e = e?;
            let file = e.file_name();
            match file.to_str() {
                Some(f) if parse_upload_file(f).is_some() && !busy.contains(f) => {}
                _ => continue,
            }
            let Ok(meta) = e.metadata() else { continue };
            // Age 0 reclaims every empty upload, even one whose timestamp reads as just
            // ahead of this clock.
            let idle = age.is_zero()
                || meta
                    .modified()
                    .ok()
                    .and_then(|m| now.duration_since(m).ok())
                    .is_some_and(|d| d >= age);
            if meta.len() == 0 && idle {
                match fs::remove_file(e.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(removed)
    }

    /// Removes every file under `uploads/` last written more than `age` ago (abandoned).
    fn sweep_uploads(&self, age: Duration) -> io::Result<usize> {
        let mut removed = 0;
        if let Ok(rd) = fs::read_dir(self.root.join("uploads")) {
            for e in rd.flatten() {
                if !is_young(&e.path(), age) && fs::remove_file(e.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Opens the staged data of an upload for appending; `None` when the id is unknown in
    /// this repository.
    fn open_upload(&self, name: &str, id: &str) -> io::Result<Option<(File, u64)>> {
        if !is_upload_id(id) {
            return Ok(None);
        }
        match OpenOptions::new()
            .read(true)
            .append(true)
            .open(self.upload_path(name, id))
        {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn upload_size(&self, name: &str, id: &str) -> io::Result<Option<u64>> {
        Ok(self.open_upload(name, id)?.map(|(_, n)| n))
    }

    fn delete_upload(&self, name: &str, id: &str) -> io::Result<bool> {
        if self.open_upload(name, id)?.is_none() {
            return Ok(false);
        }
        fs::remove_file(self.upload_path(name, id))?;
        Ok(true)
    }

    /// Moves a verified upload into the blob store and links it into `name`.
    fn commit_upload(&self, name: &str, id: &str, file: File, d: &Digest) -> io::Result<()> {
        if self.sync {
            file.sync_data()?;
        }
        drop(file);
        let _lock = self.gc_lock(false)?;
        self.rename_into_place(&self.upload_path(name, id), &self.blob_path(d))?;
        self.link_blob(name, d)
    }

    // ---------------------------------------------------------------- manifests

    /// The media type a manifest was pushed with, when `name` holds it.
    fn manifest_media_type(&self, name: &str, d: &Digest) -> io::Result<Option<String>> {
        read_if_present(&self.revision_link(name, d))
    }

    fn get_manifest(&self, name: &str, d: &Digest) -> io::Result<Option<StoredManifest>> {
        let Some(media_type) = self.manifest_media_type(name, d)? else {
            return Ok(None);
        };
        match fs::read(self.blob_path(d)) {
            Ok(bytes) => Ok(Some(StoredManifest {
                media_type,
                bytes: Bytes::from(bytes),
            })),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stores a manifest's content (unless present) and then its revision link.
    fn put_manifest(
        &self,
        name: &str,
        digest: &Digest,
        media_type: &str,
        bytes: &[u8],
    ) -> io::Result<()> {
        let blob = self.blob_path(digest);
        if !blob.exists() {
            self.write_atomic(&blob, bytes)?;
        } else {
            self.touch_blob(digest);
        }
        self.write_atomic(&self.revision_link(name, digest), media_type.as_bytes())
    }

    /// Manifest revisions of `name` with the modification times of their links.
    fn manifests(&self, name: &str) -> io::Result<Vec<ManifestRevision>> {
        let dir = self.repo_dir(name).join("_manifests/revisions");
        Ok(list_digests(&dir)
            .into_iter()
            .map(|(digest, path)| ManifestRevision {
                modified: fs::metadata(path).and_then(|m| m.modified()).ok(),
                digest,
            })
            .collect())
    }

    fn repo_exists(&self, name: &str) -> bool {
        self.repo_dir(name).join("_manifests").is_dir()
            || self.repo_dir(name).join("_layers").is_dir()
    }

    /// Tags of `name`, sorted; `None` when the repository is unknown.
    fn tags(&self, name: &str) -> io::Result<Option<Vec<String>>> {
        if !self.repo_exists(name) {
            return Ok(None);
        }
        let mut tags = Vec::new();
        match fs::read_dir(self.tags_dir(name)) {
            Ok(rd) => {
                for e in rd {
                    let n = e?.file_name().to_string_lossy().into_owned();
                    if !n.starts_with(".tmp-") {
                        tags.push(n);
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        tags.sort();
        Ok(Some(tags))
    }

    /// Referrer entries of `subject` in `name`, in file name order.
    fn referrers(&self, name: &str, subject: &Digest) -> io::Result<Vec<(Digest, Bytes)>> {
        let mut out = Vec::new();
        let dir = self.referrers_dir(name, subject);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        let mut names: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        names.sort();
        for n in names {
            let n = n.to_string_lossy().into_owned();
            if n.starts_with(".tmp-") {
                continue;
            }
            let Some((alg, hex)) = n.split_once('-') else {
                continue;
            };
            let Ok(d) = format!("{alg}:{hex}").parse::<Digest>() else {
                continue;
            };
            if let Ok(b) = fs::read(dir.join(&n)) {
                out.push((d, Bytes::from(b)));
            }
        }
        Ok(out)
    }

    fn referrer_entry(&self, name: &str, subject: &Digest, referrer: &Digest) -> PathBuf {
        self.referrers_dir(name, subject).join(format!(
            "{}-{}",
            referrer.algorithm().name(),
            referrer.hex()
        ))
    }

    /// Every repository name, sorted.
    fn repositories(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        let base = self.root.join("repos");
        let mut stack = vec![(base.clone(), String::new())];
        while let Some((dir, prefix)) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let mut is_repo = false;
            for e in rd {
                let e = e?;
                let n = e.file_name().to_string_lossy().into_owned();
                if n == "_manifests" || n == "_layers" {
                    is_repo = true;
                } else if !n.starts_with(['_', '.']) && e.file_type()?.is_dir() {
                    let p = if prefix.is_empty() {
                        n.clone()
                    } else {
                        format!("{prefix}/{n}")
                    };
                    stack.push((e.path(), p));
                }
            }
            if is_repo && !prefix.is_empty() {
                out.push(prefix);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes temporary files of writers killed before their rename, once older than
    /// `grace`: in the blob store, and under each repository's `_manifests` and `_referrers`
    /// trees. A writer renames its temporary file within one request, so one older than the
    /// grace period belongs to a process that died before the rename; nothing reads these
    /// names (every listing skips them), so removing one never loses data.
    fn sweep_interrupted_writes(&self, grace: Duration) -> io::Result<()> {
        let mut stack = vec![self.root.join("blobs")];
        for repo in self.repositories()? {
            let dir = self.repo_dir(&repo);
            stack.push(dir.join("_manifests"));
            stack.push(dir.join("_referrers"));
        }
        while let Some(dir) = stack.pop() {
            let Ok(rd) = fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let path = e.path();
                match e.file_type() {
                    Ok(t) if t.is_dir() => stack.push(path),
                    Ok(_)
                        if e.file_name().to_string_lossy().starts_with(".tmp-")
                            && !is_young(&path, grace) =>
                    {
                        let _ = fs::remove_file(&path);
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// Whether `id` has the form of an upload id (so it cannot name another path).
fn is_upload_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether the file at `path` was modified less than `age` ago (unreadable: no).
fn is_young(path: &Path, age: Duration) -> bool {
    super::is_recent(fs::metadata(path).and_then(|m| m.modified()).ok(), age)
}

fn remove_if_present(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn read_if_present(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Digests named by the files of `dir/<alg>/` (links), with their paths.
fn list_digests(dir: &Path) -> Vec<(Digest, PathBuf)> {
    let mut out = Vec::new();
    for alg in ["sha256", "sha512"] {
        let Ok(rd) = fs::read_dir(dir.join(alg)) else {
            continue;
        };
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Ok(d) = format!("{alg}:{n}").parse::<Digest>() {
                out.push((d, e.path()));
            }
        }
    }
    out
}

/// Digest of a staged upload's data under `alg`, read from the start.
fn hash_file(file: &mut File, alg: Algorithm) -> io::Result<Hasher> {
    file.seek(io::SeekFrom::Start(0))?;
    let mut h = Hasher::new(alg);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h)
}

/// Streams `len` bytes of `file` from its current position: a blocking reader fills
/// `WRITE_BATCH`-sized buffers ahead of the network (at most `PIPELINE_DEPTH` in flight).
fn file_stream(file: File, len: u64) -> ByteStream {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(PIPELINE_DEPTH);
    tokio::task::spawn_blocking(move || {
        let mut file = file.take(len);
        let mut left = len;
        while left > 0 {
            let n = left.min(WRITE_BATCH as u64);
            let mut buf = Vec::with_capacity(n as usize);
            let item = match (&mut file).take(n).read_to_end(&mut buf) {
                Ok(0) => Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "blob shorter than its size",
                )),
                Ok(got) => {
                    left -= got as u64;
                    Ok(Bytes::from(buf))
                }
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                break; // reader gone, or error already reported
            }
        }
    });
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// A staged file being appended to, with the running hash and byte count.
struct Sink {
    file: File,
    hasher: Hasher,
    written: u64,
}

/// The blocking writer of an upload pipeline; gives the sink back when done.
type WriterTask = tokio::task::JoinHandle<(Sink, Result<(), String>)>;

/// Appends `data` to `sink`, hashing as it goes. Data that fits one batch is written with a
/// single blocking call; more streams through a bounded channel to a blocking writer, so
/// receiving, hashing and writing overlap while memory per upload stays under
/// `WRITE_BATCH * (PIPELINE_DEPTH + 2)`. On a stream error (truncated upload, client gone)
/// the sink holds what was written so far.
async fn append_stream(sink: Sink, mut data: ByteStream) -> (Sink, Result<(), String>) {
    let mut buf = bytes::BytesMut::new();
    let mut result = Ok(());
    let mut writer: Option<(tokio::sync::mpsc::Sender<Bytes>, WriterTask)> = None;
    let mut sink = Some(sink);
    loop {
        match data.next().await {
            None => break,
            Some(Err(e)) => {
                result = Err(e.to_string());
                break;
            }
            Some(Ok(chunk)) => {
                buf.extend_from_slice(&chunk);
                if buf.len() < WRITE_BATCH {
                    continue;
                }
                let chunk = buf.split().freeze();
                let (tx, _) = writer.get_or_insert_with(|| {
                    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(PIPELINE_DEPTH);
                    let sink = sink.take().expect("sink moves to the writer once");
                    (
                        tx,
                        tokio::task::spawn_blocking(move || write_stream(sink, rx)),
                    )
                });
                if tx.send(chunk).await.is_err() {
                    break; // the writer failed; its result says why
                }
            }
        }
    }
    match writer {
        None => {
            let sink = sink.expect("sink still here without a writer");
            if result.is_ok() && !buf.is_empty() {
                return write_chunk(sink, buf.freeze()).await;
            }
            (sink, result)
        }
        Some((tx, handle)) => {
            if result.is_ok() && !buf.is_empty() {
                let _ = tx.send(buf.freeze()).await;
            }
            drop(tx);
            let (sink, wr) = match handle.await {
                Ok(x) => x,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            };
            (sink, wr.and(result))
        }
    }
}

/// The blocking half of the upload pipeline: write and hash chunks until the channel closes.
fn write_stream(
    mut sink: Sink,
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> (Sink, Result<(), String>) {
    while let Some(chunk) = rx.blocking_recv() {
        if let Err(e) = sink.file.write_all(&chunk) {
            return (sink, Err(format!("writing upload: {e}")));
        }
        sink.hasher.update(&chunk);
        sink.written += chunk.len() as u64;
    }
    (sink, Ok(()))
}

async fn write_chunk(sink: Sink, chunk: Bytes) -> (Sink, Result<(), String>) {
    // The sink moves into the blocking task and back; if the task is lost the file is only
    // staged data, never visible.
    let h = tokio::task::spawn_blocking(move || {
        let mut sink = sink;
        let r = sink.file.write_all(&chunk);
        if r.is_ok() {
            sink.hasher.update(&chunk);
            sink.written += chunk.len() as u64;
        }
        (sink, r.map_err(|e| format!("writing upload: {e}")))
    });
    match h.await {
        Ok(x) => x,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Runs blocking work on tokio's blocking pool; a lost task is an I/O error.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> StorageResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => Ok(r?),
        Err(e) => Err(StorageError::Io(io::Error::other(e))),
    }
}

impl FsStorage {
    /// Opens (creating if missing) the registry tree under `root`. With `fsync`, data and
    /// directories are synced before a write is acknowledged (power-loss safety).
    pub fn open(root: &Path, fsync: bool) -> io::Result<FsStorage> {
        Ok(FsStorage {
            layout: Arc::new(Layout::open(root, fsync)?),
            hashes: Arc::new(UploadHashes::new(DEFAULT_HASH_CAP)),
            rehashes: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Keeps streaming hash state for at most about `cap` idle uploads (default 10 000).
    pub fn with_upload_hash_cap(mut self, cap: usize) -> FsStorage {
        self.hashes = Arc::new(UploadHashes::new(cap));
        self
    }

    /// The storage root.
    pub fn root(&self) -> &Path {
        &self.layout.root
    }

    /// Runs `f` on the layout on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Layout) -> io::Result<T> + Send + 'static,
    ) -> StorageResult<T> {
        let layout = self.layout.clone();
        blocking(move || f(&layout)).await
    }

    /// The hash-state entry of an upload that exists; `UploadUnknown` (and no entry)
    /// otherwise, so made-up ids never take a slot.
    async fn upload_entry(&self, repo: &str, id: &str) -> StorageResult<UploadHash> {
        if let Some(h) = self.hashes.get(repo, id) {
            return Ok(h);
        }
        if self.upload_size(repo, id).await?.is_none() {
            return Err(StorageError::UploadUnknown);
        }
        Ok(self.hashes.insert(repo, id))
    }

    /// Opens upload `id` of `repo` for appending: `(file, size)`.
    async fn open_upload(&self, repo: &str, id: &str) -> StorageResult<(File, u64)> {
        let (r, i) = (repo.to_owned(), id.to_owned());
        self.run(move |l| l.open_upload(&r, &i))
            .await?
            .ok_or(StorageError::UploadUnknown)
    }
}

#[async_trait]
impl Storage for FsStorage {
    fn location(&self) -> String {
        self.layout.root.display().to_string()
    }

    async fn lock(&self, mode: LockMode) -> StorageResult<StorageLock> {
        let exclusive = mode == LockMode::Exclusive;
        let held = self.run(move |l| l.gc_lock(exclusive)).await?;
        Ok(StorageLock::new(held))
    }

    async fn blob_size(&self, d: &Digest) -> StorageResult<Option<u64>> {
        let d = d.clone();
        self.run(move |l| l.blob_size(&d)).await
    }

    async fn read_blob(
        &self,
        d: &Digest,
        offset: u64,
        len: u64,
    ) -> StorageResult<Option<BlobContent>> {
        let d = d.clone();
        self.run(move |l| l.read_blob(&d, offset, len)).await
    }

    async fn touch_blob(&self, d: &Digest) {
        let d = d.clone();
        let _ = self
            .run(move |l| {
                l.touch_blob(&d);
                Ok(())
            })
            .await;
    }

    async fn delete_blob(&self, d: &Digest) -> StorageResult<bool> {
        let d = d.clone();
        self.run(move |l| l.delete_blob(&d)).await
    }

    async fn blobs(&self) -> StorageResult<Vec<BlobInfo>> {
        self.run(|l| l.blobs()).await
    }

    async fn stored_bytes(&self) -> StorageResult<u64> {
        self.run(|l| Ok(l.stored_bytes())).await
    }

    async fn link_blob(&self, repo: &str, d: &Digest) -> StorageResult<()> {
        let (r, d) = (repo.to_owned(), d.clone());
        self.run(move |l| l.link_blob(&r, &d)).await
    }

    async fn unlink_blob(&self, repo: &str, d: &Digest) -> StorageResult<bool> {
        let (r, d) = (repo.to_owned(), d.clone());
        self.run(move |l| remove_if_present(&l.layer_link(&r, &d)))
            .await
    }

    async fn is_linked(&self, repo: &str, d: &Digest) -> StorageResult<bool> {
        let (r, d) = (repo.to_owned(), d.clone());
        self.run(move |l| Ok(l.layer_link(&r, &d).exists())).await
    }

    async fn linked_blobs(&self, repo: &str) -> StorageResult<Vec<Digest>> {
        let r = repo.to_owned();
        self.run(move |l| {
            let dir = l.repo_dir(&r).join("_layers");
            Ok(list_digests(&dir).into_iter().map(|(d, _)| d).collect())
        })
        .await
    }

    async fn start_upload(&self, repo: &str) -> StorageResult<String> {
        let r = repo.to_owned();
        self.run(move |l| l.create_upload(&r)).await
    }

    async fn upload_size(&self, repo: &str, id: &str) -> StorageResult<Option<u64>> {
        let (r, i) = (repo.to_owned(), id.to_owned());
        self.run(move |l| l.upload_size(&r, &i)).await
    }

    async fn append_upload(
        &self,
        repo: &str,
        id: &str,
        offset: Option<u64>,
        data: ByteStream,
    ) -> StorageResult<u64> {
        let entry = self.upload_entry(repo, id).await?;
        let mut state = entry.lock().await;
        let (mut file, size) = self.open_upload(repo, id).await?;
        if offset.is_some_and(|o| o != size) {
            return Err(StorageError::UploadOutOfOrder { size });
        }
        let hasher = match state.take() {
            Some((hashed, h)) if hashed == size => h,
            _ => {
                if size > 0 {
                    self.rehashes.fetch_add(1, Relaxed);
                }
                let (f, h) = blocking(move || {
                    let h = hash_file(&mut file, Algorithm::Sha256)?;
                    Ok((file, h))
                })
                .await?;
                file = f;
                h
            }
        };
        let sink = Sink {
            file,
            hasher,
            written: size,
        };
        let (mut sink, r) = append_stream(sink, data).await;
        if let Err(e) = r {
            // Cut the staged file back to where the chunk started, so a truncated chunk
            // leaves the upload resumable from its last good size.
            let file = sink.file;
            let _ = blocking(move || file.set_len(size)).await;
            return Err(StorageError::UploadData(e));
        }
        sink.written = sink
            .file
            .metadata()
            .map(|m| m.len())
            .unwrap_or(sink.written);
        *state = Some((sink.written, sink.hasher));
        Ok(sink.written)
    }

    async fn finish_upload(&self, repo: &str, id: &str, expected: &Digest) -> StorageResult<()> {
        let entry = self.upload_entry(repo, id).await?;
        let mut state = entry.lock().await;
        let (mut file, size) = self.open_upload(repo, id).await?;
        let actual = match state.take() {
            Some((hashed, h)) if hashed == size && expected.algorithm() == Algorithm::Sha256 => {
                h.finish()
            }
            _ => {
                let alg = expected.algorithm();
                let (f, h) = blocking(move || {
                    let h = hash_file(&mut file, alg)?;
                    Ok((file, h))
                })
                .await?;
                file = f;
                h.finish()
            }
        };
        if &actual != expected {
            // The upload stays open at its current size so the client may retry.
            return Err(StorageError::DigestMismatch { actual, size });
        }
        let (r, i, d) = (repo.to_owned(), id.to_owned(), expected.clone());
        self.run(move |l| l.commit_upload(&r, &i, file, &d)).await?;
        drop(state);
        self.hashes.forget(repo, id);
        Ok(())
    }

    async fn cancel_upload(&self, repo: &str, id: &str) -> StorageResult<bool> {
        let entry = match self.upload_entry(repo, id).await {
            Ok(e) => e,
            Err(StorageError::UploadUnknown) => return Ok(false),
            Err(e) => return Err(e),
        };
        let _state = entry.lock().await;
        let (r, i) = (repo.to_owned(), id.to_owned());
        let found = self.run(move |l| l.delete_upload(&r, &i)).await;
        self.hashes.forget(repo, id);
        found
    }

    async fn count_uploads(&self, repo: &str) -> StorageResult<(usize, usize)> {
        let r = repo.to_owned();
        self.run(move |l| l.count_uploads(&r)).await
    }

    async fn reclaim_empty_uploads(&self, age: Duration) -> StorageResult<usize> {
        let busy = self
            .hashes
            .busy()
            .into_iter()
            .map(|(r, i)| upload_file_name(&r, &i))
            .collect();
        self.run(move |l| l.reclaim_empty_uploads(age, &busy)).await
    }

    async fn sweep_uploads(&self, age: Duration) -> StorageResult<usize> {
        self.run(move |l| l.sweep_uploads(age)).await
    }

    fn upload_stats(&self) -> UploadStats {
        UploadStats {
            hash_states: self.hashes.len(),
            rehashes: self.rehashes.load(Relaxed),
        }
    }

    async fn put_manifest(
        &self,
        repo: &str,
        d: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> StorageResult<()> {
        let (r, d, mt) = (repo.to_owned(), d.clone(), media_type.to_owned());
        self.run(move |l| l.put_manifest(&r, &d, &mt, &bytes)).await
    }

    async fn manifest_media_type(&self, repo: &str, d: &Digest) -> StorageResult<Option<String>> {
        let (r, d) = (repo.to_owned(), d.clone());
        self.run(move |l| l.manifest_media_type(&r, &d)).await
    }

    async fn get_manifest(&self, repo: &str, d: &Digest) -> StorageResult<Option<StoredManifest>> {
        let (r, d) = (repo.to_owned(), d.clone());
        self.run(move |l| l.get_manifest(&r, &d)).await
    }

    async fn delete_manifest(&self, repo: &str, d: &Digest) -> StorageResult<bool> {
        let (r, d) = (repo.to_owned(), d.clone());
        self.run(move |l| remove_if_present(&l.revision_link(&r, &d)))
            .await
    }

    async fn manifests(&self, repo: &str) -> StorageResult<Vec<ManifestRevision>> {
        let r = repo.to_owned();
        self.run(move |l| l.manifests(&r)).await
    }

    async fn put_tag(&self, repo: &str, tag: &str, d: &Digest) -> StorageResult<()> {
        let (r, t, d) = (repo.to_owned(), tag.to_owned(), d.to_string());
        self.run(move |l| l.write_atomic(&l.tags_dir(&r).join(t), d.as_bytes()))
            .await
    }

    async fn get_tag(&self, repo: &str, tag: &str) -> StorageResult<Option<String>> {
        let (r, t) = (repo.to_owned(), tag.to_owned());
        let target = self
            .run(move |l| read_if_present(&l.tags_dir(&r).join(t)))
            .await?;
        Ok(target.map(|s| s.trim().to_owned()))
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> StorageResult<bool> {
        let (r, t) = (repo.to_owned(), tag.to_owned());
        self.run(move |l| remove_if_present(&l.tags_dir(&r).join(t)))
            .await
    }

    async fn list_tags(
        &self,
        repo: &str,
        last: Option<&str>,
        limit: Option<usize>,
    ) -> StorageResult<Option<Vec<String>>> {
        let r = repo.to_owned();
        let tags = self.run(move |l| l.tags(&r)).await?;
        Ok(tags.map(|tags| super::page(tags, last, limit)))
    }

    async fn add_referrer(
        &self,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
        descriptor: Bytes,
    ) -> StorageResult<()> {
        let (r, s, d) = (repo.to_owned(), subject.clone(), referrer.clone());
        self.run(move |l| l.write_atomic(&l.referrer_entry(&r, &s, &d), &descriptor))
            .await
    }

    async fn remove_referrer(
        &self,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
    ) -> StorageResult<()> {
        let (r, s, d) = (repo.to_owned(), subject.clone(), referrer.clone());
        self.run(move |l| remove_if_present(&l.referrer_entry(&r, &s, &d)).map(|_| ()))
            .await
    }

    async fn referrers(&self, repo: &str, subject: &Digest) -> StorageResult<Vec<(Digest, Bytes)>> {
        let (r, s) = (repo.to_owned(), subject.clone());
        self.run(move |l| l.referrers(&r, &s)).await
    }

    async fn repository_exists(&self, repo: &str) -> StorageResult<bool> {
        let r = repo.to_owned();
        self.run(move |l| Ok(l.repo_exists(&r))).await
    }

    async fn repositories(&self) -> StorageResult<Vec<String>> {
        self.run(|l| l.repositories()).await
    }

    async fn sweep_interrupted_writes(&self, grace: Duration) -> StorageResult<()> {
        self.run(move |l| l.sweep_interrupted_writes(grace)).await
    }
}
