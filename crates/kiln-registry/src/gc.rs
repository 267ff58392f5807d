//! Mark-and-sweep garbage collection of the blob store, through the [`Storage`] trait.
//!
//! Roots are every tag (and, without `delete_untagged`, every manifest revision). Marking
//! follows index children, config and layers, and referrers of every kept manifest. The
//! sweep runs under the exclusive `gc.lock`, which every commit (upload finish, mount,
//! manifest put) takes shared, so no commit interleaves with a sweep; content younger than
//! the grace period is kept, so a blob uploaded (or found by HEAD) but not yet referenced by
//! its manifest survives. Leftovers of writers killed before they completed (the filesystem
//! driver's temporary files of blobs, manifests, tags, referrer entries) are removed once
//! older than the grace period.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use kiln_oci::Digest;

use crate::error::RegistryError;
use crate::manifest;
use crate::storage::{
    delete_manifest_and_tags, is_recent, read_whole_blob, FsStorage, LockMode, Storage,
};

/// What a garbage collection should do.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Also delete manifests no tag (or kept index / subject) reaches.
    pub delete_untagged: bool,
    /// Report what would be deleted without deleting.
    pub dry_run: bool,
    /// Content modified more recently than this is never deleted.
    pub grace: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            delete_untagged: false,
            dry_run: false,
            grace: Duration::from_secs(3600),
        }
    }
}

/// What a garbage collection found and removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs (including manifests' content) deleted, or that would be with `dry_run`.
    pub blobs_deleted: Vec<Digest>,
    /// Bytes those blobs held.
    pub bytes_freed: u64,
    /// `(repository, digest)` manifest revisions deleted.
    pub manifests_deleted: Vec<(String, Digest)>,
    /// Blobs kept.
    pub blobs_kept: usize,
}

/// Runs one garbage collection over the filesystem registry at `root`. Usable from any
/// thread, inside an async runtime or not: the collection runs on a runtime of its own.
pub fn collect_garbage(root: &Path, opts: &GcOptions) -> Result<GcReport, RegistryError> {
    let store = FsStorage::open(root, true)
        .map_err(|e| RegistryError::io("opening registry root", root, e))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| RegistryError::io("starting the async runtime for", root, e))?;
            rt.block_on(collect_garbage_in(&store, opts))
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Runs one garbage collection over the storage `config` names (any driver), on a runtime
/// of its own like [`collect_garbage`]. With the `s3` driver, registry processes serving the
/// same bucket may keep running: see `docs/registry-fleet.md`.
pub fn collect_garbage_with_config(
    config: &crate::Config,
    opts: &GcOptions,
) -> Result<GcReport, RegistryError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| {
                    RegistryError::io("starting the async runtime for", &config.root, e)
                })?;
            rt.block_on(async {
                let store = crate::storage::open(config)?;
                collect_garbage_in(store.as_ref(), opts).await
            })
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Runs one garbage collection over `store`, whatever its driver, under its exclusive lock.
pub async fn collect_garbage_in(
    store: &dyn Storage,
    opts: &GcOptions,
) -> Result<GcReport, RegistryError> {
    let fail = |what: &'static str| {
        move |source| RegistryError::Storage {
            what,
            location: store.location(),
            source,
        }
    };
    let _lock = store
        .lock(LockMode::Exclusive)
        .await
        .map_err(fail("locking gc.lock in"))?;
    let mut report = GcReport::default();
    let mut marked: HashSet<Digest> = HashSet::new();

    for repo in store
        .repositories()
        .await
        .map_err(fail("listing repositories in"))?
    {
        let revisions = store
            .manifests(&repo)
            .await
            .map_err(fail("reading manifests in"))?;
        let mut kept: HashSet<Digest> = HashSet::new();
        let mut queue: Vec<Digest> = Vec::new();
        for (_, target) in store
            .tag_targets(&repo)
            .await
            .map_err(fail("reading tags in"))?
        {
            if let Ok(d) = target.parse::<Digest>() {
                queue.push(d);
            }
        }
        for r in &revisions {
            if !opts.delete_untagged || is_recent(r.modified, opts.grace) {
                queue.push(r.digest.clone());
            }
        }
        // Referrers of a kept manifest are kept too: index them by subject first.
        let mut by_subject: std::collections::HashMap<Digest, Vec<Digest>> = Default::default();
        for r in &revisions {
            if let Ok(Some(b)) = read_whole_blob(store, &r.digest).await {
                if let Some(s) = manifest::subject_of(&b) {
                    by_subject.entry(s).or_default().push(r.digest.clone());
                }
            }
        }
        while let Some(d) = queue.pop() {
            if !kept.insert(d.clone()) {
                continue;
            }
            marked.insert(d.clone());
            if let Ok(Some(bytes)) = read_whole_blob(store, &d).await {
                let refs = manifest::references_of(&bytes);
                marked.extend(refs.blobs);
                queue.extend(refs.manifests);
            }
            if let Some(rs) = by_subject.get(&d) {
                queue.extend(rs.iter().cloned());
            }
        }
        for r in revisions {
            if !kept.contains(&r.digest) {
                report
                    .manifests_deleted
                    .push((repo.clone(), r.digest.clone()));
                if !opts.dry_run {
                    delete_manifest_and_tags(store, &repo, &r.digest)
                        .await
                        .map_err(fail("deleting manifest in"))?;
                }
            }
        }
    }

    for blob in store.blobs().await.map_err(fail("listing blobs in"))? {
        if marked.contains(&blob.digest) || is_recent(blob.modified, opts.grace) {
            report.blobs_kept += 1;
            continue;
        }
        report.bytes_freed += blob.size;
        if !opts.dry_run {
            store
                .delete_blob(&blob.digest)
                .await
                .map_err(fail("deleting blob in"))?;
        }
        report.blobs_deleted.push(blob.digest);
    }
    if !opts.dry_run {
        // Links to deleted blobs would otherwise make stale existence answers cheap to
        // check but wrong; storage reads already require the blob, this keeps it tidy.
        let deleted: HashSet<&Digest> = report.blobs_deleted.iter().collect();
        for repo in store
            .repositories()
            .await
            .map_err(fail("listing repositories in"))?
        {
            for d in store.linked_blobs(&repo).await.unwrap_or_default() {
                if deleted.contains(&d) {
                    let _ = store.unlink_blob(&repo, &d).await;
                }
            }
        }
        // Leftovers of writes killed before they completed, then abandoned uploads.
        let _ = store.sweep_interrupted_writes(opts.grace).await;
        let _ = store
            .sweep_uploads(opts.grace.max(Duration::from_secs(24 * 3600)))
            .await;
    }
    Ok(report)
}
