//! `type=inline`: the cache carried in the image's own config (the `mode=min` records of its
//! layers). It contributes image-config fields while the image is made; its export only
//! reports them. Imports read it through `type=registry` on the image's ref.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use kiln_worker::build::SolvedBuild;
use kiln_worker::image::Layer;

use super::{
    check_keys, export_graph, flag_error, CacheBackend, CacheContext, CacheError,
    CacheExportSummary, Direction, ExportScope, ImportedCache, ImportedCacheRef,
};

/// The cache inline in the exported image's config (`--export-cache type=inline`, or the
/// `BUILDKIT_INLINE_CACHE=1` build arg).
#[derive(Debug, Clone)]
pub struct InlineCache {
    scope: ExportScope,
}

impl Default for InlineCache {
    /// An inline cache with no attributes, as `BUILDKIT_INLINE_CACHE=1` asks for.
    fn default() -> Self {
        InlineCache {
            scope: ExportScope {
                max: false,
                cache_mounts: false,
                cache_mounts_max_size: 1 << 30,
                unapplied_compression: None,
            },
        }
    }
}

impl InlineCache {
    /// What an export through this backend writes (`mode`, cache mounts).
    pub fn scope(&self) -> ExportScope {
        self.scope
    }

    /// Parses the attributes of `--export-cache type=inline`. An import of this type is
    /// refused: the image's ref is imported as `type=registry`.
    pub fn from_attrs(attrs: &BTreeMap<String, String>, flag: &str) -> Result<Self, CacheError> {
        let direction = Direction::of_flag(flag);
        if direction == Direction::Import {
            return Err(flag_error(
                flag,
                "type=inline",
                "type=inline is export-only; import the image ref as type=registry",
            ));
        }
        check_keys(attrs, "inline", flag, direction, &[])?;
        Ok(InlineCache {
            scope: ExportScope::from_attrs(attrs, flag)?,
        })
    }

    /// The inline cache of an image of `layers`: the `mode=min` records (the steps whose
    /// results are the image's layers) that name only those layers.
    async fn records(
        build: &SolvedBuild,
        layers: &[Layer],
    ) -> Result<kiln_cache::InlineCache, CacheError> {
        let graph = export_graph(build, false)
            .await
            .map_err(|e| CacheError::InlineRecords(Box::new(e.into())))?;
        Ok(kiln_cache::InlineCache::for_image(&graph, layers))
    }
}

#[async_trait]
impl CacheBackend for InlineCache {
    fn name(&self) -> String {
        "inline".to_owned()
    }

    /// Nothing to read: an inline cache is imported through its image's ref.
    async fn import(&self, _cx: &CacheContext) -> Result<Option<Arc<ImportedCache>>, CacheError> {
        Ok(None)
    }

    /// The records went into the image config when the image was made (see
    /// [`CacheBackend::image_config_fields`]); this only reports them.
    async fn export(
        &self,
        cx: &CacheContext,
        build: &SolvedBuild,
        _imported: &[ImportedCacheRef],
    ) -> Result<CacheExportSummary, CacheError> {
        if !cx.makes_image {
            cx.warn("--export-cache type=inline needs an image output (--output type=image,...); no cache exported");
            return Ok(CacheExportSummary {
                records: 0,
                blobs: 0,
                expired: 0,
                description: "nothing exported inline".to_owned(),
            });
        }
        if self.scope.max {
            cx.warn("an inline cache holds mode=min records only (the image's own layers); use type=registry for mode=max");
        }
        if self.scope.cache_mounts {
            cx.warn(
                "an inline cache does not carry cache mounts; use type=registry,cache-mounts=true",
            );
        }
        let layers = build
            .rootfs
            .as_ref()
            .map(|r| r.layers.clone())
            .unwrap_or_default();
        let inline = Self::records(build, &layers).await?;
        Ok(CacheExportSummary {
            records: inline.len(),
            blobs: 0,
            expired: 0,
            description: format!(
                "{} records inline in the image config ({})",
                inline.len(),
                kiln_cache::INLINE_CONFIG_KEY
            ),
        })
    }

    async fn image_config_fields(
        &self,
        _cx: &CacheContext,
        build: &SolvedBuild,
        layers: &[Layer],
    ) -> Result<Option<BTreeMap<String, serde_json::Value>>, CacheError> {
        Ok(Some(Self::records(build, layers).await?.config_fields()))
    }
}
