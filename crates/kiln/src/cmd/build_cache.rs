//! The build cache in registries and directories: reading every `--import-cache` before a
//! build and writing every `--export-cache` after it.

use std::sync::Arc;

use kiln_graph::options::{CacheKind, CacheMode};
use kiln_graph::BuildOptions;
use kiln_oci::RegistryClient;
use kiln_store::Store;
use kiln_worker::build::SolvedBuild;
use kiln_worker::engine::BlobSource;
use kiln_worker::registry::RepositoryBlobs;
use kiln_worker::remote::{ImportedCache, LayoutBlobs};

/// Reads every `--import-cache`, all at once. A missing ref is a warning (a first run); an
/// unreadable one is an error unless `ignore-error` (the default for imports).
pub(crate) async fn import_caches(
    opts: &BuildOptions,
    client: &RegistryClient,
    handle: &tokio::runtime::Handle,
) -> anyhow::Result<Vec<(String, Arc<ImportedCache>)>> {
    let jobs = opts.cache_imports.iter().map(|spec| async move {
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
                        eprintln!(
                            "kiln: warning: cache {name} does not exist yet; building without it"
                        );
                        Ok(None)
                    }
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
                        eprintln!(
                            "kiln: warning: no cache in {}; building without it",
                            dir.display()
                        );
                        Ok(None)
                    }
                }
            }
            CacheKind::Inline => Ok(None),
        };
        match loaded {
            Err(e) if spec.ignore_error => {
                eprintln!("kiln: warning: cache import failed, building without it: {e:#}");
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

/// Writes every `--export-cache`. With `ignore-error=true` a failure is a warning.
pub(crate) async fn export_caches(
    opts: &BuildOptions,
    solved: &SolvedBuild,
    store: &Store,
    client: &RegistryClient,
    imported: &[(String, Arc<ImportedCache>)],
) -> anyhow::Result<()> {
    for spec in &opts.cache_exports {
        let started = std::time::Instant::now();
        let result: anyhow::Result<String> = async {
            let max = spec.mode == CacheMode::Max;
            let mut graph = kiln_worker::remote::export_graph(solved, max).await?;
            if spec.cache_mounts {
                let max_bytes = match spec.attrs.get("cache-mounts-max-size") {
                    Some(v) => v.parse::<u64>().map_err(|_| {
                        anyhow::anyhow!(
                            "--export-cache cache-mounts-max-size={v}: expected a number of bytes"
                        )
                    })?,
                    None => 1 << 30,
                };
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
                    // Keep what other builds (branches, targets) recorded under the same ref.
                    if let Some((_, c)) = imported.iter().find(|(n, _)| *n == name) {
                        graph.merge_missing(c.graph());
                    }
                    let mount_from = imported
                        .iter()
                        .filter_map(|(_, c)| c.source().repository())
                        .find(|m| m.registry() == r.registry());
                    let report = kiln_cache::export_registry(
                        client,
                        &r,
                        graph,
                        &blob_file,
                        mount_from.as_ref(),
                    )
                    .await?;
                    Ok(format!(
                        "{} records, {} blobs to {name}",
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
                CacheKind::Inline => {
                    Ok("inline cache is not supported yet; nothing exported".to_owned())
                }
            }
        }
        .await;
        match result {
            Ok(what) => eprintln!(
                "cache exported in {:.1}s: {what}",
                started.elapsed().as_secs_f64()
            ),
            Err(e) if spec.ignore_error => {
                eprintln!("kiln: warning: cache export failed (ignore-error=true): {e:#}")
            }
            Err(e) => return Err(e.context("exporting the build cache")),
        }
    }
    Ok(())
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
