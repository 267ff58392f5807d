//! `type=registry`: the cache as one manifest under a registry ref. An import of a ref that
//! holds an ordinary image reads that image's inline cache instead; an export merges in what
//! the same ref held (within `max-age` / `max-records`) and mounts blobs from an imported
//! repository on the same registry instead of uploading them.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use kiln_oci::Reference;
use kiln_worker::build::SolvedBuild;
use kiln_worker::engine::BlobSource;
use kiln_worker::registry::RepositoryBlobs;

use super::{
    check_keys, flag_error, local_blob, CacheBackend, CacheContext, CacheError, CacheExportSummary,
    Direction, ExportScope, ImportedCache, ImportedCacheRef,
};

/// A cache under a registry ref (`type=registry,ref=REF`).
#[derive(Debug, Clone)]
pub struct RegistryCache {
    /// The ref as given: the cache's name in messages and in merges.
    name: String,
    reference: Reference,
    direction: Direction,
    scope: ExportScope,
    retention: kiln_cache::RetentionPolicy,
    connections: Option<usize>,
    /// `registry.insecure=true` (or `insecure=true`): the registry speaks plain HTTP.
    insecure: bool,
}

impl RegistryCache {
    /// What an export through this backend writes (`mode`, cache mounts).
    pub fn scope(&self) -> ExportScope {
        self.scope
    }

    /// Parses the attributes of a `type=registry` cache flag: `ref` (required), and for an
    /// export `mode`, `cache-mounts*`, `max-age`, `max-records`, `connections`.
    pub fn from_attrs(attrs: &BTreeMap<String, String>, flag: &str) -> Result<Self, CacheError> {
        let direction = Direction::of_flag(flag);
        let allowed: &[&str] = match direction {
            Direction::Import => &["ref"],
            Direction::Export => &["ref", "max-age", "max-records", "connections"],
        };
        check_keys(attrs, "registry", flag, direction, allowed)?;
        let name = attrs
            .get("ref")
            .filter(|r| !r.is_empty())
            .cloned()
            .ok_or_else(|| flag_error(flag, "type=registry", "type=registry needs ref=REF"))?;
        let reference = name
            .parse()
            .map_err(|e| CacheError::Spec(format!("{} ref={name}: {e}", direction.flag())))?;
        Ok(RegistryCache {
            reference,
            direction,
            scope: ExportScope::from_attrs(attrs, flag)?,
            retention: retention_policy(attrs)?,
            connections: attrs
                .get("connections")
                .map(|v| {
                    kiln_oci::parse_connections("--export-cache connections", v)
                        .map_err(CacheError::Spec)
                })
                .transpose()?,
            insecure: ["registry.insecure", "insecure"]
                .iter()
                .any(|k| attrs.get(*k).is_some_and(|v| v == "true")),
            name,
        })
    }

    /// The inline cache of the image at this ref (built with `--export-cache type=inline`):
    /// manifest and config are read, its layers stay in its repository until a step needs
    /// them. An image without one is a warning.
    async fn import_image_cache(
        &self,
        cx: &CacheContext,
    ) -> Result<Option<Arc<ImportedCache>>, CacheError> {
        let name = &self.name;
        let platform = &cx.platform;
        let platform: kiln_oci::Platform = platform.to_string().parse().map_err(|e| {
            CacheError::Spec(format!(
                "--import-cache ref={name}: platform {platform}: {e}"
            ))
        })?;
        match kiln_cache::import_inline(&cx.client, &self.reference, &platform).await? {
            Some(graph) => Ok(Some(cx.imported(graph, self.blobs(cx)))),
            None => {
                cx.warn(&format!(
                    "image {name} carries no inline cache (push it with --export-cache type=inline); building without it"
                ));
                Ok(None)
            }
        }
    }

    fn blobs(&self, cx: &CacheContext) -> Arc<dyn BlobSource> {
        Arc::new(RepositoryBlobs::new(
            cx.client.clone(),
            cx.runtime.clone(),
            self.reference.clone(),
        ))
    }
}

#[async_trait]
impl CacheBackend for RegistryCache {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn insecure_names(&self) -> Vec<String> {
        if self.insecure {
            vec![self.name.clone()]
        } else {
            Vec::new()
        }
    }

    async fn import(&self, cx: &CacheContext) -> Result<Option<Arc<ImportedCache>>, CacheError> {
        match kiln_cache::import_registry(&cx.client, &self.reference).await {
            Ok(Some(graph)) => Ok(Some(cx.imported(graph, self.blobs(cx)))),
            Ok(None) => {
                cx.warn(&format!(
                    "cache {} does not exist yet; building without it",
                    self.name
                ));
                Ok(None)
            }
            // An ordinary image (or index): its config may carry an inline cache.
            Err(kiln_cache::TransferError::Format {
                source: kiln_cache::CacheFormatError::NotACache(_),
                ..
            }) => self.import_image_cache(cx).await,
            Err(e) => Err(e.into()),
        }
    }

    async fn export(
        &self,
        cx: &CacheContext,
        build: &SolvedBuild,
        imported: &[ImportedCacheRef],
    ) -> Result<CacheExportSummary, CacheError> {
        debug_assert_eq!(self.direction, Direction::Export);
        let mut graph = self.scope.records(cx, build).await?;
        let client = match self.connections {
            Some(n) => cx.client.with_concurrency(n),
            None => cx.client.clone(),
        };
        // Every record of this build was used today; merged ones keep their day.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        graph.mark_used(now);
        // Keep what other builds (branches, targets) recorded under the same ref, within the
        // export's max-age / max-records (by default: no more than this build's own count).
        let expired = match imported.iter().find(|c| c.name == self.name) {
            Some(c) => graph.merge_previous(c.cache.graph(), &self.retention, now),
            None => graph.retain_recent(&self.retention, now),
        };
        let mount_from = imported
            .iter()
            .filter_map(|c| c.cache.source().repository())
            .find(|m| m.registry() == self.reference.registry());
        let store = cx.store.clone();
        let blob_file: Box<BlobFile> = Box::new(move |d| local_blob(&store, d));
        // The transfer's future is not `Send` (its blob streams borrow across awaits), so it
        // runs to completion on a blocking thread of the build's runtime.
        let (handle, reference) = (cx.runtime.clone(), self.reference.clone());
        let report = tokio::task::spawn_blocking(move || {
            handle.block_on(kiln_cache::export_registry(
                &client,
                &reference,
                graph,
                &*blob_file,
                mount_from.as_ref(),
            ))
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        let dropped = if expired > 0 {
            format!(" ({expired} old records dropped)")
        } else {
            String::new()
        };
        Ok(CacheExportSummary {
            records: report.records,
            blobs: report.blobs,
            expired,
            description: format!(
                "{} records, {} blobs to {}{dropped}",
                report.records, report.blobs, self.name
            ),
        })
    }
}

/// Where a blob to upload is in the local store (`None`: not there).
type BlobFile = dyn Fn(&kiln_oci::Digest) -> Option<std::path::PathBuf> + Send + Sync;

/// The `max-age=DURATION` and `max-records=N` attributes of a registry `--export-cache`: what
/// an export keeps of the records it merges in from the same ref.
pub(super) fn retention_policy(
    attrs: &BTreeMap<String, String>,
) -> Result<kiln_cache::RetentionPolicy, CacheError> {
    let max_age = attrs
        .get("max-age")
        .map(|v| {
            kiln_cache::parse_duration(v)
                .map_err(|e| CacheError::Spec(format!("--export-cache max-age={v}: {e}")))
        })
        .transpose()?;
    let max_records = attrs
        .get("max-records")
        .map(|v| {
            v.parse::<usize>().map_err(|_| {
                CacheError::Spec(format!(
                    "--export-cache max-records={v}: expected a whole number of records"
                ))
            })
        })
        .transpose()?;
    Ok(kiln_cache::RetentionPolicy {
        max_age,
        max_records,
    })
}
