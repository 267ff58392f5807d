//! The cache graph: which layer chain each cache key produced. Serialized as the config blob
//! of a cache ref's manifest.

use std::collections::{BTreeMap, HashMap};

use kiln_oci::{media_type, Descriptor, Digest, ImageManifest};
use serde::{Deserialize, Serialize};

/// The manifest's `artifactType`: what marks a manifest as a kiln cache.
pub const ARTIFACT_TYPE: &str = "application/vnd.kiln.cache.v1";
/// Media type of the config blob (the cache graph).
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.kiln.cache.config.v1+json";
/// The version written, and the only one read.
pub const FORMAT_VERSION: u32 = 1;

/// Why a cache ref could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CacheFormatError {
    #[error("not a kiln cache (artifactType {0:?}, expected {ARTIFACT_TYPE})")]
    NotACache(String),
    #[error("cache format version {0} is not supported by this kiln (it reads version {FORMAT_VERSION}); export the cache again with this kiln")]
    UnknownVersion(u32),
    #[error("cache graph is malformed: {0}")]
    Malformed(String),
}

/// One layer blob of the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheLayer {
    /// The compressed blob.
    pub blob: Descriptor,
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    /// When the step that made it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LayerEntry {
    diff_id: Digest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RecordEntry {
    /// Cache key (`sha256:…`).
    key: String,
    /// Indexes into `layers`, bottom first.
    chain: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MountEntry {
    /// The `RUN --mount=type=cache` id.
    id: String,
    /// Index into `layers` of the tar of its contents.
    layer: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct GraphFile {
    version: u32,
    layers: Vec<LayerEntry>,
    records: Vec<RecordEntry>,
    /// Contents of cache mounts (`cache-mounts=true`); absent in caches without them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    mounts: Vec<MountEntry>,
}

/// The cache graph: cache key → layer chain, with each blob stored once.
#[derive(Debug, Clone, Default)]
pub struct CacheGraph {
    layers: Vec<CacheLayer>,
    by_digest: HashMap<Digest, usize>,
    records: BTreeMap<String, Vec<usize>>,
    mounts: BTreeMap<String, usize>,
}

impl CacheGraph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Every distinct layer blob.
    pub fn layers(&self) -> &[CacheLayer] {
        &self.layers
    }

    /// Records that `key` produced `chain` (bottom layer first). A later add of the same key
    /// replaces the earlier one.
    pub fn add(&mut self, key: &str, chain: &[CacheLayer]) {
        let idx = chain.iter().map(|l| self.intern(l)).collect();
        self.records.insert(key.to_owned(), idx);
    }

    fn intern(&mut self, l: &CacheLayer) -> usize {
        if let Some(&i) = self.by_digest.get(&l.blob.digest) {
            return i;
        }
        self.layers.push(l.clone());
        self.by_digest
            .insert(l.blob.digest.clone(), self.layers.len() - 1);
        self.layers.len() - 1
    }

    /// Records the contents of cache mount `id` as the tar blob `layer`.
    pub fn add_mount(&mut self, id: &str, layer: &CacheLayer) {
        let i = self.intern(layer);
        self.mounts.insert(id.to_owned(), i);
    }

    /// The cache mounts carried, by id.
    pub fn mounts(&self) -> impl Iterator<Item = (&str, &CacheLayer)> {
        self.mounts
            .iter()
            .map(|(id, &i)| (id.as_str(), &self.layers[i]))
    }

    /// The chain recorded for `key`.
    pub fn lookup(&self, key: &str) -> Option<Vec<CacheLayer>> {
        self.records
            .get(key)
            .map(|c| c.iter().map(|&i| self.layers[i].clone()).collect())
    }

    /// Keys with a record.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.records.keys().map(String::as_str)
    }

    /// Adds `other`'s records whose keys this graph lacks (records of this graph win).
    pub fn merge_missing(&mut self, other: &CacheGraph) {
        for (k, chain) in &other.records {
            if !self.records.contains_key(k) {
                let layers: Vec<CacheLayer> =
                    chain.iter().map(|&i| other.layers[i].clone()).collect();
                self.add(k, &layers);
            }
        }
        for (id, &i) in &other.mounts {
            if !self.mounts.contains_key(id) {
                let l = other.layers[i].clone();
                self.add_mount(id, &l);
            }
        }
    }

    /// Drops records whose chain holds a blob for which `keep` is false (e.g. gone from the
    /// registry), and layers no record uses any more.
    pub fn retain_blobs(&mut self, keep: impl Fn(&Digest) -> bool) {
        let layers = std::mem::take(&mut self.layers);
        let records = std::mem::take(&mut self.records);
        let mounts = std::mem::take(&mut self.mounts);
        self.by_digest.clear();
        for (k, chain) in records {
            let chain: Vec<CacheLayer> = chain.iter().map(|&i| layers[i].clone()).collect();
            if chain.iter().all(|l| keep(&l.blob.digest)) {
                self.add(&k, &chain);
            }
        }
        for (id, i) in mounts {
            if keep(&layers[i].blob.digest) {
                self.add_mount(&id, &layers[i]);
            }
        }
    }

    /// The config blob's bytes (deterministic: records sorted by key, layers in first-use order).
    pub fn to_config(&self) -> Vec<u8> {
        // Re-number layers in the order records use them, so equal graphs give equal bytes.
        let mut order: Vec<usize> = Vec::new();
        let mut seen = HashMap::new();
        let mut records = Vec::new();
        for (k, chain) in &self.records {
            let chain = chain
                .iter()
                .map(|&i| {
                    *seen.entry(i).or_insert_with(|| {
                        order.push(i);
                        order.len() - 1
                    })
                })
                .collect();
            records.push(RecordEntry {
                key: k.clone(),
                chain,
            });
        }
        let mut mounts = Vec::new();
        for (id, &i) in &self.mounts {
            let layer = *seen.entry(i).or_insert_with(|| {
                order.push(i);
                order.len() - 1
            });
            mounts.push(MountEntry {
                id: id.clone(),
                layer,
            });
        }
        let layers: Vec<LayerEntry> = order
            .iter()
            .map(|&i| LayerEntry {
                diff_id: self.layers[i].diff_id.clone(),
                created: self.layers[i].created.clone(),
            })
            .collect();
        let file = GraphFile {
            version: FORMAT_VERSION,
            layers,
            records,
            mounts,
        };
        serde_json::to_vec(&file).unwrap_or_default()
    }

    /// The layer blobs in the order [`CacheGraph::to_config`] numbers them.
    fn ordered_layers(&self) -> Vec<&CacheLayer> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for &i in self.records.values().flatten().chain(self.mounts.values()) {
            if seen.insert(i) {
                out.push(&self.layers[i]);
            }
        }
        out
    }

    /// The cache ref's manifest and its config bytes.
    pub fn to_manifest(&self) -> (ImageManifest, Vec<u8>) {
        let config = self.to_config();
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.to_owned()),
            artifact_type: Some(ARTIFACT_TYPE.to_owned()),
            config: Descriptor::of_bytes(CONFIG_MEDIA_TYPE, &config),
            layers: self
                .ordered_layers()
                .into_iter()
                .map(|l| l.blob.clone())
                .collect(),
            subject: None,
            annotations: BTreeMap::new(),
        };
        (manifest, config)
    }

    /// Reads a cache ref from its manifest and config bytes.
    pub fn from_manifest(
        manifest: &ImageManifest,
        config: &[u8],
    ) -> Result<Self, CacheFormatError> {
        let artifact = manifest
            .artifact_type
            .clone()
            .unwrap_or_else(|| manifest.config.media_type.clone());
        if artifact != ARTIFACT_TYPE && manifest.config.media_type != CONFIG_MEDIA_TYPE {
            return Err(CacheFormatError::NotACache(artifact));
        }
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version = serde_json::from_slice(config)
            .map_err(|e| CacheFormatError::Malformed(e.to_string()))?;
        if v.version != FORMAT_VERSION {
            return Err(CacheFormatError::UnknownVersion(v.version));
        }
        let file: GraphFile = serde_json::from_slice(config)
            .map_err(|e| CacheFormatError::Malformed(e.to_string()))?;
        if file.layers.len() != manifest.layers.len() {
            return Err(CacheFormatError::Malformed(format!(
                "{} layers in the graph but {} in the manifest",
                file.layers.len(),
                manifest.layers.len()
            )));
        }
        let layers: Vec<CacheLayer> = file
            .layers
            .into_iter()
            .zip(&manifest.layers)
            .map(|(l, d)| CacheLayer {
                blob: d.clone(),
                diff_id: l.diff_id,
                created: l.created,
            })
            .collect();
        let mut g = CacheGraph::new();
        for r in file.records {
            let chain: Option<Vec<CacheLayer>> =
                r.chain.iter().map(|&i| layers.get(i).cloned()).collect();
            let chain = chain.ok_or_else(|| {
                CacheFormatError::Malformed(format!("record {} names a missing layer", r.key))
            })?;
            g.add(&r.key, &chain);
        }
        for m in file.mounts {
            let l = layers.get(m.layer).ok_or_else(|| {
                CacheFormatError::Malformed(format!("cache mount {} names a missing layer", m.id))
            })?;
            g.add_mount(&m.id, l);
        }
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8) -> CacheLayer {
        let blob = Descriptor::new(
            media_type::OCI_LAYER_GZIP,
            Digest::sha256_of(&[n]),
            100 + n as u64,
        );
        CacheLayer {
            blob,
            diff_id: Digest::sha256_of(&[n, n]),
            created: Some(format!("2026-01-0{}T00:00:00Z", n % 9 + 1)),
        }
    }

    #[test]
    fn graph_round_trips_through_its_manifest() {
        let mut g = CacheGraph::new();
        g.add("sha256:aa", &[layer(1), layer(2)]);
        g.add("sha256:bb", &[layer(1), layer(2), layer(3)]);
        let (m, config) = g.to_manifest();
        assert_eq!(m.layers.len(), 3, "shared layers are stored once");
        assert_eq!(m.artifact_type.as_deref(), Some(ARTIFACT_TYPE));
        let back = CacheGraph::from_manifest(&m, &config).unwrap();
        assert_eq!(
            back.lookup("sha256:bb").unwrap(),
            vec![layer(1), layer(2), layer(3)]
        );
        assert_eq!(back.to_config(), config, "deterministic bytes");
    }

    #[test]
    fn unknown_versions_and_foreign_manifests_are_refused() {
        let g = CacheGraph::new();
        let (m, _) = g.to_manifest();
        let err = CacheGraph::from_manifest(&m, br#"{"version": 7, "layers": [], "records": []}"#)
            .unwrap_err();
        assert!(matches!(err, CacheFormatError::UnknownVersion(7)));
        assert!(err.to_string().contains("version 7 is not supported"));
        let mut image = m.clone();
        image.artifact_type = None;
        image.config.media_type = media_type::OCI_CONFIG.into();
        assert!(matches!(
            CacheGraph::from_manifest(&image, b"{}"),
            Err(CacheFormatError::NotACache(_))
        ));
    }

    #[test]
    fn merging_keeps_both_sides_and_this_side_wins() {
        let mut a = CacheGraph::new();
        a.add("k1", &[layer(1)]);
        a.add("shared", &[layer(2)]);
        let mut b = CacheGraph::new();
        b.add("k2", &[layer(3)]);
        b.add("shared", &[layer(4)]);
        a.merge_missing(&b);
        assert_eq!(a.len(), 3);
        assert_eq!(a.lookup("shared").unwrap(), vec![layer(2)]);
        assert_eq!(a.lookup("k2").unwrap(), vec![layer(3)]);
    }

    #[test]
    fn cache_mounts_round_trip_and_merge() {
        let mut g = CacheGraph::new();
        g.add("k", &[layer(1)]);
        g.add_mount("composer", &layer(5));
        let (m, config) = g.to_manifest();
        assert_eq!(m.layers.len(), 2);
        let back = CacheGraph::from_manifest(&m, &config).unwrap();
        let mounts: Vec<_> = back
            .mounts()
            .map(|(id, l)| (id.to_owned(), l.clone()))
            .collect();
        assert_eq!(mounts, vec![("composer".to_owned(), layer(5))]);
        let mut other = CacheGraph::new();
        other.add_mount("npm", &layer(6));
        other.add_mount("composer", &layer(7));
        let mut merged = back.clone();
        merged.merge_missing(&other);
        assert_eq!(merged.mounts().count(), 2);
        assert_eq!(
            merged.mounts().find(|(id, _)| *id == "composer").unwrap().1,
            &layer(5)
        );
    }

    #[test]
    fn records_with_vanished_blobs_are_dropped() {
        let mut g = CacheGraph::new();
        g.add("keep", &[layer(1)]);
        g.add("lose", &[layer(1), layer(2)]);
        let gone = layer(2).blob.digest;
        g.retain_blobs(|d| *d != gone);
        assert!(g.lookup("keep").is_some());
        assert!(g.lookup("lose").is_none());
        assert_eq!(g.to_manifest().0.layers.len(), 1);
    }

    #[test]
    fn a_graph_of_five_thousand_records_over_four_mib_round_trips() {
        let mut g = CacheGraph::new();
        let mut chain = Vec::new();
        for i in 0..5000u32 {
            let b = i.to_le_bytes();
            let blob = Descriptor::new(media_type::OCI_LAYER_GZIP, Digest::sha256_of(&b), i as u64);
            chain.push(CacheLayer {
                blob,
                diff_id: Digest::sha256_of(&[b[0], b[1], b[2], b[3], 1]),
                created: None,
            });
            if chain.len() > 200 {
                chain.remove(0);
            }
            g.add(
                &Digest::sha256_of(&[b[0], b[1], b[2], b[3], 2]).to_string(),
                &chain,
            );
        }
        let (m, config) = g.to_manifest();
        assert!(config.len() > 4 << 20, "config is {} bytes", config.len());
        let back = CacheGraph::from_manifest(&m, &config).unwrap();
        assert_eq!(back.len(), 5000);
    }
}
