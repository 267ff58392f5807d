//! Where the registry keeps its data: the [`Storage`] trait the HTTP API and GC speak to,
//! and its drivers ([`FsStorage`], the filesystem layout under `--root`; [`S3Storage`], one
//! S3 bucket shared by several registry processes).
//!
//! The trait is shaped for drivers that are not a local filesystem too (an object store:
//! multipart uploads, no rename, several registry processes sharing one bucket): it names
//! content by digest and repository, never by path, and moves bytes as streams. Rules every
//! driver keeps:
//!
//! - A name becomes visible only once what it names is complete (a blob before its
//!   repository link, a manifest's content before its revision, a revision before a tag).
//! - [`Storage::finish_upload`] checks the staged data against the expected digest itself,
//!   and commits only on a match (the check lives in the driver, once).
//! - Commits hold [`Storage::lock`] shared; GC holds it exclusive, so no commit interleaves
//!   with a sweep.

mod fs;
mod resumable_sha256;
mod s3;
mod upload_hash;

use std::pin::Pin;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use kiln_oci::Digest;

pub use fs::FsStorage;
pub use s3::{S3Settings, S3Storage, PART_SIZE};

/// A stream of bytes moving in or out of storage (an upload chunk, a blob being read). An
/// item error ends the stream; its message is passed on to the client unchanged.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// The content of a blob read from storage.
pub enum BlobContent {
    /// Small content, read whole.
    Bytes(Bytes),
    /// Larger content, read while it is sent.
    Stream(ByteStream),
}

/// Whether [`Storage::lock`] is held by a commit (shared) or by GC (exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Taken by every commit (upload finish, mount, manifest put); many at once.
    Shared,
    /// Taken by GC; excludes every commit.
    Exclusive,
}

/// A hold on the storage's GC/commit lock; released when dropped.
pub struct StorageLock {
    _held: Box<dyn Send + Sync>,
}

impl StorageLock {
    /// Wraps whatever keeps the driver's lock held (a locked file, a lock guard).
    pub fn new(held: impl Send + Sync + 'static) -> StorageLock {
        StorageLock {
            _held: Box::new(held),
        }
    }
}

/// One blob in the store, as the GC walk sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// The blob's digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// When it was written or last touched; `None` when the driver cannot tell.
    pub modified: Option<SystemTime>,
}

/// One manifest revision of a repository, as the GC walk sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRevision {
    /// The manifest's digest.
    pub digest: Digest,
    /// When the revision was written; `None` when the driver cannot tell.
    pub modified: Option<SystemTime>,
}

/// A manifest as stored: the media type it was pushed with and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredManifest {
    /// The media type the manifest was pushed with.
    pub media_type: String,
    /// The manifest exactly as pushed.
    pub bytes: Bytes,
}

/// Counters a driver keeps about open uploads, shown on `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadStats {
    /// Open uploads whose streaming hash state is held in memory.
    pub hash_states: usize,
    /// Chunks that had to re-read the staged data because the hash state was gone.
    pub rehashes: u64,
}

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The medium failed (disk full, I/O error, network to the object store).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// No such upload in this repository.
    #[error("blob upload unknown to registry")]
    UploadUnknown,
    /// A chunk's offset is not the upload's current size.
    #[error("chunk out of order: the upload has {size} bytes")]
    UploadOutOfOrder {
        /// The upload's current size, where the next chunk must start.
        size: u64,
    },
    /// A chunk could not be taken (its data stream failed, or writing it did); the upload
    /// is back at the size it had before the chunk.
    #[error("{0}")]
    UploadData(String),
    /// The staged data does not have the expected digest; nothing was committed and the
    /// upload stays open at its current size.
    #[error("provided digest did not match uploaded content")]
    DigestMismatch {
        /// The digest of what was staged, under the expected digest's algorithm.
        actual: Digest,
        /// How many bytes were staged.
        size: u64,
    },
}

/// Shorthand for storage results.
pub type StorageResult<T> = Result<T, StorageError>;

/// A registry's storage: content-addressed blobs, per-repository links, resumable uploads,
/// manifests, tags and referrers. Implemented once per medium; shared as `Arc<dyn Storage>`.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Where the data lives, for log lines and error messages (a directory, a bucket).
    fn location(&self) -> String;

    /// Takes the GC/commit lock: shared for commits, exclusive for GC. Waits for it.
    async fn lock(&self, mode: LockMode) -> StorageResult<StorageLock>;

    // ------------------------------------------------------------------ blobs

    /// Size of blob `d` when the store holds its content (in any repository).
    async fn blob_size(&self, d: &Digest) -> StorageResult<Option<u64>>;

    /// Reads `len` bytes of blob `d` from `offset`; `None` when the store does not hold it
    /// (GC may remove a blob between a size check and the read).
    async fn read_blob(
        &self,
        d: &Digest,
        offset: u64,
        len: u64,
    ) -> StorageResult<Option<BlobContent>>;

    /// Marks blob `d` as just used, so a GC starting now treats it as freshly pushed (a
    /// pusher that learned it exists may reference it next). Best effort.
    async fn touch_blob(&self, d: &Digest);

    /// Removes blob `d`'s content (GC only, under the exclusive lock). False when absent.
    async fn delete_blob(&self, d: &Digest) -> StorageResult<bool>;

    /// Every blob in the store with its size and age (the GC walk).
    async fn blobs(&self) -> StorageResult<Vec<BlobInfo>>;

    /// Total bytes of blob content held.
    async fn stored_bytes(&self) -> StorageResult<u64>;

    // ------------------------------------------------------------------ repository links

    /// Makes blob `d` (already in the store) visible in `repo`.
    async fn link_blob(&self, repo: &str, d: &Digest) -> StorageResult<()>;

    /// Removes blob `d` from `repo`'s view; the content stays. False when it was not linked.
    async fn unlink_blob(&self, repo: &str, d: &Digest) -> StorageResult<bool>;

    /// Whether blob `d` is linked into `repo` (its content may since have gone).
    async fn is_linked(&self, repo: &str, d: &Digest) -> StorageResult<bool>;

    /// Every blob linked into `repo`.
    async fn linked_blobs(&self, repo: &str) -> StorageResult<Vec<Digest>>;

    /// Size of blob `d` when `repo` may see it: linked there, and the content present.
    async fn repository_blob_size(&self, repo: &str, d: &Digest) -> StorageResult<Option<u64>> {
        if !self.is_linked(repo, d).await? {
            return Ok(None);
        }
        self.blob_size(d).await
    }

    // ------------------------------------------------------------------ uploads

    /// Starts an upload in `repo`; returns its id (32 hex digits).
    async fn start_upload(&self, repo: &str) -> StorageResult<String>;

    /// Bytes staged so far by upload `id` of `repo`; `None` when there is no such upload.
    async fn upload_size(&self, repo: &str, id: &str) -> StorageResult<Option<u64>>;

    /// Appends `data` to upload `id` and returns the new size. With `offset`, the chunk
    /// must start at the current size ([`StorageError::UploadOutOfOrder`] otherwise). A
    /// failed chunk leaves the upload at its size before the chunk, so it can resume.
    /// Chunks of one upload are applied one at a time.
    async fn append_upload(
        &self,
        repo: &str,
        id: &str,
        offset: Option<u64>,
        data: ByteStream,
    ) -> StorageResult<u64>;

    /// Commits upload `id` as blob `expected` and links it into `repo`, after checking the
    /// staged data's digest ([`StorageError::DigestMismatch`] commits nothing).
    async fn finish_upload(&self, repo: &str, id: &str, expected: &Digest) -> StorageResult<()>;

    /// Discards upload `id`. False when there was no such upload.
    async fn cancel_upload(&self, repo: &str, id: &str) -> StorageResult<bool>;

    /// Open uploads: `(in all repositories, in repo)`.
    async fn count_uploads(&self, repo: &str) -> StorageResult<(usize, usize)>;

    /// Removes uploads that hold no data and were last written more than `age` ago, except
    /// ones a request is writing to right now. Returns how many went.
    async fn reclaim_empty_uploads(&self, age: Duration) -> StorageResult<usize>;

    /// Removes uploads last written more than `age` ago, whatever they hold (GC).
    async fn sweep_uploads(&self, age: Duration) -> StorageResult<usize>;

    /// Counters about open uploads for `/metrics`; zeros when the driver keeps none.
    fn upload_stats(&self) -> UploadStats {
        UploadStats::default()
    }

    // ------------------------------------------------------------------ manifests

    /// Stores manifest `d` of `repo` with its media type: the content first (or a touch
    /// when the store already holds it), then the revision that makes it visible.
    async fn put_manifest(
        &self,
        repo: &str,
        d: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> StorageResult<()>;

    /// The media type manifest `d` was pushed with, when `repo` holds the revision.
    async fn manifest_media_type(&self, repo: &str, d: &Digest) -> StorageResult<Option<String>>;

    /// Media type and manifest size, when `repo` holds the revision and its content.
    async fn manifest_info(&self, repo: &str, d: &Digest) -> StorageResult<Option<(String, u64)>> {
        let Some(media_type) = self.manifest_media_type(repo, d).await? else {
            return Ok(None);
        };
        Ok(self.blob_size(d).await?.map(|n| (media_type, n)))
    }

    /// Manifest `d` of `repo`, when `repo` holds the revision and its content.
    async fn get_manifest(&self, repo: &str, d: &Digest) -> StorageResult<Option<StoredManifest>>;

    /// Removes the revision of manifest `d` from `repo` (tags and referrer entries are the
    /// caller's: see [`delete_manifest_and_tags`]). False when absent.
    async fn delete_manifest(&self, repo: &str, d: &Digest) -> StorageResult<bool>;

    /// Every manifest revision of `repo` with its age (the GC walk).
    async fn manifests(&self, repo: &str) -> StorageResult<Vec<ManifestRevision>>;

    // ------------------------------------------------------------------ tags

    /// Points `tag` of `repo` at manifest `d` (replacing what it pointed at).
    async fn put_tag(&self, repo: &str, tag: &str, d: &Digest) -> StorageResult<()>;

    /// The digest `tag` of `repo` points at, as stored (possibly not a valid digest).
    async fn get_tag(&self, repo: &str, tag: &str) -> StorageResult<Option<String>>;

    /// Removes `tag` of `repo`. False when absent.
    async fn delete_tag(&self, repo: &str, tag: &str) -> StorageResult<bool>;

    /// Tags of `repo` sorted, those after `last` only, at most `limit` of them; `None` when
    /// the repository is unknown.
    async fn list_tags(
        &self,
        repo: &str,
        last: Option<&str>,
        limit: Option<usize>,
    ) -> StorageResult<Option<Vec<String>>>;

    /// Every `(tag, target as stored)` of `repo`.
    async fn tag_targets(&self, repo: &str) -> StorageResult<Vec<(String, String)>> {
        let mut out = Vec::new();
        for tag in self.list_tags(repo, None, None).await?.unwrap_or_default() {
            if let Some(target) = self.get_tag(repo, &tag).await? {
                out.push((tag, target));
            }
        }
        Ok(out)
    }

    // ------------------------------------------------------------------ referrers

    /// Records manifest `referrer` of `repo` as referring to `subject`, with its descriptor
    /// (JSON, as the referrers API lists it).
    async fn add_referrer(
        &self,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
        descriptor: Bytes,
    ) -> StorageResult<()>;

    /// Forgets that `referrer` refers to `subject` in `repo`.
    async fn remove_referrer(
        &self,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
    ) -> StorageResult<()>;

    /// `(referrer, descriptor)` entries recorded for `subject` in `repo`, in a stable order.
    /// Entries may outlive their manifest revision; callers check it.
    async fn referrers(&self, repo: &str, subject: &Digest) -> StorageResult<Vec<(Digest, Bytes)>>;

    // ------------------------------------------------------------------ repositories

    /// Whether `repo` holds anything (a manifest or a blob link ever made there).
    async fn repository_exists(&self, repo: &str) -> StorageResult<bool>;

    /// Every repository name, sorted.
    async fn repositories(&self) -> StorageResult<Vec<String>>;

    /// Removes leftovers of writes interrupted before they completed (temporary files of a
    /// killed process), once older than `grace`. Nothing by default: drivers whose writes
    /// are atomic leave none.
    async fn sweep_interrupted_writes(&self, grace: Duration) -> StorageResult<()> {
        let _ = grace;
        Ok(())
    }

    /// A URL the client may fetch blob `d` from directly (a presigned object URL), answered
    /// as a `307` to a blob GET; `None` (the default) serves the bytes through the registry.
    fn blob_redirect(&self, d: &Digest) -> Option<String> {
        let _ = d;
        None
    }
}

/// The digest a tag or digest `reference` names in `repo`, when `repo` holds that manifest.
pub(crate) async fn resolve(
    store: &dyn Storage,
    repo: &str,
    reference: &str,
) -> StorageResult<Option<Digest>> {
    let digest = if reference.contains(':') {
        match reference.parse::<Digest>() {
            Ok(d) => d,
            Err(_) => return Ok(None),
        }
    } else {
        match store.get_tag(repo, reference).await? {
            Some(s) => match s.trim().parse::<Digest>() {
                Ok(d) => d,
                Err(_) => return Ok(None),
            },
            None => return Ok(None),
        }
    };
    Ok(store
        .manifest_media_type(repo, &digest)
        .await?
        .map(|_| digest))
}

/// Deletes manifest revision `d` from `repo` with every tag pointing at it and its referrer
/// entry (tags first, so no tag ever names a missing revision). False when absent.
pub(crate) async fn delete_manifest_and_tags(
    store: &dyn Storage,
    repo: &str,
    d: &Digest,
) -> StorageResult<bool> {
    if store.manifest_media_type(repo, d).await?.is_none() {
        return Ok(false);
    }
    let want = d.to_string();
    for (tag, target) in store.tag_targets(repo).await? {
        if target == want {
            store.delete_tag(repo, &tag).await?;
        }
    }
    if let Ok(Some(bytes)) = read_whole_blob(store, d).await {
        if let Some(subject) = crate::manifest::subject_of(&bytes) {
            let _ = store.remove_referrer(repo, &subject, d).await;
        }
    }
    store.delete_manifest(repo, d).await
}

/// The whole content of blob `d` (manifests, configs: small ones), `None` when absent.
pub(crate) async fn read_whole_blob(
    store: &dyn Storage,
    d: &Digest,
) -> StorageResult<Option<Bytes>> {
    let Some(size) = store.blob_size(d).await? else {
        return Ok(None);
    };
    match store.read_blob(d, 0, size).await? {
        None => Ok(None),
        Some(BlobContent::Bytes(b)) => Ok(Some(b)),
        Some(BlobContent::Stream(mut s)) => {
            let mut out = bytes::BytesMut::with_capacity(size as usize);
            while let Some(chunk) = s.next().await {
                out.extend_from_slice(&chunk?);
            }
            Ok(Some(out.freeze()))
        }
    }
}

/// Whether something last modified at `modified` is younger than `age`. A time ahead of
/// this clock counts as young; an unknown one as old.
pub(crate) fn is_recent(modified: Option<SystemTime>, age: Duration) -> bool {
    match modified {
        Some(t) => SystemTime::now()
            .duration_since(t)
            .map(|a| a < age)
            .unwrap_or(true),
        None => false,
    }
}

/// The part of a sorted list after `last`, at most `limit` long (tag and catalog pages).
pub fn page(sorted: Vec<String>, last: Option<&str>, limit: Option<usize>) -> Vec<String> {
    let mut items: Vec<String> = match last {
        Some(last) => sorted.into_iter().filter(|t| t.as_str() > last).collect(),
        None => sorted,
    };
    if let Some(n) = limit {
        items.truncate(n);
    }
    items
}

/// Which storage driver a registry uses, chosen in its [`Config`](crate::Config).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageDriver {
    /// [`FsStorage`] under the configured `root`.
    #[default]
    Filesystem,
    /// [`S3Storage`] in the bucket of the configured `s3` settings.
    S3,
}

/// Opens the storage `config` names: the one place a configured driver is chosen.
pub(crate) fn open(
    config: &crate::Config,
) -> Result<std::sync::Arc<dyn Storage>, crate::RegistryError> {
    match config.storage {
        StorageDriver::Filesystem => {
            let fs = FsStorage::open(&config.root, config.fsync)
                .map_err(|e| crate::RegistryError::io("creating storage under", &config.root, e))?;
            // Every hash state belongs to an open upload, so the upload bound bounds the
            // states too.
            let fs = match config.max_open_uploads {
                0 => fs,
                n => fs.with_upload_hash_cap(n),
            };
            Ok(std::sync::Arc::new(fs))
        }
        StorageDriver::S3 => {
            let settings = &config.s3;
            let client = settings
                .client_config()
                .and_then(kiln_s3::S3Client::new)
                .map_err(|e| {
                    crate::RegistryError::Config(format!("storage {}: {e}", settings.url))
                })?;
            let mut s3 = S3Storage::new(client)
                .with_delete_grace(std::time::Duration::from_secs(config.gc_grace_secs));
            if settings.redirect {
                s3 = s3.with_redirects(REDIRECT_VALIDITY);
            }
            Ok(std::sync::Arc::new(s3))
        }
    }
}

/// How long a presigned blob URL handed out in a redirect stays valid.
pub const REDIRECT_VALIDITY: Duration = Duration::from_secs(20 * 60);
