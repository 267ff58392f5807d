//! The build cache flags of `kiln build`: every `--import-cache` and `--export-cache` made into
//! a [`kiln_build::cache::CacheBackend`] before the build starts, read before the steps run
//! and written after them. What each backend does is in `kiln_build::cache`.

use std::collections::BTreeMap;
use std::sync::Arc;

use kiln_build::cache::CacheBackend;
use kiln_build::cache::{
    CacheContext, CacheError, CacheExport, CacheImport, ImportedCacheRef, InlineCache,
};
use kiln_graph::options::CacheKind;
use kiln_graph::BuildOptions;
use kiln_oci::RegistryClient;
use kiln_store::Store;
use kiln_worker::build::SolvedBuild;
use kiln_worker::engine::BlobSource;

/// The caches a build reads and writes, each parsed once from its flag.
pub(crate) struct Caches {
    /// Every `--import-cache` that could be made.
    pub imports: Vec<CacheImport>,
    /// Every `--export-cache`.
    pub exports: Vec<CacheExport>,
    /// `BUILDKIT_INLINE_CACHE=1`: an inline cache without `--export-cache type=inline`.
    inline_build_arg: bool,
}

fn kind_name(kind: CacheKind) -> &'static str {
    match kind {
        CacheKind::Registry => "registry",
        CacheKind::Local => "local",
        CacheKind::Inline => "inline",
    }
}

impl Caches {
    /// Makes the backends of every cache flag, so that a typo in an export's attributes fails
    /// at once instead of after the steps. An import that cannot be made is left out with a
    /// warning unless `ignore-error=false`.
    pub(crate) fn from_options(opts: &BuildOptions) -> anyhow::Result<Self> {
        let mut imports = Vec::new();
        for spec in &opts.cache_imports {
            match CacheImport::from_attrs(kind_name(spec.kind), &spec.attrs, "--import-cache") {
                Ok(i) => imports.push(i),
                Err(e) if spec.ignore_error => warn_import_failed(e),
                Err(e) => return Err(e.into()),
            }
        }
        let exports = opts
            .cache_exports
            .iter()
            .map(|spec| {
                CacheExport::from_attrs(kind_name(spec.kind), &spec.attrs, "--export-cache")
            })
            .collect::<Result<Vec<_>, CacheError>>()?;
        Ok(Caches {
            imports,
            exports,
            inline_build_arg: opts
                .build_args
                .get("BUILDKIT_INLINE_CACHE")
                .is_some_and(|v| v == "1" || v == "true"),
        })
    }
}

fn warn_import_failed(e: CacheError) {
    eprintln!(
        "kiln: warning: cache import failed, building without it: {:#}",
        anyhow::Error::new(e)
    );
}

/// What the cache backends of a build of `opts` work with.
pub(crate) fn cache_context(
    opts: &BuildOptions,
    makes_image: bool,
    client: &RegistryClient,
    store: &Arc<Store>,
    handle: &tokio::runtime::Handle,
) -> CacheContext {
    CacheContext {
        client: client.clone(),
        store: store.clone(),
        runtime: handle.clone(),
        platform: opts
            .platforms
            .first()
            .cloned()
            .unwrap_or_else(kiln_graph::Platform::host),
        makes_image,
        warn: Arc::new(|m| eprintln!("kiln: warning: {m}")),
    }
}

/// Reads every `--import-cache`, all at once. A missing ref is a warning (a first run); an
/// unreadable one is an error unless `ignore-error` (the default for imports).
pub(crate) async fn import_caches(
    caches: &Caches,
    cx: &CacheContext,
) -> anyhow::Result<Vec<ImportedCacheRef>> {
    let jobs = caches.imports.iter().map(|import| async move {
        match import.backend.import(cx).await {
            Ok(loaded) => Ok(loaded.map(|cache| ImportedCacheRef {
                name: import.backend.name(),
                cache,
            })),
            Err(e) if import.ignore_error => {
                warn_import_failed(e);
                Ok(None)
            }
            Err(e) => Err(anyhow::Error::new(e)),
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

/// The image-config fields that carry the inline cache for an image of `layers`, when the
/// build asks for one (empty otherwise). Called before the image is stored or pushed.
pub(crate) fn inline_cache_fields(
    caches: &Caches,
    cx: &CacheContext,
    solved: &SolvedBuild,
    layers: &[kiln_worker::image::Layer],
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
    let implied = InlineCache::default();
    let carriers = caches
        .exports
        .iter()
        .map(|e| (&*e.backend, e.ignore_error))
        .chain(
            caches
                .inline_build_arg
                .then_some((&implied as &dyn CacheBackend, false)),
        );
    for (backend, ignore_error) in carriers {
        match runtime.block_on(backend.image_config_fields(cx, solved, layers)) {
            Ok(None) => continue,
            Ok(Some(fields)) => return Ok(fields),
            Err(e) if ignore_error => {
                eprintln!(
                    "kiln: warning: cache export failed (ignore-error=true): {:#}",
                    anyhow::Error::new(e)
                );
                return Ok(BTreeMap::new());
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(BTreeMap::new())
}

/// Writes every `--export-cache`. With `ignore-error=true` a failure is a warning.
pub(crate) async fn export_caches(
    caches: &Caches,
    cx: &CacheContext,
    solved: &SolvedBuild,
    imported: &[ImportedCacheRef],
) -> anyhow::Result<()> {
    for export in &caches.exports {
        let started = std::time::Instant::now();
        match export.backend.export(cx, solved, imported).await {
            Ok(summary) => eprintln!(
                "cache exported in {:.1}s: {summary}",
                started.elapsed().as_secs_f64()
            ),
            Err(e) if export.ignore_error => eprintln!(
                "kiln: warning: cache export failed (ignore-error=true): {:#}",
                anyhow::Error::new(e)
            ),
            Err(e) => return Err(anyhow::Error::new(e).context("exporting the build cache")),
        }
    }
    Ok(())
}

/// Cache-mount contents carried by imported caches, by id (the first import wins).
pub(crate) fn mount_seeds(
    imported: &[ImportedCacheRef],
) -> BTreeMap<String, (kiln_worker::image::Layer, Arc<dyn BlobSource>)> {
    let mut seeds = BTreeMap::new();
    for c in imported {
        for (id, layer) in c.cache.graph().mounts() {
            seeds
                .entry(id.to_owned())
                .or_insert_with(|| (layer.clone(), c.cache.source().clone()));
        }
    }
    seeds
}
