//! Mark-and-sweep garbage collection of the blob store.
//!
//! Roots are every tag (and, without `delete_untagged`, every manifest revision). Marking
//! follows index children, config and layers, and referrers of every kept manifest. The
//! sweep runs under the exclusive `gc.lock`, which every commit (upload finish, mount,
//! manifest put) takes shared, so no commit interleaves with a sweep; content younger than
//! the grace period is kept, so a blob uploaded (or found by HEAD) but not yet referenced by
//! its manifest survives. Temporary files of writers killed before their rename (blobs,
//! manifests, tags, referrer entries) are removed once older than the grace period.

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use kiln_oci::Digest;

use crate::error::RegistryError;
use crate::manifest;
use crate::storage::Storage;

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

fn young(path: &Path, grace: Duration) -> bool {
    match fs::metadata(path).and_then(|m| m.modified()) {
        Ok(t) => SystemTime::now()
            .duration_since(t)
            .map(|age| age < grace)
            .unwrap_or(true),
        Err(_) => false,
    }
}

fn list_digests(dir: &Path) -> Vec<Digest> {
    let mut out = Vec::new();
    for alg in ["sha256", "sha512"] {
        let Ok(rd) = fs::read_dir(dir.join(alg)) else {
            continue;
        };
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Ok(d) = format!("{alg}:{n}").parse::<Digest>() {
                out.push(d);
            }
        }
    }
    out
}

/// Runs one garbage collection over the registry at `root`.
pub fn collect_garbage(root: &Path, opts: &GcOptions) -> Result<GcReport, RegistryError> {
    let store = Storage::open(root, true)
        .map_err(|e| RegistryError::io("opening registry root", root, e))?;
    let io = |what: &'static str| move |e| RegistryError::io(what, root, e);
    let _lock = store.gc_lock(true).map_err(io("locking gc.lock in"))?;
    let mut report = GcReport::default();
    let mut marked: HashSet<Digest> = HashSet::new();

    for repo in store
        .repositories()
        .map_err(io("listing repositories in"))?
    {
        let rev_dir = store.repo_dir(&repo).join("_manifests/revisions");
        let revisions = list_digests(&rev_dir);
        let mut kept: HashSet<Digest> = HashSet::new();
        let mut queue: Vec<Digest> = Vec::new();
        for (_, target) in store
            .tags_with_targets(&repo)
            .map_err(io("reading tags in"))?
        {
            if let Ok(d) = target.parse::<Digest>() {
                queue.push(d);
            }
        }
        for d in &revisions {
            let link = rev_dir.join(d.algorithm().name()).join(d.hex());
            if !opts.delete_untagged || young(&link, opts.grace) {
                queue.push(d.clone());
            }
        }
        // Referrers of a kept manifest are kept too: index them by subject first.
        let mut by_subject: std::collections::HashMap<Digest, Vec<Digest>> = Default::default();
        for d in &revisions {
            if let Ok(b) = fs::read(store.blob_path(d)) {
                if let Some(s) = manifest::subject_of(&b) {
                    by_subject.entry(s).or_default().push(d.clone());
                }
            }
        }
        while let Some(d) = queue.pop() {
            if !kept.insert(d.clone()) {
                continue;
            }
            marked.insert(d.clone());
            if let Ok(bytes) = fs::read(store.blob_path(&d)) {
                let refs = manifest::references_of(&bytes);
                marked.extend(refs.blobs);
                queue.extend(refs.manifests);
            }
            if let Some(rs) = by_subject.get(&d) {
                queue.extend(rs.iter().cloned());
            }
        }
        for d in revisions {
            if !kept.contains(&d) {
                report.manifests_deleted.push((repo.clone(), d.clone()));
                if !opts.dry_run {
                    store
                        .delete_manifest(&repo, &d)
                        .map_err(io("deleting manifest in"))?;
                }
            }
        }
    }

    let blob_root = root.join("blobs");
    for alg in ["sha256", "sha512"] {
        let Ok(prefixes) = fs::read_dir(blob_root.join(alg)) else {
            continue;
        };
        for p in prefixes.flatten() {
            let Ok(files) = fs::read_dir(p.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let path = f.path();
                let Ok(d) = format!("{alg}:{name}").parse::<Digest>() else {
                    // Leftover temporary files of an interrupted write.
                    if name.starts_with(".tmp-") && !young(&path, opts.grace) && !opts.dry_run {
                        let _ = fs::remove_file(&path);
                    }
                    continue;
                };
                if marked.contains(&d) || young(&path, opts.grace) {
                    report.blobs_kept += 1;
                    continue;
                }
                report.bytes_freed += f.metadata().map(|m| m.len()).unwrap_or(0);
                if !opts.dry_run {
                    fs::remove_file(&path)
                        .map_err(|e| RegistryError::io("deleting blob", &path, e))?;
                }
                report.blobs_deleted.push(d);
            }
        }
    }
    // Links to deleted blobs would otherwise make stale existence answers cheap to check
    // but wrong; storage reads already require the blob, this keeps the tree tidy.
    if !opts.dry_run {
        let deleted: HashSet<&Digest> = report.blobs_deleted.iter().collect();
        for repo in store
            .repositories()
            .map_err(io("listing repositories in"))?
        {
            let layers = store.repo_dir(&repo).join("_layers");
            for d in list_digests(&layers) {
                if deleted.contains(&d) {
                    let _ = fs::remove_file(layers.join(d.algorithm().name()).join(d.hex()));
                }
            }
        }
        // Temporary files of manifest, tag and referrer writes killed before their rename
        // (the blob store's own are swept above).
        for repo in store
            .repositories()
            .map_err(io("listing repositories in"))?
        {
            remove_stale_temporaries(&store.repo_dir(&repo), opts.grace);
        }
        // Abandoned uploads.
        if let Ok(rd) = fs::read_dir(root.join("uploads")) {
            for e in rd.flatten() {
                if !young(&e.path(), opts.grace.max(Duration::from_secs(24 * 3600))) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
    Ok(report)
}

/// Removes `.tmp-*` files older than `grace` under a repository's `_manifests` and
/// `_referrers` trees. A writer renames its temporary file within one request, so one older
/// than the grace period belongs to a process that died before the rename; nothing reads
/// these names (every listing skips them), so removing one never loses data.
fn remove_stale_temporaries(repo_dir: &Path, grace: Duration) {
    let mut stack = vec![repo_dir.join("_manifests"), repo_dir.join("_referrers")];
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
                        && !young(&path, grace) =>
                {
                    let _ = fs::remove_file(&path);
                }
                _ => {}
            }
        }
    }
}
