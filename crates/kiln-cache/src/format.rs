//! The cache graph: which layer chain each cache key produced. Serialized as the config blob
//! of a cache ref's manifest.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

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
    /// Start of the UTC day (Unix seconds) of the last build that used or made the record;
    /// absent in caches written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_used: Option<u64>,
}

/// Seconds in a day: the granularity of a record's last-used time.
pub(crate) const DAY_SECS: u64 = 86_400;

/// `t` (Unix seconds) rounded down to the start of its UTC day.
pub(crate) fn day_of(t: u64) -> u64 {
    t - t % DAY_SECS
}

/// The fewest records the default bound of [`CacheGraph::merge_previous`] merges in from
/// the ref's previous export (when it has that many).
pub const MIN_MERGED_RECORDS: usize = 64;

/// What an export keeps of the records it merges in from the ref it imported
/// (`--export-cache ...,max-age=7d,max-records=N`). Records this build used or made are
/// always kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Drop records not used for longer than this.
    pub max_age: Option<Duration>,
    /// Keep at most this many records, the most recently used first.
    pub max_records: Option<usize>,
}

/// Parses a duration such as `168h`, `7d`, `30m`, `90s` or `2w` (a number and one unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (expected e.g. 168h, 7d, 30m)"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => DAY_SECS,
        "w" => 7 * DAY_SECS,
        _ => {
            return Err(format!(
                "{text:?} has no known unit (use s, m, h, d or w, e.g. 168h or 7d)"
            ))
        }
    };
    n.checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    chain: Vec<usize>,
    last_used: Option<u64>,
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
    records: BTreeMap<String, Record>,
    mounts: BTreeMap<String, usize>,
    /// What reading the graph left out, and why (see [`CacheGraph::import_warnings`]).
    warnings: Vec<String>,
}

/// Layer media types a cache may hold: what kiln exports, and Docker's gzip layer.
const CACHE_LAYER_TYPES: [&str; 4] = [
    media_type::OCI_LAYER_TAR,
    media_type::OCI_LAYER_GZIP,
    media_type::OCI_LAYER_ZSTD,
    media_type::DOCKER_LAYER_GZIP,
];

/// Why a layer of an imported graph cannot be used, if it cannot.
fn layer_problem(l: &CacheLayer) -> Option<String> {
    let d = &l.blob.digest;
    if !CACHE_LAYER_TYPES.contains(&l.blob.media_type.as_str()) {
        return Some(format!(
            "layer {d} has media type {:?}, which is not a layer kiln knows",
            l.blob.media_type
        ));
    }
    if l.blob.size == 0 {
        // Even an empty tar, compressed, has bytes.
        return Some(format!("layer {d} claims a size of 0 bytes"));
    }
    if l.diff_id.algorithm() != kiln_oci::Algorithm::Sha256 {
        return Some(format!(
            "layer {d} has diff id {}, which is not a sha256 digest",
            l.diff_id
        ));
    }
    None
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

    /// What reading an imported graph dropped, one sentence each (records naming missing
    /// layers, layers of unknown media types, a blob claimed with two diff ids): the caller
    /// shows them as warnings; the records left are usable.
    pub fn import_warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Drops the records and cache mounts that use a layer an importer cannot trust (see
    /// [`layer_problem`]), noting each bad layer once in the import warnings.
    pub(crate) fn drop_invalid_layers(&mut self) {
        let problems: HashMap<Digest, String> = self
            .layers
            .iter()
            .filter_map(|l| layer_problem(l).map(|p| (l.blob.digest.clone(), p)))
            .collect();
        if problems.is_empty() {
            return;
        }
        let before = self.records.len() + self.mounts.len();
        self.retain_blobs(|d| !problems.contains_key(d));
        let dropped = before - self.records.len() - self.mounts.len();
        let mut notes: Vec<&String> = problems.values().collect();
        notes.sort();
        for p in notes {
            self.warnings.push(format!(
                "{p}; the records that use it are dropped ({dropped} record(s) in all)"
            ));
        }
    }

    /// Every distinct layer blob.
    pub fn layers(&self) -> &[CacheLayer] {
        &self.layers
    }

    /// Records that `key` produced `chain` (bottom layer first). A later add of the same key
    /// replaces the earlier one.
    pub fn add(&mut self, key: &str, chain: &[CacheLayer]) {
        self.add_record(key, chain, None);
    }

    fn add_record(&mut self, key: &str, chain: &[CacheLayer], last_used: Option<u64>) {
        let chain = chain.iter().map(|l| self.intern(l)).collect();
        self.records
            .insert(key.to_owned(), Record { chain, last_used });
    }

    /// Marks every record as used at `now` (Unix seconds; kept to the day, so that an
    /// unchanged rebuild on the same day exports the same bytes).
    pub fn mark_used(&mut self, now: u64) {
        for r in self.records.values_mut() {
            r.last_used = Some(day_of(now));
        }
    }

    /// When the record for `key` was last used (start of its UTC day), if known.
    pub fn last_used(&self, key: &str) -> Option<u64> {
        self.records.get(key).and_then(|r| r.last_used)
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
            .map(|r| r.chain.iter().map(|&i| self.layers[i].clone()).collect())
    }

    /// Keys with a record.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.records.keys().map(String::as_str)
    }

    /// Adds `other`'s records whose keys this graph lacks (records of this graph win), with
    /// their last-used times.
    pub fn merge_missing(&mut self, other: &CacheGraph) {
        // Each of `other`'s layers is interned once, however many chains share it.
        let mut remap: Vec<Option<usize>> = vec![None; other.layers.len()];
        let mut index_of = |g: &mut CacheGraph, i: usize| -> usize {
            *remap[i].get_or_insert_with(|| g.intern(&other.layers[i]))
        };
        for (k, r) in &other.records {
            if !self.records.contains_key(k) {
                let chain = r.chain.iter().map(|&i| index_of(self, i)).collect();
                self.records.insert(
                    k.clone(),
                    Record {
                        chain,
                        last_used: r.last_used,
                    },
                );
            }
        }
        for (id, &i) in &other.mounts {
            if !self.mounts.contains_key(id) {
                let j = index_of(self, i);
                self.mounts.insert(id.clone(), j);
            }
        }
    }

    /// Merges in the records `previous` (what the exported ref held before) has and this
    /// graph (this build's records) lacks, bounded by `policy`; returns how many of
    /// `previous`'s records were left out. With neither bound given (the default), at most
    /// as many records are merged in as this build has of its own, and at least
    /// [`MIN_MERGED_RECORDS`], the most recently used first: a ref stops growing with every
    /// build, and a small target (a lint job) writing the same ref as a big one keeps the big
    /// one's records. This build's own records are always kept.
    pub fn merge_previous(
        &mut self,
        previous: &CacheGraph,
        policy: &RetentionPolicy,
        now: u64,
    ) -> usize {
        if *policy != RetentionPolicy::default() {
            self.merge_missing(previous);
            return self.retain_recent(policy, now);
        }
        let mut older = previous.clone();
        older.records.retain(|k, _| !self.records.contains_key(k));
        let default_bound = RetentionPolicy {
            max_age: None,
            max_records: Some(self.records.len().max(MIN_MERGED_RECORDS)),
        };
        let dropped = older.retain_recent(&default_bound, now);
        self.merge_missing(&older);
        dropped
    }

    /// Drops records whose chain holds a blob for which `keep` is false (e.g. gone from the
    /// registry), and layers no record uses any more.
    pub fn retain_blobs(&mut self, keep: impl Fn(&Digest) -> bool) {
        let layers = std::mem::take(&mut self.layers);
        let kept: Vec<bool> = layers.iter().map(|l| keep(&l.blob.digest)).collect();
        self.records.retain(|_, r| r.chain.iter().all(|&i| kept[i]));
        self.mounts.retain(|_, i| kept[*i]);
        // Renumber the layers still in use, in their old order.
        let mut used = vec![false; layers.len()];
        for &i in self
            .records
            .values()
            .flat_map(|r| r.chain.iter())
            .chain(self.mounts.values())
        {
            used[i] = true;
        }
        let mut remap = vec![usize::MAX; layers.len()];
        self.by_digest.clear();
        for (i, l) in layers.into_iter().enumerate() {
            if used[i] {
                remap[i] = self.layers.len();
                self.by_digest
                    .insert(l.blob.digest.clone(), self.layers.len());
                self.layers.push(l);
            }
        }
        for r in self.records.values_mut() {
            for i in r.chain.iter_mut() {
                *i = remap[*i];
            }
        }
        for i in self.mounts.values_mut() {
            *i = remap[*i];
        }
    }

    /// Applies `policy` at time `now` (Unix seconds): records with no last-used time (from
    /// older caches) count as used today; records last used longer than `max_age` ago are
    /// dropped (a day counts until its end, so a record is never dropped early); then, past
    /// `max_records`, the least recently used go (ties by key). Returns how many were dropped.
    pub fn retain_recent(&mut self, policy: &RetentionPolicy, now: u64) -> usize {
        let before = self.records.len();
        let today = day_of(now);
        for r in self.records.values_mut() {
            r.last_used.get_or_insert(today);
        }
        if let Some(max_age) = policy.max_age {
            self.records.retain(|_, r| {
                let day_end = r.last_used.unwrap_or(today).saturating_add(DAY_SECS);
                day_end.saturating_add(max_age.as_secs()) > now
            });
        }
        if let Some(max) = policy.max_records {
            if self.records.len() > max {
                let mut by_age: Vec<(u64, String)> = self
                    .records
                    .iter()
                    .map(|(k, r)| (r.last_used.unwrap_or(today), k.clone()))
                    .collect();
                // Newest first; among equals, key order.
                by_age.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
                for (_, k) in by_age.into_iter().skip(max) {
                    self.records.remove(&k);
                }
            }
        }
        let dropped = before - self.records.len();
        if dropped > 0 {
            // Forget layers no record (or cache mount) uses any more.
            self.retain_blobs(|_| true);
        }
        dropped
    }

    /// The config blob's bytes (deterministic: records sorted by key, layers in first-use order).
    pub fn to_config(&self) -> Vec<u8> {
        // Re-number layers in the order records use them, so equal graphs give equal bytes.
        let mut order: Vec<usize> = Vec::new();
        let mut seen = HashMap::new();
        let mut records = Vec::new();
        for (k, r) in &self.records {
            let chain = r
                .chain
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
                last_used: r.last_used,
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
        let chains = self.records.values().flat_map(|r| r.chain.iter());
        for &i in chains.chain(self.mounts.values()) {
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
        let mut g = CacheGraph::new();
        // A blob listed twice must be the same layer both times; if its diff ids disagree,
        // one of them is a lie and neither can be trusted.
        let mut claimed: HashMap<&Digest, &Digest> = HashMap::new();
        let mut conflicting: Vec<Digest> = Vec::new();
        for (l, d) in file.layers.iter().zip(&manifest.layers) {
            if let Some(other) = claimed.insert(&d.digest, &l.diff_id) {
                if *other != l.diff_id && !conflicting.contains(&d.digest) {
                    conflicting.push(d.digest.clone());
                }
            }
        }
        // Manifest position → graph index (a blob listed twice is stored once); `None` for a
        // blob with conflicting diff ids.
        let index: Vec<Option<usize>> = file
            .layers
            .into_iter()
            .zip(&manifest.layers)
            .map(|(l, d)| {
                (!conflicting.contains(&d.digest)).then(|| {
                    g.intern(&CacheLayer {
                        blob: d.clone(),
                        diff_id: l.diff_id,
                        created: l.created,
                    })
                })
            })
            .collect();
        for d in &conflicting {
            g.warnings.push(format!(
                "layer {d} is listed with two different diff ids; the records that use it are dropped"
            ));
        }
        for r in file.records {
            let chain: Option<Vec<usize>> = r
                .chain
                .iter()
                .map(|&i| index.get(i).copied().flatten())
                .collect();
            match chain {
                Some(chain) if !chain.is_empty() => {
                    g.records.insert(
                        r.key,
                        Record {
                            chain,
                            last_used: r.last_used,
                        },
                    );
                }
                Some(_) => {
                    g.warnings.push(format!(
                        "record {} has an empty layer chain; dropped",
                        r.key
                    ));
                }
                // Uses a layer with conflicting diff ids (warned about above).
                None if r.chain.iter().all(|&i| i < index.len()) => {}
                None => g.warnings.push(format!(
                    "record {} names layer {:?} but the cache has {} layers; dropped",
                    r.key,
                    r.chain.iter().max(),
                    index.len()
                )),
            }
        }
        for m in file.mounts {
            match index.get(m.layer).copied().flatten() {
                Some(i) => {
                    g.mounts.insert(m.id, i);
                }
                None => g.warnings.push(format!(
                    "cache mount {} names a missing or unusable layer; dropped",
                    m.id
                )),
            }
        }
        g.drop_invalid_layers();
        if !g.warnings.is_empty() {
            // Forget the layers only dropped records used.
            g.retain_blobs(|_| true);
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

    /// The manifest and config of `g`, with the config as JSON to tamper with.
    fn parts(g: &CacheGraph) -> (ImageManifest, serde_json::Value) {
        let (m, config) = g.to_manifest();
        (m, serde_json::from_slice(&config).unwrap())
    }

    fn read(m: &ImageManifest, config: &serde_json::Value) -> CacheGraph {
        CacheGraph::from_manifest(m, &serde_json::to_vec(config).unwrap()).unwrap()
    }

    #[test]
    fn a_record_whose_chain_repeats_a_layer_round_trips_with_the_blob_stored_once() {
        let mut g = CacheGraph::new();
        g.add("k", &[layer(1), layer(1), layer(2), layer(1)]);
        let (m, config) = g.to_manifest();
        assert_eq!(m.layers.len(), 2);
        let back = CacheGraph::from_manifest(&m, &config).unwrap();
        assert!(back.import_warnings().is_empty());
        assert_eq!(
            back.lookup("k").unwrap(),
            vec![layer(1), layer(1), layer(2), layer(1)]
        );
    }

    #[test]
    fn records_naming_layers_the_cache_lacks_are_dropped_with_a_warning() {
        let mut g = CacheGraph::new();
        g.add("good", &[layer(1)]);
        g.add("bad", &[layer(1), layer(2)]);
        g.add("empty", &[layer(2)]);
        let (m, mut config) = parts(&g);
        for r in config["records"].as_array_mut().unwrap() {
            match r["key"].as_str().unwrap() {
                "bad" => r["chain"] = serde_json::json!([0, 7]),
                "empty" => r["chain"] = serde_json::json!([]),
                _ => {}
            }
        }
        let back = read(&m, &config);
        assert_eq!(back.keys().collect::<Vec<_>>(), ["good"]);
        let w = back.import_warnings().join("\n");
        assert!(w.contains("record bad names layer Some(7)"), "{w}");
        assert!(w.contains("record empty has an empty layer chain"), "{w}");
        assert_eq!(back.layers().len(), 1, "layer 2 went with its records");
    }

    #[test]
    fn layers_of_unknown_media_types_or_no_size_drop_the_records_using_them() {
        let mut g = CacheGraph::new();
        g.add("good", &[layer(1)]);
        g.add("odd", &[layer(1), layer(2)]);
        g.add("empty", &[layer(3)]);
        g.add_mount("m", &layer(2));
        let (mut m, config) = parts(&g);
        let at = |d: &Digest| m.layers.iter().position(|l| l.digest == *d).unwrap();
        let (two, three) = (at(&layer(2).blob.digest), at(&layer(3).blob.digest));
        m.layers[two].media_type = "application/vnd.example.made-up".into();
        m.layers[three].size = 0;
        let back = read(&m, &config);
        assert_eq!(back.keys().collect::<Vec<_>>(), ["good"]);
        assert_eq!(back.mounts().count(), 0);
        let w = back.import_warnings().join("\n");
        assert!(w.contains("\"application/vnd.example.made-up\""), "{w}");
        assert!(w.contains("claims a size of 0 bytes"), "{w}");
        assert_eq!(back.to_manifest().0.layers.len(), 1);
    }

    #[test]
    fn a_blob_listed_with_two_diff_ids_is_trusted_with_neither() {
        let mut g = CacheGraph::new();
        g.add("a", &[layer(1), layer(2)]);
        g.add("b", &[layer(3)]);
        let (mut m, mut config) = parts(&g);
        // A third manifest entry: layer 2's blob again, with another diff id.
        let two = m
            .layers
            .iter()
            .position(|l| l.digest == layer(2).blob.digest)
            .unwrap();
        m.layers.push(m.layers[two].clone());
        let other = Digest::sha256_of(b"other").to_string();
        config["layers"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({ "diff_id": other }));
        config["records"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"key": "c", "chain": [m.layers.len() - 1]}));
        let back = read(&m, &config);
        assert_eq!(back.keys().collect::<Vec<_>>(), ["b"]);
        let w = back.import_warnings().join("\n");
        assert!(w.contains("two different diff ids"), "{w}");
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
            let blob = Descriptor::new(
                media_type::OCI_LAYER_GZIP,
                Digest::sha256_of(&b),
                1 + i as u64,
            );
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

    const NOW: u64 = 1_795_000_000; // 2026-11-17, mid-day

    #[test]
    fn last_used_days_round_trip_and_old_caches_still_read() {
        let mut g = CacheGraph::new();
        g.add("k1", &[layer(1)]);
        g.mark_used(NOW);
        let (m, config) = g.to_manifest();
        let back = CacheGraph::from_manifest(&m, &config).unwrap();
        assert_eq!(back.last_used("k1"), Some(NOW - NOW % DAY_SECS));
        // A cache written before the field existed.
        let old = br#"{"version":1,"layers":[{"diff_id":"sha256:4bf5122f344554c53bde2ebb8cd2b7e3d1600ad631c385a5d7cce23c7785459a"}],"records":[{"key":"k1","chain":[0]}]}"#;
        let back = CacheGraph::from_manifest(&m, old).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back.last_used("k1"), None);
    }

    #[test]
    fn an_unchanged_graph_used_again_the_same_day_exports_the_same_bytes() {
        let mut a = CacheGraph::new();
        a.add("k1", &[layer(1), layer(2)]);
        a.mark_used(NOW);
        let mut b = CacheGraph::new();
        b.add("k1", &[layer(1), layer(2)]);
        b.mark_used(NOW + 3600);
        assert_eq!(a.to_config(), b.to_config());
        b.mark_used(NOW + DAY_SECS);
        assert_ne!(a.to_config(), b.to_config(), "a new day is a new stamp");
    }

    #[test]
    fn merged_records_older_than_max_age_are_dropped_and_their_layers_with_them() {
        let mut imported = CacheGraph::new();
        imported.add("old", &[layer(1), layer(2)]);
        imported.add("recent", &[layer(1), layer(3)]);
        imported.add("unknown", &[layer(4)]);
        imported.mark_used(NOW - 10 * DAY_SECS);
        imported.records.get_mut("recent").unwrap().last_used = Some(day_of(NOW - DAY_SECS));
        imported.records.get_mut("unknown").unwrap().last_used = None;
        let mut g = CacheGraph::new();
        g.add("mine", &[layer(1), layer(5)]);
        g.mark_used(NOW);
        g.merge_missing(&imported);
        assert_eq!(
            g.last_used("old"),
            Some(day_of(NOW - 10 * DAY_SECS)),
            "kept from the import"
        );
        let policy = RetentionPolicy {
            max_age: Some(parse_duration("168h").unwrap()),
            max_records: None,
        };
        assert_eq!(g.retain_recent(&policy, NOW), 1);
        let keys: Vec<&str> = g.keys().collect();
        assert_eq!(keys, ["mine", "recent", "unknown"]);
        assert_eq!(
            g.last_used("unknown"),
            Some(day_of(NOW)),
            "an unknown age counts from now"
        );
        let (m, config) = g.to_manifest();
        assert_eq!(m.layers.len(), 4, "layer 2 went with the old record");
        let back = CacheGraph::from_manifest(&m, &config).unwrap();
        assert_eq!(back.lookup("recent").unwrap(), vec![layer(1), layer(3)]);
    }

    #[test]
    fn a_record_is_kept_until_the_end_of_its_last_day_plus_max_age() {
        let mut g = CacheGraph::new();
        g.add("k", &[layer(1)]);
        g.mark_used(NOW);
        let policy = RetentionPolicy {
            max_age: Some(parse_duration("1d").unwrap()),
            max_records: None,
        };
        let end_of_next_day = day_of(NOW) + 2 * DAY_SECS;
        assert_eq!(g.clone().retain_recent(&policy, end_of_next_day - 1), 0);
        assert_eq!(g.retain_recent(&policy, end_of_next_day), 1);
    }

    #[test]
    fn max_records_keeps_the_most_recently_used() {
        let mut g = CacheGraph::new();
        for (i, age) in [(1u8, 5u64), (2, 1), (3, 3), (4, 0)] {
            let key = format!("k{i}");
            g.add(&key, &[layer(i)]);
            g.records.get_mut(&key).unwrap().last_used = Some(day_of(NOW - age * DAY_SECS));
        }
        let policy = RetentionPolicy {
            max_age: None,
            max_records: Some(2),
        };
        assert_eq!(g.retain_recent(&policy, NOW), 2);
        let keys: Vec<&str> = g.keys().collect();
        assert_eq!(keys, ["k2", "k4"]);
        assert_eq!(g.layers().len(), 2);
    }

    #[test]
    fn by_default_a_merge_keeps_as_many_older_records_as_the_build_has_at_least_64() {
        // Stale records of earlier builds under the ref, one day apart, the newest last: 10
        // more than the minimum. This build has two records and shares one with the ref.
        let stale = MIN_MERGED_RECORDS + 10;
        let mut previous = CacheGraph::new();
        for i in 0..stale {
            let key = format!("old{i:03}");
            previous.add(&key, &[layer(i as u8)]);
            previous.records.get_mut(&key).unwrap().last_used =
                Some(day_of(NOW - (stale - i) as u64 * DAY_SECS));
        }
        previous.add("shared", &[layer(250)]);
        let mut g = CacheGraph::new();
        g.add("shared", &[layer(250)]);
        g.add("mine", &[layer(251)]);
        g.mark_used(NOW);
        let dropped = g.merge_previous(&previous, &RetentionPolicy::default(), NOW);
        assert_eq!(dropped, 10);
        assert_eq!(g.len(), 2 + MIN_MERGED_RECORDS);
        assert!(g.lookup("mine").is_some() && g.lookup("shared").is_some());
        assert!(g.lookup("old009").is_none(), "the oldest went");
        assert!(g.lookup("old010").is_some(), "the newest stayed");
        assert_eq!(
            g.layers().len(),
            2 + MIN_MERGED_RECORDS,
            "layers of dropped records are not kept"
        );

        // Built again with nothing new: the ref does not grow.
        let mut again = CacheGraph::new();
        again.add("shared", &[layer(250)]);
        again.add("mine", &[layer(251)]);
        again.mark_used(NOW);
        again.merge_previous(&g, &RetentionPolicy::default(), NOW);
        assert_eq!(again.len(), 2 + MIN_MERGED_RECORDS);

        // A build with more records than the minimum merges in as many as it has.
        let mut big = CacheGraph::new();
        for i in 0..70u8 {
            big.add(&format!("big{i}"), &[layer(100 + i)]);
        }
        big.mark_used(NOW);
        assert_eq!(
            big.merge_previous(&previous, &RetentionPolicy::default(), NOW),
            5
        );
        assert_eq!(big.len(), 70 + 70);
    }

    #[test]
    fn a_merge_with_bounds_given_applies_them_instead_of_the_default() {
        let mut previous = CacheGraph::new();
        for i in 1..=5u8 {
            previous.add(&format!("old{i}"), &[layer(i)]);
        }
        previous.mark_used(NOW - DAY_SECS);
        let mut g = CacheGraph::new();
        g.add("mine", &[layer(10)]);
        g.mark_used(NOW);
        let policy = RetentionPolicy {
            max_age: Some(parse_duration("30d").unwrap()),
            max_records: None,
        };
        assert_eq!(g.merge_previous(&previous, &policy, NOW), 0);
        assert_eq!(g.len(), 6, "max-age alone does not bound the count");
    }

    #[test]
    fn durations_parse_with_one_unit_and_bad_ones_say_why() {
        assert_eq!(parse_duration("168h").unwrap().as_secs(), 7 * DAY_SECS);
        assert_eq!(parse_duration("7d").unwrap().as_secs(), 7 * DAY_SECS);
        assert_eq!(parse_duration("2w").unwrap().as_secs(), 14 * DAY_SECS);
        assert_eq!(parse_duration("90s").unwrap().as_secs(), 90);
        assert!(parse_duration("7").unwrap_err().contains("no known unit"));
        assert!(parse_duration("h").unwrap_err().contains("not a duration"));
        assert!(parse_duration("99999999999999999999w").is_err());
    }

    #[test]
    fn retain_blobs_renumbers_shared_layers_consistently() {
        let mut g = CacheGraph::new();
        g.add("a", &[layer(1), layer(2), layer(3)]);
        g.add("b", &[layer(1), layer(3)]);
        g.add("c", &[layer(4)]);
        g.add_mount("m", &layer(5));
        let gone = layer(2).blob.digest;
        g.retain_blobs(|d| *d != gone);
        assert!(g.lookup("a").is_none());
        assert_eq!(g.lookup("b").unwrap(), vec![layer(1), layer(3)]);
        assert_eq!(g.lookup("c").unwrap(), vec![layer(4)]);
        assert_eq!(g.mounts().next().unwrap().1, &layer(5));
        // New records intern against the renumbered layers.
        g.add("d", &[layer(3), layer(4)]);
        assert_eq!(g.layers().len(), 4);
    }
}
