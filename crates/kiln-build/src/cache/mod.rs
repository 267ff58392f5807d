//! Where a build's cache comes from and goes to: the [`CacheBackend`] trait, one module per
//! backend type (`registry`, `local`, `inline`, `s3`), and [`cache_backend_from_attrs`], the table
//! of backend types — the only place a new type is added.
//!
//! A backend parses its `--export-cache` / `--import-cache` attributes once, when it is made,
//! so that a typo fails before the build starts. Imports run while the Dockerfile is lowered;
//! exports run after the steps, over the records the build used.

mod imported;
mod inline;
mod local;
mod records;
mod registry;
mod s3;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use kiln_oci::RegistryClient;
use kiln_store::Store;
use kiln_worker::build::SolvedBuild;
use kiln_worker::engine::{BlobSource, WorkerError};
use kiln_worker::image::Layer;

use crate::spec::SpecError;

pub use imported::ImportedCache;
pub use inline::InlineCache;
pub use local::LocalCache;
pub use records::{export_cache_mounts, export_graph};
pub use registry::RegistryCache;
pub use s3::{redact_cache_flag_value, S3Cache, SECRET_ATTRIBUTES};

/// A place a build's cache is read from (`--import-cache`) or written to (`--export-cache`).
/// Made once per flag value by [`cache_backend_from_attrs`]; dyn-compatible.
#[async_trait]
pub trait CacheBackend: Send + Sync {
    /// What the cache is called in warnings and reports: its ref or its directory.
    fn name(&self) -> String;

    /// Image names whose registry this cache reaches over plain HTTP
    /// (`registry.insecure=true`); the registry client is set up with them before the build.
    fn insecure_names(&self) -> Vec<String> {
        Vec::new()
    }

    /// Reads the cache. `Ok(None)`: there is nothing there yet (a first run), already
    /// reported as a warning through `cx`.
    async fn import(&self, cx: &CacheContext) -> Result<Option<Arc<ImportedCache>>, CacheError>;

    /// Writes the records of `build` (and, for a backend that merges, what `imported` holds
    /// under the same name) and says what was written.
    async fn export(
        &self,
        cx: &CacheContext,
        build: &SolvedBuild,
        imported: &[ImportedCacheRef],
    ) -> Result<CacheExportSummary, CacheError>;

    /// Image-config fields this cache adds to an image of `layers`, asked while the image is
    /// made (before it is stored or pushed). Only a cache carried in the image overrides it.
    async fn image_config_fields(
        &self,
        _cx: &CacheContext,
        _build: &SolvedBuild,
        _layers: &[Layer],
    ) -> Result<Option<BTreeMap<String, serde_json::Value>>, CacheError> {
        Ok(None)
    }
}

/// One `--import-cache`: its backend and whether a failure only warns (the default).
pub struct CacheImport {
    /// Where the cache is read from.
    pub backend: Box<dyn CacheBackend>,
    /// `ignore-error`: a failed import is a warning and the build runs without it.
    pub ignore_error: bool,
}

impl CacheImport {
    /// Parses `--import-cache type=KIND,...` attributes (`flag` as the user spelled it).
    pub fn from_attrs(
        kind: &str,
        attrs: &BTreeMap<String, String>,
        flag: &str,
    ) -> Result<Self, CacheError> {
        Ok(CacheImport {
            ignore_error: bool_attr(attrs, "ignore-error", flag)?.unwrap_or(true),
            backend: cache_backend_from_attrs(kind, attrs, flag)?,
        })
    }
}

/// One `--export-cache`: its backend and whether a failure only warns.
pub struct CacheExport {
    /// Where the cache is written.
    pub backend: Box<dyn CacheBackend>,
    /// `ignore-error=true`: a failed export is a warning, not a failed build.
    pub ignore_error: bool,
}

impl CacheExport {
    /// Parses `--export-cache type=KIND,...` attributes (`flag` as the user spelled it).
    pub fn from_attrs(
        kind: &str,
        attrs: &BTreeMap<String, String>,
        flag: &str,
    ) -> Result<Self, CacheError> {
        Ok(CacheExport {
            ignore_error: bool_attr(attrs, "ignore-error", flag)?.unwrap_or(false),
            backend: cache_backend_from_attrs(kind, attrs, flag)?,
        })
    }
}

/// The backend for a `type=KIND` cache flag value with attributes `attrs` (`type` included
/// or not). This table is the only place a new backend type is added.
pub fn cache_backend_from_attrs(
    kind: &str,
    attrs: &BTreeMap<String, String>,
    flag: &str,
) -> Result<Box<dyn CacheBackend>, CacheError> {
    Ok(match kind {
        "registry" => Box::new(RegistryCache::from_attrs(attrs, flag)?),
        "local" => Box::new(LocalCache::from_attrs(attrs, flag)?),
        "inline" => Box::new(InlineCache::from_attrs(attrs, flag)?),
        "s3" => Box::new(S3Cache::from_attrs(attrs, flag)?),
        _ => {
            return Err(flag_error(
                flag,
                &format!("type={kind}"),
                format!("unsupported cache type `{kind}`; expected registry, local, inline or s3"),
            ))
        }
    })
}

/// What a cache backend needs from the build it serves.
#[derive(Clone)]
pub struct CacheContext {
    /// The build's registry client (its credentials, limits and cancellation).
    pub client: RegistryClient,
    /// The state dir's store: blobs exported from, imported blobs fetched into.
    pub store: Arc<Store>,
    /// The runtime blob fetches made during the solve block on.
    pub runtime: tokio::runtime::Handle,
    /// The platform built (the first target platform): picks the image of an index whose
    /// inline cache is imported.
    pub platform: kiln_graph::Platform,
    /// Whether the build makes an image (an image, registry, oci or docker output).
    pub makes_image: bool,
    /// Where warnings go (without the `kiln: warning: ` prefix).
    pub warn: Arc<dyn Fn(&str) + Send + Sync>,
}

impl CacheContext {
    fn warn(&self, message: &str) {
        (self.warn)(message)
    }

    /// `graph` as an imported cache whose blobs `source` serves; what the import dropped as
    /// unusable is reported as warnings, once.
    fn imported(
        &self,
        graph: kiln_cache::CacheGraph,
        source: Arc<dyn BlobSource>,
    ) -> Arc<ImportedCache> {
        for w in graph.import_warnings() {
            self.warn(&format!("cache {}: {w}", source.name()));
        }
        Arc::new(ImportedCache::new(graph, source))
    }
}

/// A cache imported earlier in this build, by the name of the backend that read it.
#[derive(Clone)]
pub struct ImportedCacheRef {
    /// [`CacheBackend::name`] of the import.
    pub name: String,
    /// What it read.
    pub cache: Arc<ImportedCache>,
}

/// What one cache export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheExportSummary {
    /// Records written.
    pub records: usize,
    /// Blobs the destination holds for them.
    pub blobs: usize,
    /// Old records left out by the retention policy.
    pub expired: usize,
    /// The line a user reads, e.g. `3 records, 3 blobs to reg/app:cache`.
    pub description: String,
}

impl std::fmt::Display for CacheExportSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

/// Why a cache could not be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A bad attribute of a cache flag; the text names the flag, key and value.
    #[error("{0}")]
    Spec(String),
    /// A cache flag value no backend accepts (unknown type or key, a bad mode, boolean or
    /// compression, a missing ref/dest/src): names the flag, the value and the reason.
    #[error(transparent)]
    Flag(#[from] SpecError),
    /// Moving the cache to or from its registry or directory failed.
    #[error(transparent)]
    Transfer(#[from] kiln_cache::TransferError),
    /// Reading an image's inline cache failed.
    #[error(transparent)]
    Inline(#[from] kiln_cache::InlineCacheError),
    /// The build's records or blobs could not be read.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// A backend defined outside this crate failed; `name` is its [`CacheBackend::name`].
    #[error("cache {name}: {source}")]
    Backend {
        /// The cache that failed.
        name: String,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Computing the records an inline cache holds failed.
    #[error("computing the inline cache")]
    InlineRecords(#[source] Box<CacheError>),
}

/// Whether a flag reads a cache (`--import-cache`, `--cache-from`) or writes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Import,
    Export,
}

impl Direction {
    pub(crate) fn of_flag(flag: &str) -> Self {
        match flag {
            "--import-cache" | "--cache-from" => Direction::Import,
            _ => Direction::Export,
        }
    }

    /// The flag name today's messages use for this direction.
    pub(crate) fn flag(self) -> &'static str {
        match self {
            Direction::Import => "--import-cache",
            Direction::Export => "--export-cache",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Direction::Import => "import",
            Direction::Export => "export",
        }
    }
}

/// A bad cache flag value: `part` is the offending part of the value (the caller that holds
/// the whole value puts it in its place), `reason` what is wrong and what is accepted.
pub(crate) fn flag_error(flag: &str, part: &str, reason: impl Into<String>) -> CacheError {
    CacheError::Flag(SpecError::new(flag, part, reason))
}

/// `key=true|false` of a cache flag, if given.
pub(crate) fn bool_attr(
    attrs: &BTreeMap<String, String>,
    key: &str,
    flag: &str,
) -> Result<Option<bool>, CacheError> {
    attrs
        .get(key)
        .map(|v| match v.as_str() {
            // As every other boolean attribute of kiln's flags: a bare key, `1`, `0`.
            "" | "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(flag_error(
                flag,
                &format!("{key}={v}"),
                format!("{key}=`{v}`: expected true or false"),
            )),
        })
        .transpose()
}

/// Refuses a key no backend of this type reads (`allowed` besides the common ones).
pub(crate) fn check_keys(
    attrs: &BTreeMap<String, String>,
    kind: &str,
    flag: &str,
    direction: Direction,
    allowed: &[&str],
) -> Result<(), CacheError> {
    const COMMON: &[&str] = &["type", "ignore-error", "registry.insecure", "insecure"];
    const EXPORT: &[&str] = &[
        "mode",
        "compression",
        "compression-level",
        "force-compression",
        "oci-mediatypes",
        "image-manifest",
        "cache-mounts",
        "cache-mounts-max-size",
    ];
    for k in attrs.keys() {
        let known = COMMON.contains(&k.as_str())
            || allowed.contains(&k.as_str())
            || (direction == Direction::Export && EXPORT.contains(&k.as_str()));
        if !known {
            return Err(flag_error(
                flag,
                k,
                format!("unknown key `{k}` for a {kind} cache {}", direction.noun()),
            ));
        }
    }
    for k in ["registry.insecure", "insecure", "force-compression"] {
        bool_attr(attrs, k, flag)?;
    }
    Ok(())
}

/// What every exporting backend reads: which records, and whether cache mounts go along.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportScope {
    /// `mode=max`: every step of the build; `min` (default): the image's own layers.
    pub max: bool,
    /// `cache-mounts=true`: `RUN --mount=type=cache` contents too.
    pub cache_mounts: bool,
    /// `cache-mounts-max-size=BYTES` (default 1 GiB): a larger mount is left out.
    pub cache_mounts_max_size: u64,
    /// A `compression=`/`compression-level=`/`force-compression=` attribute the export does
    /// not apply (its layers are the build's own gzip blobs), said as a warning at export.
    pub unapplied_compression: Option<&'static str>,
}

impl ExportScope {
    pub(crate) fn from_attrs(
        attrs: &BTreeMap<String, String>,
        flag: &str,
    ) -> Result<Self, CacheError> {
        let max = match attrs.get("mode").map(String::as_str) {
            None | Some("min") => false,
            Some("max") => true,
            Some(v) => {
                return Err(flag_error(
                    flag,
                    &format!("mode={v}"),
                    format!("mode=`{v}`: expected min or max"),
                ))
            }
        };
        if let Some(v) = attrs.get("compression") {
            if !matches!(v.as_str(), "gzip" | "zstd" | "uncompressed") {
                return Err(flag_error(
                    flag,
                    &format!("compression={v}"),
                    format!("compression `{v}`: expected gzip, zstd or uncompressed"),
                ));
            }
        }
        if let Some(v) = attrs.get("compression-level") {
            if v.parse::<u32>().ok().filter(|l| *l <= 22).is_none() {
                return Err(flag_error(
                    flag,
                    &format!("compression-level={v}"),
                    format!("compression-level `{v}`: expected 0..=22"),
                ));
            }
        }
        let cache_mounts_max_size = match attrs.get("cache-mounts-max-size") {
            Some(v) => v.parse::<u64>().map_err(|_| {
                CacheError::Spec(format!(
                    "--export-cache cache-mounts-max-size={v}: expected a number of bytes"
                ))
            })?,
            None => 1 << 30,
        };
        for k in ["oci-mediatypes", "image-manifest"] {
            bool_attr(attrs, k, flag)?;
        }
        // Cache layers are the blobs the build made (gzip, in parallel with the steps); an
        // export never recompresses them, so any other choice is said, not silently dropped.
        let unapplied_compression = match attrs.get("compression").map(String::as_str) {
            Some("zstd") => Some("compression=zstd"),
            Some("uncompressed") => Some("compression=uncompressed"),
            _ if attrs.contains_key("compression-level") => Some("compression-level"),
            _ if bool_attr(attrs, "force-compression", flag)? == Some(true) => {
                Some("force-compression=true")
            }
            _ => None,
        };
        Ok(ExportScope {
            max,
            cache_mounts: bool_attr(attrs, "cache-mounts", flag)?.unwrap_or(false),
            cache_mounts_max_size,
            unapplied_compression,
        })
    }

    /// The records (and mount contents) of `build` this export writes.
    pub(crate) async fn records(
        &self,
        cx: &CacheContext,
        build: &SolvedBuild,
    ) -> Result<kiln_cache::CacheGraph, CacheError> {
        if let Some(attr) = self.unapplied_compression {
            cx.warn(&format!(
                "--export-cache {attr} is not applied: cache layers are exported as the \
                 build's own gzip blobs"
            ));
        }
        let mut graph = export_graph(build, self.max).await?;
        if self.cache_mounts {
            export_cache_mounts(build, &mut graph, self.cache_mounts_max_size, &*cx.warn)?;
        }
        Ok(graph)
    }
}

/// The path of a blob in the local content store, if it is there.
pub(crate) fn local_blob(store: &Store, digest: &kiln_oci::Digest) -> Option<std::path::PathBuf> {
    let p = store.content().blob_path(digest);
    p.is_file().then_some(p)
}
