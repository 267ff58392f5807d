//! The build cache in registries and directories: reading every `--import-cache` before a
//! build and writing every `--export-cache` after it. The session calls only
//! [`import_caches`], [`inline_cache_fields`], [`export_caches`], [`check_cache_exports`] and
//! [`mount_seeds`]; cache backends behind one trait replace this module.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use kiln_graph::options::{CacheKind, CacheMode, OutputKind};
use kiln_oci::RegistryClient;
use kiln_store::Store;
use kiln_worker::build::SolvedBuild;
use kiln_worker::engine::BlobSource;
use kiln_worker::registry::RepositoryBlobs;
use kiln_worker::remote::{ImportedCache, LayoutBlobs};

use crate::events::{BuildEvent, EventSink};
use crate::request::BuildRequest;

/// Reads every `--import-cache`, all at once. A missing ref is a warning (a first run); an
/// unreadable one is an error unless `ignore-error` (the default for imports).
pub(crate) async fn import_caches(
    req: &BuildRequest,
    sink: &dyn EventSink,
    client: &RegistryClient,
    handle: &tokio::runtime::Handle,
) -> anyhow::Result<Vec<(String, Arc<ImportedCache>)>> {
    let jobs = req.cache_imports.iter().map(|spec| async move {
        let loaded: anyhow::Result<Option<(String, Arc<ImportedCache>)>> = match spec.kind {
            CacheKind::Registry => {
                let name = spec
                    .reference
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("--import-cache type=registry needs ref=REF"))?;
                let r: kiln_oci::Reference = name
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--import-cache ref={name}: {e}"))?;
                match kiln_cache::import_registry(client, &r).await {
                    Ok(Some(graph)) => {
                        let source: Arc<dyn BlobSource> =
                            Arc::new(RepositoryBlobs::new(client.clone(), handle.clone(), r));
                        Ok(Some((name, Arc::new(ImportedCache::new(graph, source)))))
                    }
                    Ok(None) => {
                        sink.event(BuildEvent::Warning(format!(
                            "cache {name} does not exist yet; building without it"
                        )));
                        Ok(None)
                    }
                    // An ordinary image (or index): its config may carry an inline cache.
                    Err(kiln_cache::TransferError::Format {
                        source: kiln_cache::CacheFormatError::NotACache(_),
                        ..
                    }) => import_image_cache(req, sink, client, handle, name, r).await,
                    Err(e) => Err(e.into()),
                }
            }
            CacheKind::Local => {
                let dir = spec
                    .src
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("--import-cache type=local needs src=DIR"))?;
                let tag = spec
                    .attrs
                    .get("tag")
                    .cloned()
                    .unwrap_or_else(|| "latest".into());
                match kiln_cache::import_local(&dir, &tag)? {
                    Some((graph, _)) => {
                        let source: Arc<dyn BlobSource> = Arc::new(LayoutBlobs::new(dir.clone()));
                        let name = dir.display().to_string();
                        Ok(Some((name, Arc::new(ImportedCache::new(graph, source)))))
                    }
                    None => {
                        sink.event(BuildEvent::Warning(format!(
                            "no cache in {}; building without it",
                            dir.display()
                        )));
                        Ok(None)
                    }
                }
            }
            CacheKind::Inline => Ok(None),
        };
        match loaded {
            Err(e) if spec.ignore_error => {
                sink.event(BuildEvent::Warning(format!(
                    "cache import failed, building without it: {e:#}"
                )));
                Ok(None)
            }
            other => other,
        }
    });
    let mut out = Vec::new();
    for r in futures::future::join_all(jobs).await {
        if let Some(c) = r? {
            out.push(c);
        }
    }
    Ok(out)
}

/// The inline cache of the image at `r` (built with `--export-cache type=inline`): manifest
/// and config are read, its layers stay in its repository until a step needs them. An image
/// without one is a warning.
async fn import_image_cache(
    req: &BuildRequest,
    sink: &dyn EventSink,
    client: &RegistryClient,
    handle: &tokio::runtime::Handle,
    name: String,
    r: kiln_oci::Reference,
) -> anyhow::Result<Option<(String, Arc<ImportedCache>)>> {
    let platform = req
        .options
        .platforms
        .first()
        .cloned()
        .unwrap_or_else(kiln_graph::Platform::host);
    let platform: kiln_oci::Platform = platform
        .to_string()
        .parse()
        .map_err(|e| anyhow::anyhow!("--import-cache ref={name}: platform {platform}: {e}"))?;
    match kiln_cache::import_inline(client, &r, &platform).await? {
        Some(graph) => {
            let source: Arc<dyn BlobSource> =
                Arc::new(RepositoryBlobs::new(client.clone(), handle.clone(), r));
            Ok(Some((name, Arc::new(ImportedCache::new(graph, source)))))
        }
        None => {
            sink.event(BuildEvent::Warning(format!("image {name} carries no inline cache (push it with --export-cache type=inline); building without it"
            )));
            Ok(None)
        }
    }
}

/// Whether the build asks for an inline cache: `--export-cache type=inline`, or BuildKit's
/// `BUILDKIT_INLINE_CACHE=1` build arg.
fn wants_inline_cache(req: &BuildRequest) -> bool {
    req.cache_exports
        .iter()
        .any(|s| s.kind == CacheKind::Inline)
        || req
            .options
            .build_args
            .get("BUILDKIT_INLINE_CACHE")
            .is_some_and(|v| v == "1" || v == "true")
}

/// The inline cache of an image of `layers`: the `mode=min` records (the steps whose results
/// are the image's layers) that name only those layers.
async fn inline_cache(
    solved: &SolvedBuild,
    layers: &[kiln_worker::image::Layer],
) -> anyhow::Result<kiln_cache::InlineCache> {
    let graph = kiln_worker::remote::export_graph(solved, false)
        .await
        .context("computing the inline cache")?;
    Ok(kiln_cache::InlineCache::for_image(&graph, layers))
}

/// The image-config fields that carry the inline cache for an image of `layers`, when the
/// build asks for one (empty otherwise). Called before the image is stored or pushed.
pub(crate) fn inline_cache_fields(
    req: &BuildRequest,
    sink: &dyn EventSink,
    solved: &SolvedBuild,
    layers: &[kiln_worker::image::Layer],
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
    if !wants_inline_cache(req) {
        return Ok(BTreeMap::new());
    }
    let ignore_error = req
        .cache_exports
        .iter()
        .any(|s| s.kind == CacheKind::Inline && s.ignore_error);
    match runtime.block_on(inline_cache(solved, layers)) {
        Ok(inline) => Ok(inline.config_fields()),
        Err(e) if ignore_error => {
            sink.event(BuildEvent::Warning(format!(
                "cache export failed (ignore-error=true): {e:#}"
            )));
            Ok(BTreeMap::new())
        }
        Err(e) => Err(e),
    }
}

/// What `--export-cache type=inline` did: the records went into the image config when the
/// image was made (see [`inline_cache_fields`]); this only reports them.
async fn report_inline(
    req: &BuildRequest,
    sink: &dyn EventSink,
    solved: &SolvedBuild,
    spec: &kiln_graph::options::CacheExportSpec,
) -> anyhow::Result<String> {
    let image_output = req.outputs.iter().any(|o| {
        matches!(
            o.kind,
            OutputKind::Image | OutputKind::Registry | OutputKind::Oci | OutputKind::Docker
        )
    });
    if !image_output {
        sink.event(BuildEvent::Warning(
            "--export-cache type=inline needs an image output (--output type=image,...); no cache exported".to_owned(),
        ));
        return Ok("nothing exported inline".to_owned());
    }
    if spec.mode == CacheMode::Max {
        sink.event(BuildEvent::Warning(
            "an inline cache holds mode=min records only (the image's own layers); use type=registry for mode=max".to_owned(),
        ));
    }
    if spec.cache_mounts {
        sink.event(BuildEvent::Warning(
            "an inline cache does not carry cache mounts; use type=registry,cache-mounts=true"
                .to_owned(),
        ));
    }
    let layers = solved
        .rootfs
        .as_ref()
        .map(|r| r.layers.clone())
        .unwrap_or_default();
    let inline = inline_cache(solved, &layers).await?;
    Ok(format!(
        "{} records inline in the image config ({})",
        inline.len(),
        kiln_cache::INLINE_CONFIG_KEY
    ))
}

/// Writes every `--export-cache`. With `ignore-error=true` a failure is a warning.
pub(crate) async fn export_caches(
    req: &BuildRequest,
    sink: &dyn EventSink,
    solved: &SolvedBuild,
    store: &Store,
    client: &RegistryClient,
    imported: &[(String, Arc<ImportedCache>)],
) -> anyhow::Result<()> {
    for spec in &req.cache_exports {
        let started = std::time::Instant::now();
        let result: anyhow::Result<String> = async {
            if spec.kind == CacheKind::Inline {
                return report_inline(req, sink, solved, spec).await;
            }
            let max = spec.mode == CacheMode::Max;
            let mut graph = kiln_worker::remote::export_graph(solved, max).await?;
            if spec.cache_mounts {
                let max_bytes = cache_mounts_max_size(&spec.attrs)?;
                kiln_worker::remote::export_cache_mounts(solved, &mut graph, max_bytes)?;
            }
            let blob_file = |d: &kiln_oci::Digest| {
                let p = store.content().blob_path(d);
                p.is_file().then_some(p)
            };
            match spec.kind {
                CacheKind::Registry => {
                    let name = spec.reference.clone().ok_or_else(|| {
                        anyhow::anyhow!("--export-cache type=registry needs ref=REF")
                    })?;
                    let r: kiln_oci::Reference = name
                        .parse()
                        .map_err(|e| anyhow::anyhow!("--export-cache ref={name}: {e}"))?;
                    let policy = retention_policy(&spec.attrs)?;
                    let client = match connections(&spec.attrs)? {
                        Some(n) => client.with_concurrency(n),
                        None => client.clone(),
                    };
                    // Every record of this build was used today; merged ones keep their day.
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    graph.mark_used(now);
                    // Keep what other builds (branches, targets) recorded under the same ref,
                    // within the export's max-age / max-records.
                    if let Some((_, c)) = imported.iter().find(|(n, _)| *n == name) {
                        graph.merge_missing(c.graph());
                    }
                    let expired = graph.retain_recent(&policy, now);
                    let mount_from = imported
                        .iter()
                        .filter_map(|(_, c)| c.source().repository())
                        .find(|m| m.registry() == r.registry());
                    let report = kiln_cache::export_registry(
                        &client,
                        &r,
                        graph,
                        &blob_file,
                        mount_from.as_ref(),
                    )
                    .await?;
                    let expired = if expired > 0 {
                        format!(" ({expired} old records dropped)")
                    } else {
                        String::new()
                    };
                    Ok(format!(
                        "{} records, {} blobs to {name}{expired}",
                        report.records, report.blobs
                    ))
                }
                CacheKind::Local => {
                    let dir = spec.dest.clone().ok_or_else(|| {
                        anyhow::anyhow!("--export-cache type=local needs dest=DIR")
                    })?;
                    let tag = spec
                        .attrs
                        .get("tag")
                        .cloned()
                        .unwrap_or_else(|| "latest".into());
                    let report = kiln_cache::export_local(&dir, &tag, &graph, &blob_file)?;
                    Ok(format!(
                        "{} records, {} blobs to {}",
                        report.records,
                        report.blobs,
                        dir.display()
                    ))
                }
                CacheKind::Inline => report_inline(req, sink, solved, spec).await,
            }
        }
        .await;
        match result {
            Ok(summary) => sink.event(BuildEvent::CacheExported {
                summary,
                elapsed: started.elapsed(),
            }),
            Err(e) if spec.ignore_error => sink.event(BuildEvent::Warning(format!(
                "cache export failed (ignore-error=true): {e:#}"
            ))),
            Err(e) => return Err(e.context("exporting the build cache")),
        }
    }
    Ok(())
}

/// Checks the attributes of every `--export-cache` before the build runs, so a typo fails
/// at once instead of after the steps.
pub(crate) fn check_cache_exports(req: &BuildRequest) -> anyhow::Result<()> {
    for spec in &req.cache_exports {
        retention_policy(&spec.attrs)?;
        connections(&spec.attrs)?;
        cache_mounts_max_size(&spec.attrs)?;
    }
    Ok(())
}

/// `connections=N` of an `--export-cache`.
fn connections(
    attrs: &std::collections::BTreeMap<String, String>,
) -> anyhow::Result<Option<usize>> {
    attrs
        .get("connections")
        .map(|v| {
            kiln_oci::parse_connections("--export-cache connections", v).map_err(anyhow::Error::msg)
        })
        .transpose()
}

/// `cache-mounts-max-size=BYTES` of an `--export-cache` (default 1 GiB).
fn cache_mounts_max_size(
    attrs: &std::collections::BTreeMap<String, String>,
) -> anyhow::Result<u64> {
    match attrs.get("cache-mounts-max-size") {
        Some(v) => v.parse::<u64>().map_err(|_| {
            anyhow::anyhow!("--export-cache cache-mounts-max-size={v}: expected a number of bytes")
        }),
        None => Ok(1 << 30),
    }
}

/// The `max-age=DURATION` and `max-records=N` attributes of a registry `--export-cache`: what
/// an export keeps of the records it merges in from the same ref.
fn retention_policy(
    attrs: &std::collections::BTreeMap<String, String>,
) -> anyhow::Result<kiln_cache::RetentionPolicy> {
    let max_age = attrs
        .get("max-age")
        .map(|v| {
            kiln_cache::parse_duration(v)
                .map_err(|e| anyhow::anyhow!("--export-cache max-age={v}: {e}"))
        })
        .transpose()?;
    let max_records = attrs
        .get("max-records")
        .map(|v| {
            v.parse::<usize>().map_err(|_| {
                anyhow::anyhow!(
                    "--export-cache max-records={v}: expected a whole number of records"
                )
            })
        })
        .transpose()?;
    Ok(kiln_cache::RetentionPolicy {
        max_age,
        max_records,
    })
}

/// Cache-mount contents carried by imported caches, by id (the first import wins).
pub(crate) fn mount_seeds(
    imported: &[(String, Arc<ImportedCache>)],
) -> std::collections::BTreeMap<String, (kiln_worker::image::Layer, Arc<dyn BlobSource>)> {
    let mut seeds = std::collections::BTreeMap::new();
    for (_, c) in imported {
        for (id, layer) in c.graph().mounts() {
            seeds
                .entry(id.to_owned())
                .or_insert_with(|| (layer.clone(), c.source().clone()));
        }
    }
    seeds
}
