// A second storage driver, defined entirely in the tests: everything in memory. It shows
// the `Storage` trait is all the HTTP API and GC need — the conformance suite runs on it
// with no change anywhere but here and the place tests choose a driver.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use kiln_oci::Digest;
use kiln_registry::storage::{
    page, BlobContent, BlobInfo, ByteStream, LockMode, ManifestRevision, Storage, StorageError,
    StorageLock, StorageResult, StoredManifest,
};

/// A staged upload: its data and when it was last written.
struct Upload {
    data: Vec<u8>,
    modified: SystemTime,
}

#[derive(Default)]
struct State {
    blobs: HashMap<Digest, (Bytes, SystemTime)>,
    /// Repositories ever written to (a blob linked or a manifest pushed).
    repos: BTreeSet<String>,
    links: HashMap<String, BTreeSet<Digest>>,
    uploads: HashMap<(String, String), Upload>,
    /// Uploads a request is appending to right now.
    busy: HashSet<(String, String)>,
    /// repo -> digest -> (media type, when written)
    revisions: HashMap<String, BTreeMap<Digest, (String, SystemTime)>>,
    tags: HashMap<String, BTreeMap<String, String>>,
    /// (repo, subject) -> referrer -> descriptor
    referrers: HashMap<(String, Digest), BTreeMap<Digest, Bytes>>,
    next_id: u64,
}

/// Registry storage held in memory, for tests.
#[derive(Default)]
pub struct MemoryStorage {
    state: Mutex<State>,
    gc: Arc<tokio::sync::RwLock<()>>,
}

impl MemoryStorage {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn key(repo: &str, id: &str) -> (String, String) {
    (repo.to_owned(), id.to_owned())
}

#[async_trait]
impl Storage for MemoryStorage {
    fn location(&self) -> String {
        "memory".to_owned()
    }

    async fn lock(&self, mode: LockMode) -> StorageResult<StorageLock> {
        Ok(match mode {
            LockMode::Shared => StorageLock::new(self.gc.clone().read_owned().await),
            LockMode::Exclusive => StorageLock::new(self.gc.clone().write_owned().await),
        })
    }

    async fn blob_size(&self, d: &Digest) -> StorageResult<Option<u64>> {
        Ok(self.state().blobs.get(d).map(|(b, _)| b.len() as u64))
    }

    async fn read_blob(
        &self,
        d: &Digest,
        offset: u64,
        len: u64,
    ) -> StorageResult<Option<BlobContent>> {
        let Some((b, _)) = self.state().blobs.get(d).cloned() else {
            return Ok(None);
        };
        let start = (offset as usize).min(b.len());
        let end = start.saturating_add(len as usize).min(b.len());
        let part = b.slice(start..end);
        // Large reads go out as a stream of small pieces, as a real driver's would.
        if part.len() <= 4096 {
            return Ok(Some(BlobContent::Bytes(part)));
        }
        let pieces: Vec<std::io::Result<Bytes>> = (0..part.len())
            .step_by(4096)
            .map(|i| Ok(part.slice(i..(i + 4096).min(part.len()))))
            .collect();
        Ok(Some(BlobContent::Stream(Box::pin(futures::stream::iter(
            pieces,
        )))))
    }

    async fn touch_blob(&self, d: &Digest) {
        if let Some((_, t)) = self.state().blobs.get_mut(d) {
            *t = SystemTime::now();
        }
    }

    async fn delete_blob(&self, d: &Digest) -> StorageResult<bool> {
        Ok(self.state().blobs.remove(d).is_some())
    }

    async fn blobs(&self) -> StorageResult<Vec<BlobInfo>> {
        Ok(self
            .state()
            .blobs
            .iter()
            .map(|(d, (b, t))| BlobInfo {
                digest: d.clone(),
                size: b.len() as u64,
                modified: Some(*t),
            })
            .collect())
    }

    async fn stored_bytes(&self) -> StorageResult<u64> {
        Ok(self
            .state()
            .blobs
            .values()
            .map(|(b, _)| b.len() as u64)
            .sum())
    }

    async fn link_blob(&self, repo: &str, d: &Digest) -> StorageResult<()> {
        let mut s = self.state();
        s.repos.insert(repo.to_owned());
        s.links
            .entry(repo.to_owned())
            .or_default()
            .insert(d.clone());
        Ok(())
    }

    async fn unlink_blob(&self, repo: &str, d: &Digest) -> StorageResult<bool> {
        Ok(self
            .state()
            .links
            .get_mut(repo)
            .is_some_and(|l| l.remove(d)))
    }

    async fn is_linked(&self, repo: &str, d: &Digest) -> StorageResult<bool> {
        Ok(self.state().links.get(repo).is_some_and(|l| l.contains(d)))
    }

    async fn linked_blobs(&self, repo: &str) -> StorageResult<Vec<Digest>> {
        Ok(self
            .state()
            .links
            .get(repo)
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn start_upload(&self, repo: &str) -> StorageResult<String> {
        let mut s = self.state();
        s.next_id += 1;
        let seed = format!("{repo} {} {:?}", s.next_id, SystemTime::now());
        let id = Digest::sha256_of(seed.as_bytes()).hex()[..32].to_owned();
        s.uploads.insert(
            key(repo, &id),
            Upload {
                data: Vec::new(),
                modified: SystemTime::now(),
            },
        );
        Ok(id)
    }

    async fn upload_size(&self, repo: &str, id: &str) -> StorageResult<Option<u64>> {
        Ok(self
            .state()
            .uploads
            .get(&key(repo, id))
            .map(|u| u.data.len() as u64))
    }

    async fn append_upload(
        &self,
        repo: &str,
        id: &str,
        offset: Option<u64>,
        mut data: ByteStream,
    ) -> StorageResult<u64> {
        {
            let mut s = self.state();
            let size = match s.uploads.get(&key(repo, id)) {
                None => return Err(StorageError::UploadUnknown),
                Some(u) => u.data.len() as u64,
            };
            if offset.is_some_and(|o| o != size) {
                return Err(StorageError::UploadOutOfOrder { size });
            }
            s.busy.insert(key(repo, id));
        }
        // The chunk is gathered first and added whole, so a failed one adds nothing.
        let mut chunk = Vec::new();
        let mut failed = None;
        while let Some(item) = data.next().await {
            match item {
                Ok(b) => chunk.extend_from_slice(&b),
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
        let mut s = self.state();
        s.busy.remove(&key(repo, id));
        if let Some(e) = failed {
            return Err(StorageError::UploadData(e));
        }
        let u = s
            .uploads
            .get_mut(&key(repo, id))
            .ok_or(StorageError::UploadUnknown)?;
        if offset.is_some_and(|o| o != u.data.len() as u64) {
            return Err(StorageError::UploadOutOfOrder {
                size: u.data.len() as u64,
            });
        }
        u.data.extend_from_slice(&chunk);
        u.modified = SystemTime::now();
        Ok(u.data.len() as u64)
    }

    async fn finish_upload(&self, repo: &str, id: &str, expected: &Digest) -> StorageResult<()> {
        let _lock = self.lock(LockMode::Shared).await?;
        let mut s = self.state();
        let u = s
            .uploads
            .get(&key(repo, id))
            .ok_or(StorageError::UploadUnknown)?;
        let actual = Digest::of(expected.algorithm(), &u.data);
        if &actual != expected {
            return Err(StorageError::DigestMismatch {
                actual,
                size: u.data.len() as u64,
            });
        }
        let u = s.uploads.remove(&key(repo, id)).expect("checked above");
        s.blobs
            .entry(expected.clone())
            .or_insert_with(|| (Bytes::from(u.data), SystemTime::now()));
        s.repos.insert(repo.to_owned());
        s.links
            .entry(repo.to_owned())
            .or_default()
            .insert(expected.clone());
        Ok(())
    }

    async fn cancel_upload(&self, repo: &str, id: &str) -> StorageResult<bool> {
        Ok(self.state().uploads.remove(&key(repo, id)).is_some())
    }

    async fn count_uploads(&self, repo: &str) -> StorageResult<(usize, usize)> {
        let s = self.state();
        let here = s.uploads.keys().filter(|(r, _)| r == repo).count();
        Ok((s.uploads.len(), here))
    }

    async fn reclaim_empty_uploads(&self, age: Duration) -> StorageResult<usize> {
        let mut s = self.state();
        let now = SystemTime::now();
        let busy = s.busy.clone();
        let before = s.uploads.len();
        s.uploads.retain(|k, u| {
            let idle =
                age.is_zero() || now.duration_since(u.modified).is_ok_and(|idle| idle >= age);
            busy.contains(k) || !u.data.is_empty() || !idle
        });
        Ok(before - s.uploads.len())
    }

    async fn sweep_uploads(&self, age: Duration) -> StorageResult<usize> {
        let mut s = self.state();
        let now = SystemTime::now();
        let before = s.uploads.len();
        s.uploads
            .retain(|_, u| now.duration_since(u.modified).map_or(true, |a| a < age));
        Ok(before - s.uploads.len())
    }

    async fn put_manifest(
        &self,
        repo: &str,
        d: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> StorageResult<()> {
        let mut s = self.state();
        let now = SystemTime::now();
        s.blobs
            .entry(d.clone())
            .and_modify(|(_, t)| *t = now)
            .or_insert((bytes, now));
        s.repos.insert(repo.to_owned());
        s.revisions
            .entry(repo.to_owned())
            .or_default()
            .insert(d.clone(), (media_type.to_owned(), now));
        Ok(())
    }

    async fn manifest_media_type(&self, repo: &str, d: &Digest) -> StorageResult<Option<String>> {
        Ok(self
            .state()
            .revisions
            .get(repo)
            .and_then(|r| r.get(d))
            .map(|(mt, _)| mt.clone()))
    }

    async fn get_manifest(&self, repo: &str, d: &Digest) -> StorageResult<Option<StoredManifest>> {
        let s = self.state();
        let Some((media_type, _)) = s.revisions.get(repo).and_then(|r| r.get(d)) else {
            return Ok(None);
        };
        Ok(s.blobs.get(d).map(|(b, _)| StoredManifest {
            media_type: media_type.clone(),
            bytes: b.clone(),
        }))
    }

    async fn delete_manifest(&self, repo: &str, d: &Digest) -> StorageResult<bool> {
        Ok(self
            .state()
            .revisions
            .get_mut(repo)
            .is_some_and(|r| r.remove(d).is_some()))
    }

    async fn manifests(&self, repo: &str) -> StorageResult<Vec<ManifestRevision>> {
        Ok(self
            .state()
            .revisions
            .get(repo)
            .map(|r| {
                r.iter()
                    .map(|(d, (_, t))| ManifestRevision {
                        digest: d.clone(),
                        modified: Some(*t),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn put_tag(&self, repo: &str, tag: &str, d: &Digest) -> StorageResult<()> {
        self.state()
            .tags
            .entry(repo.to_owned())
            .or_default()
            .insert(tag.to_owned(), d.to_string());
        Ok(())
    }

    async fn get_tag(&self, repo: &str, tag: &str) -> StorageResult<Option<String>> {
        Ok(self
            .state()
            .tags
            .get(repo)
            .and_then(|t| t.get(tag))
            .cloned())
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> StorageResult<bool> {
        Ok(self
            .state()
            .tags
            .get_mut(repo)
            .is_some_and(|t| t.remove(tag).is_some()))
    }

    async fn list_tags(
        &self,
        repo: &str,
        last: Option<&str>,
        limit: Option<usize>,
    ) -> StorageResult<Option<Vec<String>>> {
        let s = self.state();
        if !s.repos.contains(repo) {
            return Ok(None);
        }
        let all: Vec<String> = s
            .tags
            .get(repo)
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        Ok(Some(page(all, last, limit)))
    }

    async fn add_referrer(
        &self,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
        descriptor: Bytes,
    ) -> StorageResult<()> {
        self.state()
            .referrers
            .entry((repo.to_owned(), subject.clone()))
            .or_default()
            .insert(referrer.clone(), descriptor);
        Ok(())
    }

    async fn remove_referrer(
        &self,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
    ) -> StorageResult<()> {
        if let Some(r) = self
            .state()
            .referrers
            .get_mut(&(repo.to_owned(), subject.clone()))
        {
            r.remove(referrer);
        }
        Ok(())
    }

    async fn referrers(&self, repo: &str, subject: &Digest) -> StorageResult<Vec<(Digest, Bytes)>> {
        Ok(self
            .state()
            .referrers
            .get(&(repo.to_owned(), subject.clone()))
            .map(|r| r.iter().map(|(d, b)| (d.clone(), b.clone())).collect())
            .unwrap_or_default())
    }

    async fn repository_exists(&self, repo: &str) -> StorageResult<bool> {
        Ok(self.state().repos.contains(repo))
    }

    async fn repositories(&self) -> StorageResult<Vec<String>> {
        Ok(self.state().repos.iter().cloned().collect())
    }
}
