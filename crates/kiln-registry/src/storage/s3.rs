//! [`S3Storage`]: the registry in an S3 bucket, shared by any number of registry processes.
//!
//! ```text
//! blobs/<alg>/<hex>                                content (blobs and manifests), shared
//! touched/<alg>/<hex>                              empty: the blob was last used then (GC age)
//! catalog/<name>                                   empty: repository <name> exists
//! repos/<name>/_layers/<alg>/<hex>                 empty link: blob visible in <name>
//! repos/<name>/_manifests/revisions/<alg>/<hex>    the manifest's media type
//! repos/<name>/_manifests/tags/<tag>               the tagged manifest's digest
//! repos/<name>/_referrers/<alg>/<hex>/<alg>-<hex>  descriptor JSON of a referrer
//! uploads/<repo-key>-<id>/state                    JSON: size, parts, tail, running SHA-256
//! uploads/<repo-key>-<id>/tail-<seq>               bytes received but not yet in a part
//! uploads/<repo-key>-<id>/data                     the multipart upload's object
//! ```
//!
//! Every object is written whole by one PUT (or a multipart completion, or a copy), so a
//! reader sees all of it or none; names that make something visible are written after what
//! they name (blob content, then the link; manifest content, then its revision, then a tag).
//!
//! An upload's state lives in the bucket, so any process may take its next chunk: chunks
//! are cut into parts of [`PART_SIZE`] sent to an S3 multipart upload, the remainder is kept
//! as a tail object, and the running SHA-256 is stored with the state (see
//! `resumable_sha256.rs`); each byte is hashed once wherever it arrives. A chunk that fails
//! leaves the state as it was: parts it sent carry numbers past the recorded ones and are
//! overwritten by the retry.
//!
//! Several processes share no lock: [`Storage::lock`] excludes commits and GC within one
//! process only. GC across processes is safe by age instead: a blob is deleted only when no
//! tag or kept revision reaches it and neither its content nor its `touched/` marker was
//! written within the grace period, rechecked right before the delete; pushing a manifest
//! touches every blob it references, and finding a blob by HEAD or mount touches it.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use kiln_oci::{Algorithm, Digest, Hasher};
use kiln_s3::{S3Client, S3Error};
use serde::{Deserialize, Serialize};

use super::resumable_sha256::ResumableSha256;
use super::upload_hash::UploadHashes;
use super::{
    BlobContent, BlobInfo, ByteStream, LockMode, ManifestRevision, Storage, StorageError,
    StorageLock, StorageResult, StoredManifest,
};

/// Size of every multipart part but the last (S3 wants at least 5 MiB).
pub const PART_SIZE: usize = 8 << 20;

/// Blobs up to this size are read in one request and sent from memory.
const SMALL_BLOB: u64 = 64 << 10;

/// A blob touched more recently than this by this process is not touched again.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// Upload locks kept (one per open upload this process has worked on).
const UPLOAD_LOCKS: usize = 10_000;

/// Requests sent at once when touching the blobs of a manifest.
const TOUCH_PARALLELISM: usize = 8;

/// Settings of the `s3` storage driver (the `s3` object of the registry configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
pub struct S3Settings {
    /// `s3://BUCKET/PREFIX`.
    pub url: String,
    /// The endpoint, when not AWS's (else `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, the
    /// AWS config file).
    pub endpoint: Option<String>,
    /// The signing region (else `AWS_REGION`, `AWS_DEFAULT_REGION`, the config file).
    pub region: Option<String>,
    /// Address the bucket in the path (default: with a custom endpoint).
    pub path_style: Option<bool>,
    /// Answer blob GETs with `307` to a presigned URL of the object.
    pub redirect: bool,
}

impl S3Settings {
    /// The client configuration these settings name, from the environment and AWS files.
    pub fn client_config(&self) -> Result<kiln_s3::S3Config, S3Error> {
        let mut cfg = kiln_s3::S3Config::from_env_and_url(&self.url)?;
        if let Some(e) = &self.endpoint {
            cfg.set_endpoint(e)?;
            cfg.path_style = true;
        }
        if let Some(r) = &self.region {
            cfg.region = r.clone();
        }
        if let Some(p) = self.path_style {
            cfg.path_style = p;
        }
        Ok(cfg)
    }
}

/// The S3 storage driver: the registry's objects in one bucket, under one prefix.
#[derive(Clone)]
pub struct S3Storage {
    s3: S3Client,
    /// Commits (shared) against GC (exclusive), within this process.
    gc: Arc<tokio::sync::RwLock<()>>,
    /// One lock per upload, so this process applies one chunk of an upload at a time.
    uploads: Arc<UploadHashes>,
    /// When this process last touched a blob.
    touched: Arc<Mutex<HashMap<Digest, Instant>>>,
    /// Repositories whose catalog entry this process has written.
    cataloged: Arc<Mutex<HashSet<String>>>,
    /// Blob GETs answer with a redirect to a presigned URL valid this long.
    redirect: Option<Duration>,
    /// GC deletes a blob only when it is at least this old (rechecked at the delete).
    delete_grace: Duration,
}

/// Parts of one chunk being uploaded at once.
const PARTS_IN_FLIGHT: usize = 3;

/// Part uploads running as tasks, oldest first; dropping it aborts those still running
/// (a chunk that failed records none of them, and the retry overwrites their numbers).
#[derive(Default)]
struct PartsInFlight(std::collections::VecDeque<tokio::task::JoinHandle<Result<Part, S3Error>>>);

impl PartsInFlight {
    /// Waits for the oldest part.
    async fn next(&mut self) -> StorageResult<Part> {
        let Some(h) = self.0.pop_front() else {
            return Err(StorageError::Io(io::Error::other("no part in flight")));
        };
        match h.await {
            Ok(r) => r.map_err(io_err),
            Err(e) => Err(StorageError::Io(io::Error::other(e))),
        }
    }
}

impl Drop for PartsInFlight {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// One part of an upload's multipart upload.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Part {
    n: u16,
    etag: String,
    size: u64,
}

/// What the bucket records about an open upload.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UploadState {
    repo: String,
    size: u64,
    /// The multipart upload of `data`, once a first part was sent.
    multipart: Option<String>,
    parts: Vec<Part>,
    /// The key of the tail object, when the last bytes are not in a part yet.
    tail: Option<String>,
    /// Bumped by every chunk: names the tail objects.
    seq: u64,
    /// The running SHA-256 of all `size` bytes.
    sha256: String,
}

fn io_err(e: S3Error) -> StorageError {
    StorageError::Io(io::Error::other(e))
}

/// The repository part of an upload's directory name (fixed length, whatever the name).
fn upload_key(repo: &str) -> String {
    Digest::sha256_of(repo.as_bytes()).hex()[..16].to_owned()
}

fn blob_key(d: &Digest) -> String {
    format!("blobs/{}/{}", d.algorithm().name(), d.hex())
}

fn touched_key(d: &Digest) -> String {
    format!("touched/{}/{}", d.algorithm().name(), d.hex())
}

fn repo_dir(repo: &str) -> String {
    format!("repos/{repo}/")
}

fn layer_key(repo: &str, d: &Digest) -> String {
    format!("repos/{repo}/_layers/{}/{}", d.algorithm().name(), d.hex())
}

fn revision_key(repo: &str, d: &Digest) -> String {
    format!(
        "repos/{repo}/_manifests/revisions/{}/{}",
        d.algorithm().name(),
        d.hex()
    )
}

fn tags_dir(repo: &str) -> String {
    format!("repos/{repo}/_manifests/tags/")
}

fn referrers_dir(repo: &str, subject: &Digest) -> String {
    format!(
        "repos/{repo}/_referrers/{}/{}/",
        subject.algorithm().name(),
        subject.hex()
    )
}

fn referrer_key(repo: &str, subject: &Digest, referrer: &Digest) -> String {
    format!(
        "{}{}-{}",
        referrers_dir(repo, subject),
        referrer.algorithm().name(),
        referrer.hex()
    )
}

fn upload_dir(repo: &str, id: &str) -> String {
    format!("uploads/{}-{id}/", upload_key(repo))
}

/// Parses `uploads/<repo-key>-<id>/state` into `(repo-key, id)`.
fn parse_state_key(key: &str) -> Option<(&str, &str)> {
    let dir = key.strip_prefix("uploads/")?.strip_suffix("/state")?;
    let (k, id) = dir.split_once('-')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(k, 16) && hex(id, 32)).then_some((k, id))
}

/// `alg/hex` at the end of a key, as a digest.
fn digest_at_end(key: &str) -> Option<Digest> {
    let mut it = key.rsplit('/');
    let hex = it.next()?;
    let alg = it.next()?;
    format!("{alg}:{hex}").parse().ok()
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::fill(&mut b[..]);
    hex::encode(b)
}

fn newest(a: Option<SystemTime>, b: Option<SystemTime>) -> Option<SystemTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

impl S3Storage {
    /// A driver on the bucket `client` names. Sends nothing until used.
    pub fn new(client: S3Client) -> S3Storage {
        S3Storage {
            s3: client,
            gc: Arc::new(tokio::sync::RwLock::new(())),
            uploads: Arc::new(UploadHashes::new(UPLOAD_LOCKS)),
            touched: Arc::new(Mutex::new(HashMap::new())),
            cataloged: Arc::new(Mutex::new(HashSet::new())),
            redirect: None,
            delete_grace: Duration::from_secs(3600),
        }
    }

    /// Answers blob GETs with `307` to a presigned URL of the object, valid for `valid`.
    pub fn with_redirects(mut self, valid: Duration) -> S3Storage {
        self.redirect = Some(valid);
        self
    }

    /// GC deletes a blob only when it is at least `grace` old, checked again right before
    /// the delete (another registry process may have just used it).
    pub fn with_delete_grace(mut self, grace: Duration) -> S3Storage {
        self.delete_grace = grace;
        self
    }

    /// The client the driver speaks through.
    pub fn client(&self) -> &S3Client {
        &self.s3
    }

    async fn exists(&self, key: &str) -> StorageResult<bool> {
        Ok(self.s3.head(key).await.map_err(io_err)?.is_some())
    }

    /// Deletes `key`, telling whether it was there.
    async fn delete_if_present(&self, key: &str) -> StorageResult<bool> {
        if !self.exists(key).await? {
            return Ok(false);
        }
        self.s3.delete(key).await.map_err(io_err)?;
        Ok(true)
    }

    async fn text(&self, key: &str) -> StorageResult<Option<String>> {
        Ok(self
            .s3
            .get(key)
            .await
            .map_err(io_err)?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Records that `repo` exists (once per process).
    async fn catalog(&self, repo: &str) -> StorageResult<()> {
        let known = self
            .cataloged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(repo);
        if known {
            return Ok(());
        }
        self.s3
            .put(&format!("catalog/{repo}"), Bytes::new())
            .await
            .map_err(io_err)?;
        self.cataloged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(repo.to_owned());
        Ok(())
    }

    /// Writes blob `d`'s `touched/` marker, unless this process did so a moment ago.
    async fn touch(&self, d: &Digest) -> StorageResult<()> {
        let now = Instant::now();
        {
            let mut t = self.touched.lock().unwrap_or_else(|e| e.into_inner());
            if t.get(d)
                .is_some_and(|at| now.duration_since(*at) < TOUCH_EVERY)
            {
                return Ok(());
            }
            if t.len() > 100_000 {
                t.retain(|_, at| now.duration_since(*at) < TOUCH_EVERY);
            }
            t.insert(d.clone(), now);
        }
        let r = self.s3.put(&touched_key(d), Bytes::new()).await;
        if r.is_err() {
            self.touched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(d);
        }
        r.map_err(io_err)
    }

    /// When blob `d` was last written or touched; `None` when neither object exists.
    async fn blob_age_mark(&self, d: &Digest) -> StorageResult<Option<SystemTime>> {
        let (blob, touched) =
            futures::future::join(self.s3.head(&blob_key(d)), self.s3.head(&touched_key(d))).await;
        let blob = blob.map_err(io_err)?.and_then(|m| m.last_modified);
        let touched = touched.map_err(io_err)?.and_then(|m| m.last_modified);
        Ok(newest(blob, touched))
    }

    async fn load_upload(&self, repo: &str, id: &str) -> StorageResult<Option<UploadState>> {
        let key = format!("{}state", upload_dir(repo, id));
        let Some(bytes) = self.s3.get(&key).await.map_err(io_err)? else {
            return Ok(None);
        };
        let st: UploadState = serde_json::from_slice(&bytes)
            .map_err(|e| StorageError::Io(io::Error::other(format!("upload state {key}: {e}"))))?;
        // A name collision of the repository key is not this upload.
        Ok((st.repo == repo).then_some(st))
    }

    async fn save_upload(&self, id: &str, st: &UploadState) -> StorageResult<()> {
        let key = format!("{}state", upload_dir(&st.repo, id));
        let body = serde_json::to_vec(st).map_err(|e| StorageError::Io(io::Error::other(e)))?;
        self.s3.put(&key, Bytes::from(body)).await.map_err(io_err)
    }

    /// Removes every object of an upload and its multipart upload.
    async fn discard_upload(
        &self,
        repo: &str,
        id: &str,
        st: Option<&UploadState>,
    ) -> StorageResult<()> {
        let dir = upload_dir(repo, id);
        if let Some(mp) = st.and_then(|s| s.multipart.as_deref()) {
            self.s3
                .abort_multipart(&format!("{dir}data"), mp)
                .await
                .map_err(io_err)?;
        }
        // The state goes last: while it exists, the upload can be found and swept again.
        let mut keys: Vec<String> = self
            .s3
            .list(&dir)
            .await
            .map_err(io_err)?
            .into_iter()
            .map(|m| m.key)
            .collect();
        keys.sort_by_key(|k| k.ends_with("/state"));
        for k in keys {
            self.s3.delete(&k).await.map_err(io_err)?;
        }
        Ok(())
    }

    /// The lock entry of an upload that exists; `UploadUnknown` otherwise.
    async fn upload_lock(
        &self,
        repo: &str,
        id: &str,
    ) -> StorageResult<super::upload_hash::UploadHash> {
        if let Some(h) = self.uploads.get(repo, id) {
            return Ok(h);
        }
        if self.load_upload(repo, id).await?.is_none() {
            return Err(StorageError::UploadUnknown);
        }
        Ok(self.uploads.insert(repo, id))
    }

    /// The multipart upload of `st`, started (and recorded) on first use.
    async fn multipart(&self, id: &str, st: &mut UploadState) -> StorageResult<String> {
        if let Some(m) = &st.multipart {
            return Ok(m.clone());
        }
        let data = format!("{}data", upload_dir(&st.repo, id));
        let m = self.s3.create_multipart(&data).await.map_err(io_err)?;
        st.multipart = Some(m.clone());
        // Recorded at once, so a chunk that fails later leaves no multipart upload unknown.
        self.save_upload(id, st).await?;
        Ok(m)
    }

    /// Hashes an upload's whole data with `alg` (digests other than SHA-256): its object
    /// `data` (when parts were completed into it) and its tail.
    async fn hash_upload(
        &self,
        dir: &str,
        st: &UploadState,
        alg: Algorithm,
    ) -> StorageResult<Digest> {
        let mut h = Hasher::new(alg);
        if !st.parts.is_empty() {
            let data = format!("{dir}data");
            let size: u64 = st.parts.iter().map(|p| p.size).sum();
            if let Some(s) = self.s3.get_stream(&data, 0, size).await.map_err(io_err)? {
                let mut s = s.stream;
                while let Some(b) = s.next().await {
                    h.update(&b.map_err(io_err)?);
                }
            }
        }
        if let Some(t) = &st.tail {
            let bytes = self.s3.get(t).await.map_err(io_err)?.unwrap_or_default();
            h.update(&bytes);
        }
        Ok(h.finish())
    }

    /// The content of an upload's tail object.
    async fn tail(&self, id: &str, key: &str) -> StorageResult<Bytes> {
        self.s3.get(key).await.map_err(io_err)?.ok_or_else(|| {
            StorageError::Io(io::Error::other(format!(
                "upload {id}: tail object {key} is gone"
            )))
        })
    }

    /// Makes the `data` object of an upload that has parts hold all of it: the tail becomes
    /// the last part (it may be smaller than the rest) and the multipart upload is
    /// completed. Idempotent: a completion done by an earlier, interrupted call is
    /// recognised by the object's size.
    async fn seal_data(&self, id: &str, dir: &str, st: &mut UploadState) -> StorageResult<()> {
        let Some(mp) = st.multipart.clone() else {
            return Ok(());
        };
        let data = format!("{dir}data");
        if let Some(t) = st.tail.clone() {
            let body = self.tail(id, &t).await?;
            let n = u16::try_from(st.parts.len() + 1)
                .map_err(|_| StorageError::UploadData("upload larger than 10 000 parts".into()))?;
            let size = body.len() as u64;
            let etag = self
                .s3
                .upload_part(&data, &mp, n, body)
                .await
                .map_err(io_err)?;
            st.parts.push(Part { n, etag, size });
            st.tail = None;
        }
        let parts: Vec<(u16, String)> = st.parts.iter().map(|p| (p.n, p.etag.clone())).collect();
        match self.s3.complete_multipart(&data, &mp, &parts).await {
            Ok(()) => {}
            Err(e) if e.code() == Some("NoSuchUpload") => {
                let want: u64 = st.parts.iter().map(|p| p.size).sum();
                let have = self.s3.head(&data).await.map_err(io_err)?.map(|m| m.size);
                if have != Some(want) {
                    return Err(io_err(e));
                }
            }
            Err(e) => return Err(io_err(e)),
        }
        st.multipart = None;
        Ok(())
    }
}

#[async_trait]
impl Storage for S3Storage {
    fn location(&self) -> String {
        self.s3.location()
    }

    async fn lock(&self, mode: LockMode) -> StorageResult<StorageLock> {
        Ok(match mode {
            LockMode::Shared => StorageLock::new(self.gc.clone().read_owned().await),
            LockMode::Exclusive => StorageLock::new(self.gc.clone().write_owned().await),
        })
    }

    async fn blob_size(&self, d: &Digest) -> StorageResult<Option<u64>> {
        Ok(self
            .s3
            .head(&blob_key(d))
            .await
            .map_err(io_err)?
            .map(|m| m.size))
    }

    async fn read_blob(
        &self,
        d: &Digest,
        offset: u64,
        len: u64,
    ) -> StorageResult<Option<BlobContent>> {
        let key = blob_key(d);
        if len <= SMALL_BLOB {
            return Ok(self
                .s3
                .get_range(&key, offset, len)
                .await
                .map_err(io_err)?
                .map(BlobContent::Bytes));
        }
        let Some(s) = self
            .s3
            .get_stream(&key, offset, len)
            .await
            .map_err(io_err)?
        else {
            return Ok(None);
        };
        let stream = s.stream.map(|r| r.map_err(io::Error::other));
        Ok(Some(BlobContent::Stream(Box::pin(stream))))
    }

    async fn touch_blob(&self, d: &Digest) {
        if let Err(e) = self.touch(d).await {
            tracing::warn!(digest = %d, error = %e, "touching blob");
        }
    }

    async fn delete_blob(&self, d: &Digest) -> StorageResult<bool> {
        // Another registry process may have used the blob since GC looked: keep it then.
        if super::is_recent(self.blob_age_mark(d).await?, self.delete_grace) {
            return Ok(false);
        }
        let found = self.delete_if_present(&blob_key(d)).await?;
        self.s3.delete(&touched_key(d)).await.map_err(io_err)?;
        Ok(found)
    }

    async fn blobs(&self) -> StorageResult<Vec<BlobInfo>> {
        let touched: HashMap<Digest, Option<SystemTime>> = self
            .s3
            .list("touched/")
            .await
            .map_err(io_err)?
            .into_iter()
            .filter_map(|m| Some((digest_at_end(&m.key)?, m.last_modified)))
            .collect();
        Ok(self
            .s3
            .list("blobs/")
            .await
            .map_err(io_err)?
            .into_iter()
            .filter_map(|m| {
                let digest = digest_at_end(&m.key)?;
                let modified = newest(m.last_modified, touched.get(&digest).copied().flatten());
                Some(BlobInfo {
                    digest,
                    size: m.size,
                    modified,
                })
            })
            .collect())
    }

    async fn stored_bytes(&self) -> StorageResult<u64> {
        Ok(self
            .s3
            .list("blobs/")
            .await
            .map_err(io_err)?
            .iter()
            .map(|m| m.size)
            .sum())
    }

    async fn link_blob(&self, repo: &str, d: &Digest) -> StorageResult<()> {
        self.catalog(repo).await?;
        self.s3
            .put(&layer_key(repo, d), Bytes::new())
            .await
            .map_err(io_err)
    }

    async fn unlink_blob(&self, repo: &str, d: &Digest) -> StorageResult<bool> {
        self.delete_if_present(&layer_key(repo, d)).await
    }

    async fn is_linked(&self, repo: &str, d: &Digest) -> StorageResult<bool> {
        self.exists(&layer_key(repo, d)).await
    }

    async fn linked_blobs(&self, repo: &str) -> StorageResult<Vec<Digest>> {
        let dir = format!("repos/{repo}/_layers/");
        Ok(self
            .s3
            .list(&dir)
            .await
            .map_err(io_err)?
            .into_iter()
            .filter_map(|m| digest_at_end(&m.key))
            .collect())
    }

    async fn start_upload(&self, repo: &str) -> StorageResult<String> {
        let id = random_hex(16);
        let st = UploadState {
            repo: repo.to_owned(),
            size: 0,
            multipart: None,
            parts: Vec::new(),
            tail: None,
            seq: 0,
            sha256: ResumableSha256::default().to_text(),
        };
        self.save_upload(&id, &st).await?;
        Ok(id)
    }

    async fn upload_size(&self, repo: &str, id: &str) -> StorageResult<Option<u64>> {
        Ok(self.load_upload(repo, id).await?.map(|s| s.size))
    }

    async fn append_upload(
        &self,
        repo: &str,
        id: &str,
        offset: Option<u64>,
        mut data: ByteStream,
    ) -> StorageResult<u64> {
        let entry = self.upload_lock(repo, id).await?;
        let _one_chunk_at_a_time = entry.lock().await;
        let mut st = self
            .load_upload(repo, id)
            .await?
            .ok_or(StorageError::UploadUnknown)?;
        if offset.is_some_and(|o| o != st.size) {
            return Err(StorageError::UploadOutOfOrder { size: st.size });
        }
        let mut hash = ResumableSha256::from_text(&st.sha256).ok_or_else(|| {
            StorageError::Io(io::Error::other(format!(
                "upload {id}: unreadable hash state in the bucket"
            )))
        })?;
        if hash.len() != st.size {
            return Err(StorageError::Io(io::Error::other(format!(
                "upload {id}: hash state covers {} bytes, the upload holds {}",
                hash.len(),
                st.size
            ))));
        }
        let mut buf = BytesMut::new();
        if let Some(t) = &st.tail {
            buf.extend_from_slice(&self.tail(id, t).await?);
        }
        let dir = upload_dir(repo, id);
        let mut new_parts: Vec<Part> = Vec::new();
        // Parts being sent while the body is read on; aborted if the chunk fails.
        let mut sending = PartsInFlight::default();
        let mut next_part = st.parts.len() + 1;
        let mut added = 0u64;
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|e| StorageError::UploadData(e.to_string()))?;
            hash.update(&chunk);
            added += chunk.len() as u64;
            buf.extend_from_slice(&chunk);
            while buf.len() >= PART_SIZE {
                let body = buf.split_to(PART_SIZE).freeze();
                let mp = self.multipart(id, &mut st).await?;
                let n = u16::try_from(next_part).map_err(|_| {
                    StorageError::UploadData("upload larger than 10 000 parts".into())
                })?;
                next_part += 1;
                if sending.0.len() >= PARTS_IN_FLIGHT {
                    new_parts.push(sending.next().await?);
                }
                let (s3, key) = (self.s3.clone(), format!("{dir}data"));
                sending.0.push_back(tokio::spawn(async move {
                    let size = body.len() as u64;
                    let etag = s3.upload_part(&key, &mp, n, body).await?;
                    Ok(Part { n, etag, size })
                }));
            }
        }
        while !sending.0.is_empty() {
            new_parts.push(sending.next().await?);
        }
        let old_tail = st.tail.take();
        st.seq += 1;
        if !buf.is_empty() {
            let key = format!("{dir}tail-{}", st.seq);
            self.s3.put(&key, buf.freeze()).await.map_err(io_err)?;
            st.tail = Some(key);
        }
        st.size += added;
        st.parts.extend(new_parts);
        st.sha256 = hash.to_text();
        self.save_upload(id, &st).await?;
        if let Some(old) = old_tail {
            if st.tail.as_ref() != Some(&old) {
                let _ = self.s3.delete(&old).await;
            }
        }
        Ok(st.size)
    }

    async fn finish_upload(&self, repo: &str, id: &str, expected: &Digest) -> StorageResult<()> {
        let entry = self.upload_lock(repo, id).await?;
        let _one_chunk_at_a_time = entry.lock().await;
        let mut st = self
            .load_upload(repo, id)
            .await?
            .ok_or(StorageError::UploadUnknown)?;
        let dir = upload_dir(repo, id);
        let blob = blob_key(expected);
        if expected.algorithm() == Algorithm::Sha256 {
            let hash = ResumableSha256::from_text(&st.sha256).ok_or_else(|| {
                StorageError::Io(io::Error::other(format!(
                    "upload {id}: unreadable hash state in the bucket"
                )))
            })?;
            let actual = hash.digest();
            if &actual != expected {
                return Err(StorageError::DigestMismatch {
                    actual,
                    size: st.size,
                });
            }
        } else {
            // Only SHA-256 runs as the data arrives; other digests hash the data once at
            // the end, after it is sealed into one object, so a mismatch ends the upload.
            self.seal_data(id, &dir, &mut st).await?;
            let actual = self.hash_upload(&dir, &st, expected.algorithm()).await?;
            if &actual != expected {
                self.discard_upload(repo, id, None).await?;
                self.uploads.forget(repo, id);
                return Err(StorageError::DigestMismatch {
                    actual,
                    size: st.size,
                });
            }
        }

        if self.exists(&blob).await? {
            self.touch(expected).await?;
        } else if st.parts.is_empty() {
            let body = match &st.tail {
                Some(t) => self.tail(id, t).await?,
                None => Bytes::new(),
            };
            self.s3.put(&blob, body).await.map_err(io_err)?;
        } else {
            self.seal_data(id, &dir, &mut st).await?;
            self.s3
                .copy(&format!("{dir}data"), &blob)
                .await
                .map_err(io_err)?;
        }
        self.link_blob(repo, expected).await?;
        self.discard_upload(repo, id, Some(&st).filter(|s| s.multipart.is_some()))
            .await?;
        self.uploads.forget(repo, id);
        Ok(())
    }

    async fn cancel_upload(&self, repo: &str, id: &str) -> StorageResult<bool> {
        let entry = match self.upload_lock(repo, id).await {
            Ok(e) => e,
            Err(StorageError::UploadUnknown) => return Ok(false),
            Err(e) => return Err(e),
        };
        let _held = entry.lock().await;
        let st = self.load_upload(repo, id).await?;
        let found = st.is_some();
        self.discard_upload(repo, id, st.as_ref()).await?;
        self.uploads.forget(repo, id);
        Ok(found)
    }

    async fn count_uploads(&self, repo: &str) -> StorageResult<(usize, usize)> {
        let key = upload_key(repo);
        let (mut total, mut here) = (0, 0);
        for m in self.s3.list("uploads/").await.map_err(io_err)? {
            if let Some((k, _)) = parse_state_key(&m.key) {
                total += 1;
                if k == key {
                    here += 1;
                }
            }
        }
        Ok((total, here))
    }

    async fn reclaim_empty_uploads(&self, age: Duration) -> StorageResult<usize> {
        let busy: HashSet<String> = self
            .uploads
            .busy()
            .into_iter()
            .map(|(r, i)| upload_dir(&r, &i))
            .collect();
        let mut removed = 0;
        for m in self.s3.list("uploads/").await.map_err(io_err)? {
            let Some((k, id)) = parse_state_key(&m.key) else {
                continue;
            };
            let dir = format!("uploads/{k}-{id}/");
            if busy.contains(&dir) || (!age.is_zero() && super::is_recent(m.last_modified, age)) {
                continue;
            }
            let Some(body) = self.s3.get(&m.key).await.map_err(io_err)? else {
                continue;
            };
            let Ok(st) = serde_json::from_slice::<UploadState>(&body) else {
                continue;
            };
            if st.size == 0 && st.multipart.is_none() {
                self.s3.delete(&m.key).await.map_err(io_err)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn sweep_uploads(&self, age: Duration) -> StorageResult<usize> {
        let busy: HashSet<String> = self
            .uploads
            .busy()
            .into_iter()
            .map(|(r, i)| upload_dir(&r, &i))
            .collect();
        // An upload is as old as its newest object: any chunk written rewrites its state.
        let mut dirs: HashMap<String, (Option<SystemTime>, bool)> = HashMap::new();
        for m in self.s3.list("uploads/").await.map_err(io_err)? {
            let Some(dir) = m.key.rfind('/').map(|i| m.key[..=i].to_owned()) else {
                continue;
            };
            let e = dirs.entry(dir).or_insert((None, false));
            e.0 = newest(e.0, m.last_modified);
            e.1 |= m.key.ends_with("/state");
        }
        let mut removed = 0;
        for (dir, (modified, has_state)) in dirs {
            if busy.contains(&dir) || super::is_recent(modified, age) {
                continue;
            }
            let state = if has_state {
                self.s3
                    .get(&format!("{dir}state"))
                    .await
                    .map_err(io_err)?
                    .and_then(|b| serde_json::from_slice::<UploadState>(&b).ok())
            } else {
                None
            };
            if let Some(mp) = state.as_ref().and_then(|s| s.multipart.as_deref()) {
                self.s3
                    .abort_multipart(&format!("{dir}data"), mp)
                    .await
                    .map_err(io_err)?;
            }
            let mut keys: Vec<String> = self
                .s3
                .list(&dir)
                .await
                .map_err(io_err)?
                .into_iter()
                .map(|m| m.key)
                .collect();
            keys.sort_by_key(|k| k.ends_with("/state"));
            for k in keys {
                self.s3.delete(&k).await.map_err(io_err)?;
            }
            removed += 1;
        }
        Ok(removed)
    }

    async fn put_manifest(
        &self,
        repo: &str,
        d: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> StorageResult<()> {
        // What the manifest references is in use from now on, whatever GC saw before.
        let refs = crate::manifest::references_of(&bytes);
        let referenced: Vec<Digest> = refs.blobs.into_iter().chain(refs.manifests).collect();
        let mut touches = futures::stream::iter(referenced)
            .map(|b| {
                let me = self.clone();
                async move { me.touch(&b).await }
            })
            .buffer_unordered(TOUCH_PARALLELISM);
        while let Some(t) = touches.next().await {
            t?;
        }
        let content = blob_key(d);
        if self.exists(&content).await? {
            self.touch(d).await?;
        } else {
            self.s3.put(&content, bytes).await.map_err(io_err)?;
        }
        self.catalog(repo).await?;
        self.s3
            .put(&revision_key(repo, d), Bytes::from(media_type.to_owned()))
            .await
            .map_err(io_err)
    }

    async fn manifest_media_type(&self, repo: &str, d: &Digest) -> StorageResult<Option<String>> {
        self.text(&revision_key(repo, d)).await
    }

    async fn get_manifest(&self, repo: &str, d: &Digest) -> StorageResult<Option<StoredManifest>> {
        let Some(media_type) = self.manifest_media_type(repo, d).await? else {
            return Ok(None);
        };
        Ok(self
            .s3
            .get(&blob_key(d))
            .await
            .map_err(io_err)?
            .map(|bytes| StoredManifest { media_type, bytes }))
    }

    async fn delete_manifest(&self, repo: &str, d: &Digest) -> StorageResult<bool> {
        self.delete_if_present(&revision_key(repo, d)).await
    }

    async fn manifests(&self, repo: &str) -> StorageResult<Vec<ManifestRevision>> {
        let dir = format!("repos/{repo}/_manifests/revisions/");
        Ok(self
            .s3
            .list(&dir)
            .await
            .map_err(io_err)?
            .into_iter()
            // Keys of a nested repository (`repo/x/...`) are not this one's.
            .filter(|m| m.key[dir.len()..].matches('/').count() == 1)
            .filter_map(|m| {
                Some(ManifestRevision {
                    digest: digest_at_end(&m.key)?,
                    modified: m.last_modified,
                })
            })
            .collect())
    }

    async fn put_tag(&self, repo: &str, tag: &str, d: &Digest) -> StorageResult<()> {
        let key = format!("{}{tag}", tags_dir(repo));
        self.s3
            .put(&key, Bytes::from(d.to_string()))
            .await
            .map_err(io_err)?;
        // A process deleting this manifest at the same moment may have removed the revision
        // after its tags: never leave the tag behind pointing at nothing.
        if !self.exists(&revision_key(repo, d)).await? {
            let _ = self.s3.delete(&key).await;
            return Err(StorageError::Io(io::Error::other(format!(
                "manifest {d} of {repo} was deleted while tag {tag} was written"
            ))));
        }
        Ok(())
    }

    async fn get_tag(&self, repo: &str, tag: &str) -> StorageResult<Option<String>> {
        Ok(self
            .text(&format!("{}{tag}", tags_dir(repo)))
            .await?
            .map(|s| s.trim().to_owned()))
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> StorageResult<bool> {
        self.delete_if_present(&format!("{}{tag}", tags_dir(repo)))
            .await
    }

    async fn list_tags(
        &self,
        repo: &str,
        last: Option<&str>,
        limit: Option<usize>,
    ) -> StorageResult<Option<Vec<String>>> {
        let dir = tags_dir(repo);
        let mut tags: Vec<String> = self
            .s3
            .list(&dir)
            .await
            .map_err(io_err)?
            .into_iter()
            .map(|m| m.key[dir.len()..].to_owned())
            .filter(|t| !t.contains('/'))
            .collect();
        if tags.is_empty() && !self.repository_exists(repo).await? {
            return Ok(None);
        }
        tags.sort();
        Ok(Some(super::page(tags, last, limit)))
    }

    async fn add_referrer(
        &self,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
        descriptor: Bytes,
    ) -> StorageResult<()> {
        self.s3
            .put(&referrer_key(repo, subject, referrer), descriptor)
            .await
            .map_err(io_err)
    }

    async fn remove_referrer(
        &self,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
    ) -> StorageResult<()> {
        self.s3
            .delete(&referrer_key(repo, subject, referrer))
            .await
            .map_err(io_err)
    }

    async fn referrers(&self, repo: &str, subject: &Digest) -> StorageResult<Vec<(Digest, Bytes)>> {
        let dir = referrers_dir(repo, subject);
        let mut out = Vec::new();
        for m in self.s3.list(&dir).await.map_err(io_err)? {
            let name = &m.key[dir.len()..];
            let Some((alg, hex)) = name.split_once('-') else {
                continue;
            };
            let Ok(d) = format!("{alg}:{hex}").parse::<Digest>() else {
                continue;
            };
            if let Some(b) = self.s3.get(&m.key).await.map_err(io_err)? {
                out.push((d, b));
            }
        }
        Ok(out)
    }

    async fn repository_exists(&self, repo: &str) -> StorageResult<bool> {
        if self.exists(&format!("catalog/{repo}")).await? {
            return Ok(true);
        }
        // A repository written before its catalog entry (a process killed in between).
        Ok(!self
            .s3
            .list_dirs(&repo_dir(repo))
            .await
            .map_err(io_err)?
            .is_empty())
    }

    async fn repositories(&self) -> StorageResult<Vec<String>> {
        let mut names: Vec<String> = self
            .s3
            .list("catalog/")
            .await
            .map_err(io_err)?
            .into_iter()
            .map(|m| m.key["catalog/".len()..].to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn blob_redirect(&self, d: &Digest) -> Option<String> {
        self.redirect
            .map(|valid| self.s3.presign_get(&blob_key(d), valid).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_state_keys_parse_back() {
        let d = upload_dir("library/app", &"ab".repeat(16));
        let key = format!("{d}state");
        let (k, id) = parse_state_key(&key).expect("state key");
        assert_eq!(k, upload_key("library/app"));
        assert_eq!(id, "ab".repeat(16));
        assert!(parse_state_key(&format!("{d}tail-3")).is_none());
        assert!(parse_state_key("uploads/x-y/state").is_none());
    }

    #[test]
    fn digests_are_read_from_key_ends() {
        let d = Digest::sha256_of(b"x");
        assert_eq!(digest_at_end(&blob_key(&d)), Some(d.clone()));
        assert_eq!(digest_at_end(&layer_key("a/b", &d)), Some(d));
        assert_eq!(digest_at_end("blobs/sha256/zz"), None);
    }
}
