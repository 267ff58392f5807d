//! Imported remote caches as the engine sees them, and what a cache export holds.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_cache::CacheGraph;
use kiln_graph::graph::Op;
use kiln_oci::Descriptor;
use kiln_solver::CacheKey;
use kiln_store::Store;

use crate::build::SolvedBuild;
use crate::engine::{BlobSource, RemoteCache, WorkerError};
use crate::image::Layer;

/// A cache graph read from a registry ref or a local layout, with where its blobs are.
pub struct ImportedCache {
    graph: CacheGraph,
    source: Arc<dyn BlobSource>,
    /// Blobs checked to still exist at the source (digest → present).
    checked: std::sync::Mutex<std::collections::HashMap<kiln_oci::Digest, bool>>,
}

impl ImportedCache {
    /// A cache whose blobs `source` fetches. What the import dropped as unusable (see
    /// [`CacheGraph::import_warnings`]) is shown as warnings here, once.
    pub fn new(graph: CacheGraph, source: Arc<dyn BlobSource>) -> Self {
        for w in graph.import_warnings() {
            eprintln!("kiln: warning: cache {}: {w}", source.name());
        }
        ImportedCache {
            graph,
            source,
            checked: Default::default(),
        }
    }

    /// The graph as imported.
    pub fn graph(&self) -> &CacheGraph {
        &self.graph
    }

    /// Where its blobs come from.
    pub fn source(&self) -> &Arc<dyn BlobSource> {
        &self.source
    }
}

impl ImportedCache {
    /// Whether every blob of `layers` still exists at the source (a registry may have
    /// garbage-collected some). Each blob is asked once per build; the unknown ones of a
    /// chain are asked several at a time, as a long chain is round-trip bound. A blob found
    /// missing is warned about once.
    fn all_present(&self, layers: &[Layer]) -> bool {
        let unknown: Vec<&Layer> = {
            let memo = self.checked.lock().expect("blob check memo");
            if layers
                .iter()
                .any(|l| memo.get(&l.blob.digest) == Some(&false))
            {
                return false;
            }
            let mut seen = std::collections::HashSet::new();
            layers
                .iter()
                .filter(|l| !memo.contains_key(&l.blob.digest) && seen.insert(&l.blob.digest))
                .collect()
        };
        if unknown.is_empty() {
            return true;
        }
        const CHECKERS: usize = 16;
        let per = unknown.len().div_ceil(CHECKERS);
        let results: Vec<(kiln_oci::Digest, bool)> = std::thread::scope(|scope| {
            let jobs: Vec<_> = unknown
                .chunks(per)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .map(|l| (l.blob.digest.clone(), self.source.has(&l.blob)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            jobs.into_iter()
                .flat_map(|j| j.join().unwrap_or_default())
                .collect()
        });
        let mut memo = self.checked.lock().expect("blob check memo");
        let mut all = results.len() == unknown.len();
        for (d, present) in results {
            if !present && memo.insert(d.clone(), false).is_none() {
                eprintln!(
                    "kiln: warning: cache {} lost blob {d}; the step that made it will run again",
                    self.source.name(),
                );
            }
            if present {
                memo.insert(d, true);
            }
            all &= present;
        }
        all
    }
}

impl RemoteCache for ImportedCache {
    fn layers(&self, key: &CacheKey) -> Option<Vec<Layer>> {
        self.graph.lookup(&key.to_string())
    }

    fn lookup(&self, key: &CacheKey) -> Option<(Vec<Layer>, Arc<dyn BlobSource>)> {
        let layers = self.graph.lookup(&key.to_string())?;
        // A record whose blobs are gone (registry GC) is a miss: the step reruns, nothing fails.
        if !self.all_present(&layers) {
            return None;
        }
        Some((layers, self.source.clone()))
    }

    fn top_layers(
        &self,
        key: &CacheKey,
        below: &[kiln_oci::Digest],
    ) -> Option<(Vec<Layer>, Arc<dyn BlobSource>)> {
        let layers = self.graph.lookup(&key.to_string())?;
        if layers.len() <= below.len() || layers.iter().zip(below).any(|(l, d)| l.diff_id != *d) {
            return None;
        }
        let top = layers[below.len()..].to_vec();
        if !self.all_present(&top) {
            return None;
        }
        Some((top, self.source.clone()))
    }
}

/// The blobs of a chain rebuilt from a record's own top layers (from an imported cache) on
/// the layers a step's input actually has (from wherever that input got them).
pub(crate) struct RebasedSource {
    top: Arc<dyn BlobSource>,
    top_blobs: std::collections::HashSet<kiln_oci::Digest>,
    below: Option<Arc<dyn BlobSource>>,
}

impl RebasedSource {
    /// `top` serves the blobs of `top_layers`; `below` (if any) every other blob.
    pub(crate) fn new(
        top: Arc<dyn BlobSource>,
        top_layers: &[Layer],
        below: Option<Arc<dyn BlobSource>>,
    ) -> Self {
        RebasedSource {
            top,
            top_blobs: top_layers.iter().map(|l| l.blob.digest.clone()).collect(),
            below,
        }
    }

    fn source_of(&self, blob: &Descriptor) -> Option<&Arc<dyn BlobSource>> {
        if self.top_blobs.contains(&blob.digest) {
            Some(&self.top)
        } else {
            self.below.as_ref()
        }
    }
}

impl BlobSource for RebasedSource {
    fn fetch(&self, blob: &Descriptor, store: &Store) -> Result<(), WorkerError> {
        match self.source_of(blob) {
            Some(s) => s.fetch(blob, store),
            None => Err(WorkerError::Internal(format!(
                "layer blob {} is not in the local store and has no source",
                blob.digest
            ))),
        }
    }

    fn name(&self) -> String {
        self.top.name()
    }

    fn has(&self, blob: &Descriptor) -> bool {
        match self.source_of(blob) {
            Some(s) => s.has(blob),
            // No remote source: the step that made it ran here, so the blob is local.
            None => true,
        }
    }

    fn repository(&self) -> Option<kiln_oci::Reference> {
        self.top.repository()
    }
}

/// Blobs of a local OCI layout (`--import-cache type=local,src=DIR`).
pub struct LayoutBlobs {
    dir: PathBuf,
}

impl LayoutBlobs {
    /// Blobs under `dir/blobs/<alg>/<hex>`.
    pub fn new(dir: PathBuf) -> Self {
        LayoutBlobs { dir }
    }
}

impl BlobSource for LayoutBlobs {
    fn fetch(&self, blob: &Descriptor, store: &Store) -> Result<(), WorkerError> {
        let path = self
            .dir
            .join("blobs")
            .join(blob.digest.algorithm().name())
            .join(blob.digest.hex());
        let mut f = std::fs::File::open(&path).map_err(|e| WorkerError::Io {
            what: "opening cache blob",
            path: path.clone(),
            source: e,
        })?;
        let mut w = store.content().writer()?;
        io::copy(&mut f, &mut w).map_err(|e| WorkerError::Io {
            what: "copying cache blob",
            path: path.clone(),
            source: e,
        })?;
        // The content store verifies size and digest before the blob becomes visible.
        w.commit(&blob.digest, blob.size)?;
        Ok(())
    }

    fn name(&self) -> String {
        self.dir.display().to_string()
    }

    fn has(&self, blob: &Descriptor) -> bool {
        let alg = blob.digest.algorithm().name();
        self.dir
            .join("blobs")
            .join(alg)
            .join(blob.digest.hex())
            .is_file()
    }
}

/// Which steps a cache export covers: `max` every step of the build, `min` only those whose
/// layers make up the exported image.
pub async fn export_graph(solved: &SolvedBuild, max: bool) -> Result<CacheGraph, WorkerError> {
    let graph = &solved.graph;
    let mut nodes: Vec<usize> = Vec::new();
    if max {
        nodes.extend(
            graph
                .vertices
                .iter()
                .enumerate()
                .filter(|(_, v)| {
                    !matches!(
                        v.op,
                        Op::Local(_) | Op::Image(_) | Op::OciLayout(_) | Op::Http(_)
                    )
                })
                .map(|(i, _)| i),
        );
    } else {
        // Follow the target's root filesystem down its chain of steps.
        let mut cur = graph.target_stage().root.map(|r| r.index());
        while let Some(n) = cur {
            let v = &graph.vertices[n];
            let base = match (&v.op, v.op.layer_base()) {
                (_, Some(base)) => base,
                // `COPY --link`: the stage below, and the copy's own record, which is what
                // a runner with a changed base hits.
                (Op::Merge(_), None) => {
                    nodes.extend(v.inputs.iter().skip(1).map(|id| id.index()));
                    Some(0)
                }
                _ => break,
            };
            nodes.push(n);
            cur = base
                .and_then(|i| v.inputs.get(i as usize))
                .map(|id| id.index());
        }
    }
    let mut out = CacheGraph::new();
    for n in nodes {
        let key = solved
            .solver
            .key(n)
            .await
            .map_err(|e| WorkerError::Internal(e.to_string()))?;
        if let Some(layers) = solved.worker.record_of(&key) {
            out.add(&key.to_string(), &layers);
        }
    }
    Ok(out)
}

/// Adds the contents of the build's cache mounts (`RUN --mount=type=cache`) to `out`, each as
/// one compressed tar blob in the local content store; a mount larger than `max_bytes` is
/// left out with a warning.
pub fn export_cache_mounts(
    solved: &SolvedBuild,
    out: &mut CacheGraph,
    max_bytes: u64,
) -> Result<(), WorkerError> {
    use std::io::Write;
    let mut ids = std::collections::BTreeSet::new();
    for v in &solved.graph.vertices {
        if let Op::Exec(e) = &v.op {
            for m in &e.mounts {
                if let kiln_graph::graph::MountKind::Cache { id, .. } = &m.kind {
                    ids.insert(id.clone());
                }
            }
        }
    }
    let store = solved.worker.store();
    for id in ids {
        let guard = solved.worker.cache_mount_dir(&id)?;
        let dir = guard.path().to_owned();
        let size: u64 = walkdir::WalkDir::new(&dir)
            .into_iter()
            .filter_map(|e| e.ok())
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum();
        if size == 0 {
            continue;
        }
        if size > max_bytes {
            eprintln!("kiln: warning: cache mount {id} holds {size} bytes, over the {max_bytes}-byte bound; not exported");
            continue;
        }
        let io_err = |source| WorkerError::Io {
            what: "archiving cache mount",
            path: dir.clone(),
            source,
        };
        let blob = store.content().writer()?;
        let opts = kiln_oci::compression::CompressOptions::default();
        let gz = kiln_oci::compression::Compressor::new(
            blob,
            kiln_oci::compression::Compression::Gzip,
            &opts,
        )
        .map_err(io_err)?;
        let mut tar_out = kiln_oci::DigestWriter::new(gz, kiln_oci::Algorithm::Sha256);
        {
            let mut b = tar::Builder::new(&mut tar_out);
            b.follow_symlinks(false);
            b.mode(tar::HeaderMode::Deterministic);
            b.append_dir_all(".", &dir).map_err(io_err)?;
            b.finish().map_err(io_err)?;
        }
        tar_out.flush().map_err(io_err)?;
        let (gz, diff_id, _) = tar_out.finish();
        let blob = gz.finish().map_err(io_err)?;
        let info = blob.commit_computed()?;
        let layer = Layer {
            blob: Descriptor::new(kiln_oci::media_type::OCI_LAYER_GZIP, info.digest, info.size),
            diff_id,
            created: None,
        };
        out.add_mount(&id, &layer);
    }
    Ok(())
}
