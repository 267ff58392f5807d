//! A cache as read by an import: its records, where its blobs are, and the engine's view of
//! it ([`RemoteCache`]: a record is a hit only while its blobs still exist at the source).

use std::sync::Arc;

use kiln_cache::CacheGraph;
use kiln_solver::CacheKey;
use kiln_worker::engine::{BlobSource, RemoteCache};
use kiln_worker::image::Layer;

/// A cache graph read from a registry ref or a local layout, with where its blobs are.
pub struct ImportedCache {
    graph: CacheGraph,
    source: Arc<dyn BlobSource>,
    /// Blobs checked to still exist at the source (digest → present).
    checked: std::sync::Mutex<std::collections::HashMap<kiln_oci::Digest, bool>>,
}

impl ImportedCache {
    /// A cache whose blobs `source` fetches. What the import dropped as unusable is in
    /// [`CacheGraph::import_warnings`]; the backend that read it reports those.
    pub fn new(graph: CacheGraph, source: Arc<dyn BlobSource>) -> Self {
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
