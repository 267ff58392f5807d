//! Inline cache: the cache records of an image's own layers, carried inside the image config
//! under [`INLINE_CONFIG_KEY`] (`--export-cache type=inline`), and read back from an image in
//! a registry (`--import-cache type=registry,ref=IMAGE`). Records name the image's layers by
//! position, so the image needs no blob besides its own. See `docs/cache-format.md`.

use std::collections::BTreeMap;

use kiln_oci::{
    media_type, ImageConfig, ImageManifest, Platform, Reference, RegistryClient, RegistryError,
};
use serde::{Deserialize, Serialize};

use crate::format::{CacheGraph, CacheLayer};

/// The image-config field that holds kiln's inline cache.
pub const INLINE_CONFIG_KEY: &str = "kiln.cache.v1";
/// The inline cache version written, and the only one read.
pub const INLINE_VERSION: u32 = 1;
/// Any version of kiln's inline cache field starts with this.
const INLINE_KEY_PREFIX: &str = "kiln.cache.v";
/// Where BuildKit keeps its own inline cache (a format kiln does not read).
const BUILDKIT_INLINE_KEY: &str = "moby.buildkit.cache.v0";

/// Why an image's inline cache could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InlineCacheError {
    #[error("image {reference}: {source}")]
    Registry {
        reference: String,
        source: Box<RegistryError>,
    },
    #[error("image {reference}: inline cache format version {version} is not supported by this kiln (it reads version {INLINE_VERSION}); push the image again with this kiln's --export-cache type=inline")]
    UnknownVersion { reference: String, version: u32 },
    #[error("image {reference}: inline cache is malformed: {message}")]
    Malformed { reference: String, message: String },
    #[error("image {reference} carries BuildKit's inline cache ({BUILDKIT_INLINE_KEY}), which kiln does not read; build it with kiln and --export-cache type=inline")]
    BuildkitOnly { reference: String },
}

/// The field's JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct InlineFile {
    version: u32,
    /// One entry per image layer, bottom first: when the step that made it ran (`null` for
    /// layers without a time, e.g. a base image's).
    created: Vec<Option<String>>,
    /// Sorted by key.
    records: Vec<InlineRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct InlineRecord {
    /// Cache key (`sha256:…`).
    key: String,
    /// Indexes into the image's layers, bottom first.
    chain: Vec<usize>,
}

/// The records of a cache graph that an image's own layers can carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineCache {
    file: InlineFile,
}

impl InlineCache {
    /// Keeps the records of `graph` whose every layer is one of `image_layers` (bottom
    /// first), naming those layers by position; records needing any other blob are left out.
    pub fn for_image(graph: &CacheGraph, image_layers: &[CacheLayer]) -> Self {
        let mut records = Vec::new();
        // `keys` walks a BTreeMap: records come out sorted, so equal graphs give equal bytes.
        for key in graph.keys() {
            let Some(chain) = graph.lookup(key) else {
                continue;
            };
            if let Some(chain) = positions(&chain, image_layers) {
                records.push(InlineRecord {
                    key: key.to_owned(),
                    chain,
                });
            }
        }
        InlineCache {
            file: InlineFile {
                version: INLINE_VERSION,
                created: image_layers.iter().map(|l| l.created.clone()).collect(),
                records,
            },
        }
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.file.records.len()
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.file.records.is_empty()
    }

    /// The value to store under [`INLINE_CONFIG_KEY`] in the image config.
    pub fn to_value(&self) -> serde_json::Value {
        // Plain data with string keys: serialization cannot fail.
        serde_json::to_value(&self.file).unwrap_or(serde_json::Value::Null)
    }

    /// The config fields that carry this cache, ready to merge into an image config.
    pub fn config_fields(&self) -> BTreeMap<String, serde_json::Value> {
        BTreeMap::from([(INLINE_CONFIG_KEY.to_owned(), self.to_value())])
    }
}

/// Where each layer of `chain` sits in `image`: the prefix of the image when the chain is
/// one (the usual case: a step's filesystem is the image's bottom layers), else the first
/// image layer with the same content. `None` when a layer is not in the image.
fn positions(chain: &[CacheLayer], image: &[CacheLayer]) -> Option<Vec<usize>> {
    let same = |a: &CacheLayer, b: &CacheLayer| a.diff_id == b.diff_id;
    if chain.len() <= image.len() && chain.iter().zip(image).all(|(a, b)| same(a, b)) {
        return Some((0..chain.len()).collect());
    }
    chain
        .iter()
        .map(|l| image.iter().position(|i| same(l, i)))
        .collect()
}

/// Layer media types as kiln records them (OCI), whatever the image's manifest used.
fn oci_layer_type(media: &str) -> String {
    match media {
        media_type::DOCKER_LAYER_GZIP => media_type::OCI_LAYER_GZIP.to_owned(),
        other => other.to_owned(),
    }
}

/// Reads the inline cache of an image from its manifest and config. `Ok(None)` when the image
/// carries none; an unknown version or a graph that does not fit the image is an error.
pub fn graph_from_image(
    reference: &str,
    manifest: &ImageManifest,
    config: &ImageConfig,
) -> Result<Option<CacheGraph>, InlineCacheError> {
    let malformed = |message: String| InlineCacheError::Malformed {
        reference: reference.to_owned(),
        message,
    };
    let Some(value) = config.extra.get(INLINE_CONFIG_KEY) else {
        // A newer kiln's field (kiln.cache.v2, …) is refused by name rather than ignored.
        let newer = config.extra.keys().find_map(|k| {
            k.strip_prefix(INLINE_KEY_PREFIX)
                .and_then(|v| v.parse::<u32>().ok())
        });
        return match newer {
            Some(version) => Err(InlineCacheError::UnknownVersion {
                reference: reference.to_owned(),
                version,
            }),
            None if config.extra.contains_key(BUILDKIT_INLINE_KEY) => {
                Err(InlineCacheError::BuildkitOnly {
                    reference: reference.to_owned(),
                })
            }
            None => Ok(None),
        };
    };
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let v: Version = serde_json::from_value(value.clone()).map_err(|e| malformed(e.to_string()))?;
    if v.version != INLINE_VERSION {
        return Err(InlineCacheError::UnknownVersion {
            reference: reference.to_owned(),
            version: v.version,
        });
    }
    let file: InlineFile =
        serde_json::from_value(value.clone()).map_err(|e| malformed(e.to_string()))?;
    let diff_ids = &config.rootfs.diff_ids;
    if diff_ids.len() != manifest.layers.len() || file.created.len() != manifest.layers.len() {
        return Err(malformed(format!(
            "{} layers in the manifest, {} in the config, {} in the inline cache",
            manifest.layers.len(),
            diff_ids.len(),
            file.created.len()
        )));
    }
    let layers: Vec<CacheLayer> = manifest
        .layers
        .iter()
        .zip(diff_ids)
        .zip(file.created)
        .map(|((blob, diff_id), created)| {
            let mut blob = blob.clone();
            blob.media_type = oci_layer_type(&blob.media_type);
            CacheLayer {
                blob,
                diff_id: diff_id.clone(),
                created,
            }
        })
        .collect();
    let mut graph = CacheGraph::new();
    for r in file.records {
        let chain: Option<Vec<CacheLayer>> =
            r.chain.iter().map(|&i| layers.get(i).cloned()).collect();
        let chain = chain
            .ok_or_else(|| malformed(format!("record {} names a layer the image lacks", r.key)))?;
        graph.add(&r.key, &chain);
    }
    graph.drop_invalid_layers();
    Ok(Some(graph))
}

/// Reads the inline cache of the image at `reference` (for `platform` when it is an index):
/// its manifest and config only, never a layer. `Ok(None)` when the image has no inline cache.
pub async fn import_inline(
    client: &RegistryClient,
    reference: &Reference,
    platform: &Platform,
) -> Result<Option<CacheGraph>, InlineCacheError> {
    let resolved =
        client
            .resolve(reference, platform)
            .await
            .map_err(|e| InlineCacheError::Registry {
                reference: reference.to_string(),
                source: Box::new(e),
            })?;
    graph_from_image(&reference.to_string(), &resolved.image, &resolved.config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_oci::{Descriptor, Digest};

    fn layer(n: u8, created: Option<&str>) -> CacheLayer {
        CacheLayer {
            blob: Descriptor::new(
                media_type::OCI_LAYER_GZIP,
                Digest::sha256_of(&[n]),
                100 + n as u64,
            ),
            diff_id: Digest::sha256_of(&[n, n]),
            created: created.map(str::to_owned),
        }
    }

    /// An image of `layers` whose config carries `fields`, as a registry would serve it.
    fn image(
        layers: &[CacheLayer],
        fields: BTreeMap<String, serde_json::Value>,
        docker: bool,
    ) -> (ImageManifest, ImageConfig) {
        let config = ImageConfig {
            architecture: "amd64".into(),
            os: "linux".into(),
            rootfs: kiln_oci::RootFs {
                kind: "layers".into(),
                diff_ids: layers.iter().map(|l| l.diff_id.clone()).collect(),
            },
            extra: fields,
            ..Default::default()
        };
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.into()),
            artifact_type: None,
            config: Descriptor::of_bytes(media_type::OCI_CONFIG, &config.to_bytes()),
            layers: layers
                .iter()
                .map(|l| {
                    let mut d = l.blob.clone();
                    if docker {
                        d.media_type = media_type::DOCKER_LAYER_GZIP.into();
                    }
                    d
                })
                .collect(),
            subject: None,
            annotations: BTreeMap::new(),
        };
        // What travels is the JSON: read it back as a registry client would.
        let config = serde_json::from_slice(&config.to_bytes()).unwrap();
        (manifest, config)
    }

    fn seed_graph() -> (CacheGraph, Vec<CacheLayer>) {
        let base = layer(1, None);
        let copy = layer(2, Some("2026-01-01T00:00:00Z"));
        let run = layer(3, Some("2026-01-02T00:00:00Z"));
        let mut g = CacheGraph::new();
        g.add("sha256:workdir", std::slice::from_ref(&base));
        g.add("sha256:copy", &[base.clone(), copy.clone()]);
        g.add("sha256:run", &[base.clone(), copy.clone(), run.clone()]);
        // A dependency stage's step: its layer is not in the image.
        g.add("sha256:deps", &[base.clone(), layer(9, None)]);
        (g, vec![base, copy, run])
    }

    #[test]
    fn inline_cache_round_trips_through_the_image_config() {
        let (g, layers) = seed_graph();
        let inline = InlineCache::for_image(&g, &layers);
        assert_eq!(
            inline.len(),
            3,
            "the record needing a foreign blob is left out"
        );
        let (m, c) = image(&layers, inline.config_fields(), false);
        let back = graph_from_image("reg/app:1", &m, &c).unwrap().unwrap();
        assert_eq!(back.len(), 3);
        assert!(back.lookup("sha256:deps").is_none());
        assert_eq!(back.lookup("sha256:run").unwrap(), layers);
        assert_eq!(
            back.lookup("sha256:copy").unwrap(),
            vec![layers[0].clone(), layers[1].clone()]
        );
        // Re-exporting what was imported gives the same bytes (the same image digest).
        let again = InlineCache::for_image(&back, &layers);
        assert_eq!(
            serde_json::to_vec(&again.to_value()).unwrap(),
            serde_json::to_vec(&inline.to_value()).unwrap()
        );
    }

    #[test]
    fn records_are_sorted_and_name_layers_by_position() {
        let (g, layers) = seed_graph();
        let v = InlineCache::for_image(&g, &layers).to_value();
        let keys: Vec<&str> = v["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["sha256:copy", "sha256:run", "sha256:workdir"]);
        assert_eq!(v["records"][1]["chain"], serde_json::json!([0, 1, 2]));
        assert_eq!(v["version"], 1);
        assert_eq!(v["created"][0], serde_json::Value::Null);
    }

    #[test]
    fn docker_media_types_are_read_as_kilns_own() {
        let (g, layers) = seed_graph();
        let inline = InlineCache::for_image(&g, &layers);
        let (m, c) = image(&layers, inline.config_fields(), true);
        let back = graph_from_image("reg/app:1", &m, &c).unwrap().unwrap();
        assert_eq!(back.lookup("sha256:run").unwrap(), layers);
    }

    #[test]
    fn an_image_without_inline_cache_has_none() {
        let (_, layers) = seed_graph();
        let (m, c) = image(&layers, BTreeMap::new(), false);
        assert!(graph_from_image("reg/app:1", &m, &c).unwrap().is_none());
    }

    #[test]
    fn unknown_inline_versions_are_refused_with_a_clear_message() {
        let (g, layers) = seed_graph();
        let mut value = InlineCache::for_image(&g, &layers).to_value();
        value["version"] = serde_json::json!(2);
        let (m, c) = image(
            &layers,
            BTreeMap::from([(INLINE_CONFIG_KEY.to_owned(), value)]),
            false,
        );
        let err = graph_from_image("reg/app:1", &m, &c).unwrap_err();
        assert!(matches!(
            err,
            InlineCacheError::UnknownVersion { version: 2, .. }
        ));
        assert!(err
            .to_string()
            .contains("inline cache format version 2 is not supported"));
        // A newer kiln's field under its own name is refused the same way.
        let (m, c) = image(
            &layers,
            BTreeMap::from([("kiln.cache.v3".to_owned(), serde_json::json!({}))]),
            false,
        );
        assert!(matches!(
            graph_from_image("reg/app:1", &m, &c),
            Err(InlineCacheError::UnknownVersion { version: 3, .. })
        ));
    }

    #[test]
    fn buildkit_inline_cache_is_named_not_misread() {
        let (_, layers) = seed_graph();
        let (m, c) = image(
            &layers,
            BTreeMap::from([(BUILDKIT_INLINE_KEY.to_owned(), serde_json::json!("e30="))]),
            false,
        );
        let err = graph_from_image("reg/app:1", &m, &c).unwrap_err();
        assert!(err.to_string().contains("BuildKit's inline cache"), "{err}");
    }

    #[test]
    fn a_graph_that_does_not_fit_the_image_is_malformed() {
        let (g, layers) = seed_graph();
        let inline = InlineCache::for_image(&g, &layers);
        // The config claims three layers' times, the image has two.
        let (m, c) = image(&layers[..2], inline.config_fields(), false);
        assert!(matches!(
            graph_from_image("reg/app:1", &m, &c),
            Err(InlineCacheError::Malformed { .. })
        ));
        let mut value = inline.to_value();
        value["records"][0]["chain"] = serde_json::json!([0, 7]);
        let (m, c) = image(
            &layers,
            BTreeMap::from([(INLINE_CONFIG_KEY.to_owned(), value)]),
            false,
        );
        let err = graph_from_image("reg/app:1", &m, &c).unwrap_err();
        assert!(err.to_string().contains("names a layer the image lacks"));
    }
}
