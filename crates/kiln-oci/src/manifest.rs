//! Manifests, indexes and descriptors: the OCI image spec's types, which also read and write
//! Docker's schema 2 manifest and manifest list (same shape, other media types).
//!
//! Maps are `BTreeMap`s so that serializing the same value always yields the same bytes, hence
//! the same digest. A pulled manifest is kept as the exact bytes the registry sent
//! ([`RawManifest`]); re-serializing a parsed value is never used for a digest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::media_type;
use crate::platform::Platform;

/// A content descriptor: what a blob or manifest is, its digest and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    pub media_type: String,
    /// Digest of the referenced content.
    pub digest: Digest,
    /// Size in bytes of the referenced content.
    pub size: u64,
    /// Other places the content may be fetched from (foreign layers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// Arbitrary metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The content itself, base64-encoded, for tiny blobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The platform of a manifest referenced from an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// The artifact type of a referenced artifact manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
}

impl Descriptor {
    /// A descriptor with no optional fields set.
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            urls: Vec::new(),
            annotations: BTreeMap::new(),
            data: None,
            platform: None,
            artifact_type: None,
        }
    }

    /// The descriptor of `bytes` under `media_type` (sha256).
    pub fn of_bytes(media_type: impl Into<String>, bytes: &[u8]) -> Self {
        Descriptor::new(media_type, Digest::sha256_of(bytes), bytes.len() as u64)
    }
}

/// An image manifest: OCI (`application/vnd.oci.image.manifest.v1+json`) or Docker schema 2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    /// Always 2.
    pub schema_version: u32,
    /// The manifest's media type; optional in OCI, required by Docker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The artifact type, for artifacts whose config is the empty descriptor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// The image config blob.
    pub config: Descriptor,
    /// Layers, base first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// The manifest this one refers to (referrers API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    /// Arbitrary metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image index (OCI) or manifest list (Docker): one manifest per platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    /// Always 2.
    pub schema_version: u32,
    /// The index's media type. kiln always writes it: a registry may take an index without one
    /// for a Docker manifest list and refuse it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The artifact type, if the index is an artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// The manifests, usually one per platform.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    /// The manifest this one refers to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    /// Arbitrary metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ImageIndex {
    /// An empty OCI index.
    pub fn new() -> Self {
        ImageIndex {
            schema_version: 2,
            media_type: Some(media_type::OCI_INDEX.to_owned()),
            artifact_type: None,
            manifests: Vec::new(),
            subject: None,
            annotations: BTreeMap::new(),
        }
    }
}

impl Default for ImageIndex {
    fn default() -> Self {
        ImageIndex::new()
    }
}

/// A parsed manifest of either kind.
// Few of these exist at once (one per image resolved): boxing would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    /// A single-image manifest.
    Image(ImageManifest),
    /// An index or manifest list.
    Index(ImageIndex),
}

/// Why manifest bytes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The JSON does not parse as a manifest or index.
    #[error("manifest is not valid JSON for {kind}: {source}")]
    Json {
        /// What it was parsed as.
        kind: &'static str,
        /// The parser's error, with line and column.
        source: serde_json::Error,
    },
    /// The media type is not one kiln reads.
    #[error("unsupported manifest media type {0:?} (kiln reads OCI and Docker schema 2 manifests and indexes)")]
    UnsupportedMediaType(String),
    /// schemaVersion is not 2.
    #[error("unsupported manifest schemaVersion {0} (only 2 is supported; schema 1 images must be converted)")]
    SchemaVersion(u32),
}

/// The exact bytes of a manifest with its media type and digest: what a registry serves and
/// what is hashed. Keep these bytes to push a pulled manifest unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawManifest {
    /// Media type (from the `Content-Type` header or the JSON's `mediaType`).
    pub media_type: String,
    /// The bytes, exactly as pulled or as they will be pushed.
    pub bytes: bytes::Bytes,
    /// sha256 of `bytes`.
    pub digest: Digest,
}

impl RawManifest {
    /// Wraps bytes, computing their digest. An empty or generic `media_type` is replaced by the
    /// JSON's `mediaType` field, or guessed from its shape (`manifests` ⇒ index).
    pub fn new(media_type: &str, bytes: impl Into<bytes::Bytes>) -> Self {
        let bytes = bytes.into();
        let digest = Digest::sha256_of(&bytes);
        let media_type = if media_type::is_index(media_type) || media_type::is_manifest(media_type)
        {
            media_type.to_owned()
        } else {
            sniff_media_type(&bytes).unwrap_or_else(|| media_type.to_owned())
        };
        RawManifest {
            media_type,
            bytes,
            digest,
        }
    }

    /// Serializes an image manifest to its canonical bytes (compact JSON, fields in spec order).
    pub fn from_image(m: &ImageManifest) -> Self {
        let mt = m
            .media_type
            .clone()
            .unwrap_or_else(|| media_type::OCI_MANIFEST.to_owned());
        // Serializing plain structs of strings and numbers cannot fail.
        let bytes = serde_json::to_vec(m).unwrap_or_default();
        RawManifest::new(&mt, bytes)
    }

    /// Serializes an index to its canonical bytes.
    pub fn from_index(m: &ImageIndex) -> Self {
        let mt = m
            .media_type
            .clone()
            .unwrap_or_else(|| media_type::OCI_INDEX.to_owned());
        let bytes = serde_json::to_vec(m).unwrap_or_default();
        RawManifest::new(&mt, bytes)
    }

    /// A descriptor pointing at this manifest.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(
            self.media_type.clone(),
            self.digest.clone(),
            self.bytes.len() as u64,
        )
    }

    /// Parses the bytes according to the media type.
    pub fn parse(&self) -> Result<Manifest, ManifestError> {
        Manifest::parse(&self.media_type, &self.bytes)
    }
}

fn sniff_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        config: Option<serde_json::Value>,
    }
    let p: Probe = serde_json::from_slice(bytes).ok()?;
    if let Some(mt) = p.media_type {
        return Some(mt);
    }
    if p.manifests.is_some() {
        Some(media_type::OCI_INDEX.to_owned())
    } else if p.config.is_some() {
        Some(media_type::OCI_MANIFEST.to_owned())
    } else {
        None
    }
}

impl Manifest {
    /// Parses manifest bytes of the given media type.
    pub fn parse(media_type: &str, bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if media_type::is_index(media_type) {
            let idx: ImageIndex =
                serde_json::from_slice(bytes).map_err(|source| ManifestError::Json {
                    kind: "an image index",
                    source,
                })?;
            if idx.schema_version != 2 {
                return Err(ManifestError::SchemaVersion(idx.schema_version));
            }
            Ok(Manifest::Index(idx))
        } else if media_type::is_manifest(media_type) {
            let m: ImageManifest =
                serde_json::from_slice(bytes).map_err(|source| ManifestError::Json {
                    kind: "an image manifest",
                    source,
                })?;
            if m.schema_version != 2 {
                return Err(ManifestError::SchemaVersion(m.schema_version));
            }
            Ok(Manifest::Image(m))
        } else {
            Err(ManifestError::UnsupportedMediaType(media_type.to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKER: &str = r#"{
   "schemaVersion": 2,
   "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
   "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 7023,
      "digest": "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7"},
   "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 32654,
      "digest": "sha256:e692418e4cbaf90ca69d05a66403747baa33ee08806650b51fab815ad7fc331f"}]
}"#;

    #[test]
    fn docker_schema2_manifest_parses_and_keeps_media_types() {
        let raw = RawManifest::new("", DOCKER.as_bytes().to_vec());
        assert_eq!(raw.media_type, media_type::DOCKER_MANIFEST);
        assert_eq!(raw.digest, Digest::sha256_of(DOCKER.as_bytes()));
        let Manifest::Image(m) = raw.parse().unwrap() else {
            panic!("not an image")
        };
        assert_eq!(m.config.size, 7023);
        assert_eq!(m.layers[0].media_type, media_type::DOCKER_LAYER_GZIP);
    }

    #[test]
    fn index_without_media_type_is_recognised_and_serialized_with_one() {
        let raw = RawManifest::new(
            "application/json",
            br#"{"schemaVersion":2,"manifests":[]}"#.to_vec(),
        );
        assert_eq!(raw.media_type, media_type::OCI_INDEX);
        let idx = ImageIndex::new();
        let out = RawManifest::from_index(&idx);
        assert_eq!(
            std::str::from_utf8(&out.bytes).unwrap(),
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#
        );
    }

    #[test]
    fn serialization_is_deterministic_with_sorted_annotations() {
        let mut d = Descriptor::of_bytes(media_type::OCI_CONFIG, b"{}");
        d.annotations.insert("z".into(), "1".into());
        d.annotations.insert("a".into(), "2".into());
        let json = serde_json::to_string(&d).unwrap();
        assert!(json.find("\"a\"").unwrap() < json.find("\"z\"").unwrap());
        let back: Descriptor = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn schema1_and_unknown_types_are_refused() {
        assert!(matches!(
            Manifest::parse(media_type::OCI_MANIFEST, br#"{"schemaVersion":1,"config":{"mediaType":"x","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0}}"#),
            Err(ManifestError::SchemaVersion(1))
        ));
        assert!(matches!(
            Manifest::parse("text/plain", b"{}"),
            Err(ManifestError::UnsupportedMediaType(_))
        ));
    }
}
