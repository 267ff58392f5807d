//! The session that runs one [`BuildRequest`]: opens the state dir, plans the build while the
//! cache imports are read, solves it (cancellable through a [`CancelHandle`]), exports the
//! outputs and the caches, writes the metadata file and the history record. It reports
//! through an [`EventSink`] and never prints.
//!
//! The three calls a backend trait takes over are [`import_caches`], [`export_outputs`] and
//! [`export_caches`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_dockerfile::dockerignore::IgnoreMatcher;
use kiln_graph::BuildOptions;
use kiln_history::{HistoryStore, Recorder, SpanKind, StepInfo};
use kiln_oci::{ClientConfig, HostConfig, RegistryClient};
use kiln_solver::{CacheSource, Event};
use kiln_store::Store;
use kiln_worker::build::{plan_build, BuildError, BuildInputs, SolvedBuild};
use kiln_worker::engine::{BlobSource, ContextFilter, ImageProvider, RemoteCache};
use kiln_worker::images::StoredImage;
use kiln_worker::registry::RegistryImages;
use serde_json::json;

use crate::attest::Predicates;
use crate::cache::{CacheBackend, CacheContext, CacheError, ImportedCacheRef, InlineCache};
use crate::events::{BuildEvent, EventSink, StepName, StepOutcome};
use crate::export::{BuildResult, ExportContext, ImageRecipe, PlatformPart};
use crate::request::BuildRequest;

/// The signal (or the user's wish) that cancels a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interruption {
    /// Ctrl-C (SIGINT).
    Interrupt,
    /// SIGTERM, as CI runners send when a job is cancelled.
    Terminate,
}

/// What a [`CancelHandle::cancel`] did, so the caller can tell the user and decide whether
/// to stop the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The steps have not begun: registry requests were cancelled, and nothing a killed
    /// process would not leave is left behind. The caller may stop the process now.
    StopNow,
    /// The running steps were told to stop (containers killed, snapshots removed, the lease
    /// released); [`run`] returns [`BuildFailure::Steps`] once they have.
    Cancelling,
    /// A cancellation is already under way (until the session ends).
    StillCancelling,
    /// The steps are over and outputs are being written: blobs and records are written
    /// aside and renamed in, so the caller may stop the process now.
    StopWhileExporting,
}

/// Cancels a running build from another thread (a signal handler). Clones share one build.
#[derive(Clone, Default)]
pub struct CancelHandle {
    state: Arc<Mutex<CancelState>>,
}

#[derive(Default)]
struct CancelState {
    phase: Phase,
    /// The first interruption while the steps ran.
    interrupted: Option<Interruption>,
    asked: bool,
}

#[derive(Default)]
enum Phase {
    /// Setting up, planning, reading cache imports.
    #[default]
    Preparing,
    /// Same, with the registry client made.
    PreparingWith(RegistryClient),
    /// The steps run.
    Solving {
        stop_steps: Box<dyn Fn() + Send + Sync>,
        client: RegistryClient,
    },
    /// The steps are over.
    Exporting,
}

impl CancelHandle {
    /// A handle for a build not yet started.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels the build, as far as its phase allows; see [`CancelOutcome`].
    pub fn cancel(&self, why: Interruption) -> CancelOutcome {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *st;
        // Once the steps are being cancelled, later signals never cut the clean-up short,
        // even after the solve has ended (the lease is released when the session ends).
        if st.asked {
            return CancelOutcome::StillCancelling;
        }
        match &st.phase {
            Phase::Preparing => CancelOutcome::StopNow,
            Phase::PreparingWith(client) => {
                client.cancel();
                CancelOutcome::StopNow
            }
            Phase::Exporting => CancelOutcome::StopWhileExporting,
            Phase::Solving { stop_steps, client } => {
                st.interrupted.get_or_insert(why);
                st.asked = true;
                stop_steps();
                // Steps waiting on a registry (a stalled layer download) end now.
                client.cancel();
                CancelOutcome::Cancelling
            }
        }
    }

    /// The interruption that cancelled the steps, if one did.
    pub fn interruption(&self) -> Option<Interruption> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .interrupted
    }

    fn enter(&self, phase: Phase) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).phase = phase;
    }
}

/// What a successful build made.
pub struct BuildOutcome {
    /// The image made, when an output makes one (the last such output's); `None` for a
    /// build of several platforms, whose outputs make an index (`image_index`).
    pub image: Option<StoredImage>,
    /// The target stage's name (`stage-N` for an unnamed one).
    pub target: String,
    /// Every step's outcome, by step number.
    pub steps: Vec<StepOutcome>,
    /// Registry bytes downloaded by this build.
    pub bytes_downloaded: u64,
    /// Registry bytes uploaded by this build.
    pub bytes_uploaded: u64,
    /// The image index an output made (several platforms, attestations, index annotations):
    /// what was pushed or written under the image's names, in place of the image manifest.
    pub image_index: Option<kiln_oci::Descriptor>,
    /// The build's reference as buildx names it (`kiln/kiln0/<build id>`), also written to
    /// the metadata file as `buildx.build.ref`.
    pub build_ref: String,
}

impl BuildOutcome {
    /// The image ID as buildx's `-q` and `--iidfile` give it: the config digest of the image
    /// made; for a build of several platforms, which has no one config, the index digest (as
    /// buildx falls back to `containerimage.digest`); `None` when no output made an image.
    pub fn image_id(&self) -> Option<String> {
        outcome_image_id(self.image.as_ref(), self.image_index.as_ref())
    }
}

/// buildx's image ID of `image`: its config digest (`containerimage.config.digest`, which
/// buildx prefers to the manifest's whenever the exporter gives it, as for every
/// single-platform image).
fn image_id(image: &StoredImage) -> String {
    image.config.digest.to_string()
}

/// [`BuildOutcome::image_id`] of what the outputs made.
fn outcome_image_id(
    image: Option<&StoredImage>,
    index: Option<&kiln_oci::Descriptor>,
) -> Option<String> {
    match (image, index) {
        (Some(img), _) => Some(image_id(img)),
        (None, Some(index)) => Some(index.digest.to_string()),
        (None, None) => None,
    }
}

/// The builder and node names in `buildx.build.ref` (kiln has one builder, one node).
pub const BUILD_REF_PREFIX: &str = "kiln/kiln0";

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildFailure {
    /// The Dockerfile could not be lowered; render it with the Dockerfile's label and source.
    #[error(transparent)]
    Frontend(kiln_graph::FrontendError),
    /// A step failed or the build was cancelled. Already reported ([`BuildEvent::Failed`])
    /// and recorded in history.
    #[error("{error}")]
    Steps {
        /// The solver's error.
        error: BuildError,
        /// The interruption that cancelled the build, if one did.
        interrupted: Option<Interruption>,
    },
    /// Setting the build up, exporting, or writing its results failed.
    #[error(transparent)]
    Session(Box<SessionError>),
}

impl From<SessionError> for BuildFailure {
    fn from(e: SessionError) -> Self {
        BuildFailure::Session(Box::new(e))
    }
}

/// A failure of the session's own work (not of a step).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The `.dockerignore` patterns are invalid.
    #[error(".dockerignore: {0}")]
    Dockerignore(String),
    /// `SOURCE_DATE_EPOCH` is not a number.
    #[error("SOURCE_DATE_EPOCH={0:?} is not a number of seconds")]
    SourceDateEpoch(String),
    /// The state dir could not be opened.
    #[error("opening kiln's state dir {path}")]
    OpenStore {
        /// The state dir.
        path: PathBuf,
        /// Why.
        #[source]
        source: kiln_store::StoreError,
    },
    /// The async runtime could not start.
    #[error("starting the async runtime")]
    Runtime(#[source] std::io::Error),
    /// The registry client could not be set up.
    #[error("setting up the registry client")]
    RegistryClient(#[source] Box<kiln_oci::RegistryError>),
    /// Planning the build failed (not in the Dockerfile itself).
    #[error(transparent)]
    Plan(BuildError),
    /// Reading or writing a build cache failed.
    #[error(transparent)]
    Cache(anyhow::Error),
    /// Writing an output failed.
    #[error(transparent)]
    Export(anyhow::Error),
    /// The `--iidfile` could not be written (or its stale copy removed).
    #[error("writing --iidfile {}: {source}", path.display())]
    Iidfile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The metadata file could not be written.
    #[error("writing --metadata-file {}", path.display())]
    Metadata {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Runs `request`, reporting to `events`. Blocking; starts its own async runtime.
pub fn run(request: BuildRequest, events: &dyn EventSink) -> Result<BuildOutcome, BuildFailure> {
    let req = &request;
    // As buildx: a stale image ID file must not outlive a build that fails.
    if let Some(path) = &req.iidfile {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(SessionError::Iidfile {
                    path: path.clone(),
                    source,
                }
                .into())
            }
        }
    }
    IgnoreMatcher::from_patterns(&req.dockerignore)
        .map_err(|e| SessionError::Dockerignore(e.to_string()))?;
    crate::export::refuse_manifest_list(&req.exporters, req.options.platforms.len())
        .map_err(|e| SessionError::Export(e.into()))?;
    let sde = source_date_epoch(&req.options)?;
    let started = unix_now();
    for w in &req.attestations.warnings {
        events.event(BuildEvent::Warning(w.clone()));
    }
    let store =
        Arc::new(
            Store::open(&req.state_root).map_err(|source| SessionError::OpenStore {
                path: req.state_root.clone(),
                source,
            })?,
        );
    // What killed builds left behind (leases, active snapshots, partial ingests) goes first.
    if let Err(e) = store.reclaim_leftovers() {
        events.event(BuildEvent::Warning(format!(
            "could not reclaim leftovers of killed builds: {e}"
        )));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(SessionError::Runtime)?;
    // A destination that cannot take the result (no image store for --load) fails the build
    // before any step runs.
    for e in &req.exporters {
        e.check_destination(runtime.handle())
            .map_err(|e| SessionError::Export(e.into()))?;
    }
    let client = registry_client(req)?;
    // Dropped before the runtime: registry work still under way on other threads (a layer
    // download of a step the failed build left running) is cancelled and waited for, so that
    // nothing polls the runtime's timers while it shuts down.
    let _client_shutdown = ClientShutdown {
        client: client.clone(),
        events,
    };
    // Until the steps run, a cancel stops the registry requests and the caller may exit:
    // resolving base images and reading cache imports leave nothing behind that a killed
    // process would not.
    req.cancel.enter(Phase::PreparingWith(client.clone()));
    let (warn, warnings) = std::sync::mpsc::channel();
    let cache_cx = cache_context(req, &client, &store, runtime.handle(), warn);
    let images: Arc<dyn ImageProvider> = Arc::new(
        RegistryImages::new(client.clone(), runtime.handle().clone(), store.clone())
            .always_pull(req.options.pull),
    );
    let stats_before = client.stats();
    let inputs = BuildInputs {
        dockerfile: &req.dockerfile,
        dockerignore: &req.dockerignore,
        images,
        context_filter: Arc::new(context_filter),
        source_date_epoch: sde,
        compression: req.exporters.iter().find_map(|e| e.layer_compression()),
    };
    // Cache imports are read while the Dockerfile is lowered, base images resolved and the
    // contexts hashed; the first step is looked up only once both are done.
    let (planned, imported) = std::thread::scope(|scope| {
        let import = scope.spawn(|| import_caches(req, events, &cache_cx, &runtime));
        let planned = plan_build(store.clone(), &req.options, inputs);
        // With nothing to wait for, the solve hashes each context when a step needs it.
        if let Some(p) = planned
            .as_ref()
            .ok()
            .filter(|_| !req.cache_imports.is_empty())
        {
            p.worker().prewarm_contexts(&p.graph);
        }
        let imported = import
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("reading the cache imports panicked")));
        (planned, imported)
    });
    let planned = match planned {
        Ok(p) => p,
        Err(BuildError::Frontend(e)) => return Err(BuildFailure::Frontend(e)),
        Err(e) => return Err(SessionError::Plan(e).into()),
    };
    report_warnings(&warnings, events);
    let imported = imported.map_err(SessionError::Cache)?;
    planned.worker().add_imports(
        imported
            .iter()
            .map(|c| c.cache.clone() as Arc<dyn RemoteCache>)
            .collect(),
        mount_seeds(&imported),
    );
    let target_name = {
        let t = planned.graph.target_stage();
        t.name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", t.index))
    };
    let recorder = Arc::new(Recorder::new(&target_name, req.command_line.clone()));
    let names = step_names(&planned);
    for (i, (v, name)) in planned.graph.vertices.iter().zip(&names).enumerate() {
        recorder.declare_step(
            i,
            StepInfo {
                description: v.meta.description.clone(),
                stage: name.stage.clone().unwrap_or_default(),
                depends_on: v.inputs.iter().map(|x| x.index()).collect(),
                inputs: Default::default(),
            },
        );
    }
    events.event(BuildEvent::Planned {
        steps: names.clone(),
    });
    let (forward, mut forwarded) = tokio::sync::mpsc::unbounded_channel();
    let tracker = Arc::new(StepTracker::new(names, recorder.clone(), forward));
    let solver_events = tracker.clone();
    // The solver's events reach `events` on this thread, in order, while the steps run.
    let solved = runtime.block_on(async {
        let solve = planned.solve(solver_events, |solver| {
            let s = solver.clone();
            req.cancel.enter(Phase::Solving {
                stop_steps: Box::new(move || s.cancel()),
                client: client.clone(),
            });
        });
        tokio::pin!(solve);
        loop {
            tokio::select! {
                biased;
                Some(e) = forwarded.recv() => events.event(e),
                r = &mut solve => break r,
            }
        }
    });
    tracker.close();
    while let Ok(e) = forwarded.try_recv() {
        events.event(e);
    }
    req.cancel.enter(Phase::Exporting);
    events.event(BuildEvent::StepsFinished);
    let solved = match solved {
        Ok(s) => s,
        Err(error) => {
            events.event(BuildEvent::Failed {
                error: error.to_string(),
                steps: tracker.outcomes(),
            });
            // After a signal, a step may end with the error of its cancelled download before
            // the solver reports the cancellation: the build was cancelled all the same.
            let interrupted = req.cancel.interruption();
            let cancelled = interrupted.is_some()
                || matches!(error, BuildError::Solve(kiln_solver::SolveError::Cancelled));
            save_history(req, events, &recorder, Err(error.to_string()), cancelled);
            return Err(BuildFailure::Steps { error, interrupted });
        }
    };
    record_step_inputs(&solved, &recorder);
    let image = {
        let _span = recorder.span(SpanKind::Export, "image export and push");
        let image = export_outputs(
            req, events, &cache_cx, &solved, &store, sde, &runtime, &client, started,
        );
        report_warnings(&warnings, events);
        image
    }
    .map_err(SessionError::Export)?;
    let (image, image_index) = image;
    {
        let _span = recorder.span(SpanKind::CacheExport, "cache export");
        let exported = export_caches(req, events, &cache_cx, &solved, &imported, &runtime);
        report_warnings(&warnings, events);
        exported
    }
    .map_err(SessionError::Cache)?;
    let stats = client.stats();
    let bytes_downloaded = stats.bytes_received - stats_before.bytes_received;
    let bytes_uploaded = stats.bytes_sent - stats_before.bytes_sent;
    let steps = tracker.outcomes();
    let build_ref = format!("{BUILD_REF_PREFIX}/{}", recorder.id());
    if let Some(path) = &req.iidfile {
        let id = outcome_image_id(image.as_ref(), image_index.as_ref()).unwrap_or_default();
        crate::export::write_file_atomic(path, id.as_bytes()).map_err(|e| {
            SessionError::Iidfile {
                path: path.clone(),
                source: std::io::Error::other(e),
            }
        })?;
    }
    if let Some(path) = &req.metadata_file {
        let names: Vec<&str> = req
            .exporters
            .iter()
            .flat_map(|e| e.image_names())
            .map(String::as_str)
            .collect();
        write_metadata(
            path,
            (image.as_ref(), image_index.as_ref()),
            &names,
            &build_ref,
            &steps,
            bytes_downloaded,
            bytes_uploaded,
        )
        .map_err(|source| SessionError::Metadata {
            path: path.clone(),
            source,
        })?;
    }
    recorder.add_bytes_downloaded(bytes_downloaded);
    recorder.add_bytes_uploaded(bytes_uploaded);
    let made_digest = match (&image_index, &image) {
        (Some(index), None) => Some(index.digest.to_string()),
        (_, Some(img)) => Some(img.manifest.digest.to_string()),
        (None, None) => None,
    };
    if let Some(d) = &made_digest {
        recorder.set_image_digest(d);
    }
    save_history(req, events, &recorder, Ok(()), false);
    let target = {
        let t = solved.graph.target_stage();
        t.name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", t.index))
    };
    events.event(BuildEvent::Finished {
        target: target.clone(),
        steps: steps.clone(),
        bytes_downloaded,
        bytes_uploaded,
        image_digest: made_digest,
    });
    Ok(BuildOutcome {
        image,
        target,
        steps,
        bytes_downloaded,
        bytes_uploaded,
        image_index,
        build_ref,
    })
}

/// Every step's name, by step index. With several target platforms each step names the
/// platform it builds for, and its stage lane is `PLATFORM STAGE` (a shared source keeps
/// its plain name).
fn step_names(planned: &kiln_worker::build::PlannedBuild) -> Vec<StepName> {
    let several = planned.platforms.len() > 1;
    planned
        .graph
        .vertices
        .iter()
        .zip(&planned.step_platforms)
        .map(|(v, p)| {
            let platform = p.as_ref().filter(|_| several).map(|p| p.to_string());
            let stage = match (&platform, &v.meta.stage) {
                (Some(p), Some(s)) => Some(format!("{p} {s}")),
                (_, s) => s.clone(),
            };
            StepName {
                description: v.meta.description.clone(),
                stage,
                platform,
            }
        })
        .collect()
}

/// What the cache backends of `req` work with; their warnings go to `warnings`.
fn cache_context(
    req: &BuildRequest,
    client: &RegistryClient,
    store: &Arc<Store>,
    handle: &tokio::runtime::Handle,
    warnings: std::sync::mpsc::Sender<String>,
) -> CacheContext {
    let warnings = Mutex::new(warnings);
    CacheContext {
        client: client.clone(),
        store: store.clone(),
        runtime: handle.clone(),
        platform: req
            .options
            .platforms
            .first()
            .cloned()
            .unwrap_or_else(kiln_graph::Platform::host),
        makes_image: req.exporters.iter().any(|e| e.makes_image()),
        warn: Arc::new(move |m: &str| {
            let _ = warnings
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(m.to_owned());
        }),
    }
}

/// Passes on the warnings the cache backends gave so far.
fn report_warnings(warnings: &std::sync::mpsc::Receiver<String>, events: &dyn EventSink) {
    while let Ok(m) = warnings.try_recv() {
        events.event(BuildEvent::Warning(m));
    }
}

/// Reads every cache import, all at once (blocking on `runtime`). A missing ref is a warning
/// (a first run); an unreadable one is an error unless `ignore-error` (the default for
/// imports).
fn import_caches(
    req: &BuildRequest,
    events: &dyn EventSink,
    cx: &CacheContext,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<Vec<ImportedCacheRef>> {
    let jobs = req.cache_imports.iter().map(|import| async move {
        match import.backend.import(cx).await {
            Ok(loaded) => Ok(loaded.map(|cache| ImportedCacheRef {
                name: import.backend.name(),
                cache,
            })),
            Err(e) if import.ignore_error => {
                events.event(BuildEvent::Warning(crate::request::import_failed(e)));
                Ok(None)
            }
            Err(e) => Err(anyhow::Error::new(e)),
        }
    });
    let mut imported = Vec::new();
    for r in runtime.block_on(futures::future::join_all(jobs)) {
        if let Some(c) = r? {
            imported.push(c);
        }
    }
    for c in &imported {
        events.event(BuildEvent::CacheImported {
            name: c.name.clone(),
        });
    }
    Ok(imported)
}

/// The image-config fields that carry the inline cache for an image of `layers`, when the
/// build asks for one (`--export-cache type=inline` or `BUILDKIT_INLINE_CACHE=1`; empty
/// otherwise). Called before the image is stored or pushed.
fn inline_cache_fields(
    req: &BuildRequest,
    events: &dyn EventSink,
    cx: &CacheContext,
    solved: &SolvedBuild,
    layers: &[kiln_worker::image::Layer],
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
    let implied = InlineCache::default();
    let inline_build_arg = inline_build_arg(req);
    let carriers = req
        .cache_exports
        .iter()
        .map(|e| (&*e.backend, e.ignore_error))
        .chain(inline_build_arg.then_some((&implied as &dyn CacheBackend, false)));
    for (backend, ignore_error) in carriers {
        match runtime.block_on(backend.image_config_fields(cx, solved, layers)) {
            Ok(None) => continue,
            Ok(Some(fields)) => return Ok(fields),
            Err(e) if ignore_error => {
                events.event(ignored_export_failure(e));
                return Ok(BTreeMap::new());
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(BTreeMap::new())
}

/// Whether `BUILDKIT_INLINE_CACHE=1` (or `true`) asks for the inline cache.
fn inline_build_arg(req: &BuildRequest) -> bool {
    req.options
        .build_args
        .get("BUILDKIT_INLINE_CACHE")
        .is_some_and(|v| v == "1" || v == "true")
}

/// Whether the build asks for an inline cache (`--export-cache type=inline` or the build arg).
fn wants_inline_cache(req: &BuildRequest) -> bool {
    inline_build_arg(req)
        || req
            .cache_exports
            .iter()
            .any(|e| e.backend.name() == "inline")
}

/// Writes every cache export (blocking on `runtime`). With `ignore-error=true` a failure is
/// a warning.
fn export_caches(
    req: &BuildRequest,
    events: &dyn EventSink,
    cx: &CacheContext,
    solved: &SolvedBuild,
    imported: &[ImportedCacheRef],
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    for export in &req.cache_exports {
        let started = Instant::now();
        match runtime.block_on(export.backend.export(cx, solved, imported)) {
            Ok(summary) => events.event(BuildEvent::CacheExported {
                summary: summary.to_string(),
                elapsed: started.elapsed(),
            }),
            Err(e) if export.ignore_error => events.event(ignored_export_failure(e)),
            Err(e) => return Err(anyhow::Error::new(e).context("exporting the build cache")),
        }
    }
    Ok(())
}

/// The warning a cache export that failed under `ignore-error=true` gives instead of failing
/// the build (the inline cache and every other backend word it the same).
fn ignored_export_failure(e: CacheError) -> BuildEvent {
    BuildEvent::Warning(format!(
        "cache export failed (ignore-error=true): {:#}",
        anyhow::Error::new(e)
    ))
}

/// Cache-mount contents carried by imported caches, by id (the first import wins).
fn mount_seeds(
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

/// `.dockerignore` patterns as a context filter.
fn context_filter(patterns: &[String]) -> ContextFilter {
    let m = Arc::new(IgnoreMatcher::from_patterns(patterns).unwrap_or_default());
    let m2 = m.clone();
    ContextFilter {
        excluded: Box::new(move |p: &str, _dir: bool| m.matches(p)),
        may_reinclude: Box::new(move |d: &str| m2.may_match_under(d)),
    }
}

/// `SOURCE_DATE_EPOCH` from the environment or a build arg, as BuildKit reads it.
fn source_date_epoch(opts: &BuildOptions) -> Result<Option<i64>, SessionError> {
    let raw = opts
        .build_args
        .get("SOURCE_DATE_EPOCH")
        .cloned()
        .or_else(|| std::env::var("SOURCE_DATE_EPOCH").ok());
    match raw.filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => s
            .parse::<i64>()
            .map(Some)
            .map_err(|_| SessionError::SourceDateEpoch(s)),
    }
}

/// Feeds the solver's events to the history recorder and the step outcomes, and forwards
/// them to the session's thread.
struct StepTracker {
    names: Vec<StepName>,
    recorder: Arc<Recorder>,
    begun: Instant,
    outcomes: Mutex<BTreeMap<usize, StepOutcome>>,
    forward: Mutex<Option<tokio::sync::mpsc::UnboundedSender<BuildEvent>>>,
}

impl StepTracker {
    fn new(
        names: Vec<StepName>,
        recorder: Arc<Recorder>,
        forward: tokio::sync::mpsc::UnboundedSender<BuildEvent>,
    ) -> Self {
        StepTracker {
            names,
            recorder,
            begun: Instant::now(),
            outcomes: Mutex::new(BTreeMap::new()),
            forward: Mutex::new(Some(forward)),
        }
    }

    /// Stops forwarding: events after the solve are recorded, not shown.
    fn close(&self) {
        self.forward
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    fn outcomes(&self) -> Vec<StepOutcome> {
        self.outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn name(&self, node: usize) -> (String, Option<String>) {
        self.names
            .get(node)
            .map(|n| (n.description.clone(), n.stage.clone()))
            .unwrap_or_else(|| (format!("step {node}"), None))
    }
}

impl kiln_solver::EventSink for StepTracker {
    fn event(&self, event: Event) {
        match &event {
            Event::Cached { node, key, source } => {
                let remote = match source {
                    CacheSource::Local => None,
                    CacheSource::Remote(r) => Some(r.as_str()),
                };
                self.recorder.step_cached(*node, &key.to_string(), remote);
            }
            Event::Started { node, key } => self.recorder.step_started(*node, &key.to_string()),
            Event::Completed {
                node,
                key,
                duration,
            } => self
                .recorder
                .step_completed(*node, &key.to_string(), *duration),
            Event::Failed { node, message } => self.recorder.step_failed(*node, message),
            Event::Log { .. } => {}
        }
        {
            let mut outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
            match &event {
                Event::Cached { node, source, .. } => {
                    let (name, stage) = self.name(*node);
                    let src = match source {
                        CacheSource::Local => "local".to_owned(),
                        CacheSource::Remote(r) => r.clone(),
                    };
                    outcomes.insert(
                        *node,
                        StepOutcome {
                            step: node + 1,
                            name,
                            stage,
                            status: "cached",
                            cache_source: Some(src),
                            started_ms: None,
                            duration_ms: None,
                        },
                    );
                }
                Event::Started { node, .. } => {
                    let (name, stage) = self.name(*node);
                    outcomes.insert(
                        *node,
                        StepOutcome {
                            step: node + 1,
                            name,
                            stage,
                            status: "running",
                            cache_source: None,
                            started_ms: Some(self.begun.elapsed().as_millis() as u64),
                            duration_ms: None,
                        },
                    );
                }
                Event::Completed { node, duration, .. } => {
                    if let Some(o) = outcomes.get_mut(node) {
                        o.status = "run";
                        o.duration_ms = Some(duration.as_millis() as u64);
                    }
                }
                Event::Failed { node, .. } => {
                    if let Some(o) = outcomes.get_mut(node) {
                        o.status = "failed";
                    }
                }
                Event::Log { .. } => {}
            }
        }
        if let Some(f) = self
            .forward
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = f.send(BuildEvent::Step(event));
        }
    }
}

/// Runs every exporter, in flag order, on the result; returns the image made, if any, and
/// the image index made, if any. The image (with the inline cache's config fields) is made
/// once when an exporter needs it, and so are the attestations' predicates.
#[allow(clippy::too_many_arguments)]
fn export_outputs(
    req: &BuildRequest,
    events: &dyn EventSink,
    cache_cx: &CacheContext,
    solved: &SolvedBuild,
    store: &Store,
    sde: Option<i64>,
    runtime: &tokio::runtime::Runtime,
    client: &RegistryClient,
    started: i64,
) -> anyhow::Result<(Option<StoredImage>, Option<kiln_oci::Descriptor>)> {
    let several = solved.platforms.len() > 1;
    let makes_image = req.exporters.iter().any(|e| e.makes_image());
    let mut parts = Vec::with_capacity(solved.platforms.len());
    let mut platform_predicates = Vec::new();
    for part in &solved.platforms {
        let rootfs = part.rootfs.as_deref();
        if !makes_image {
            parts.push(PlatformPart {
                platform: part.platform.clone(),
                rootfs,
                recipe: None,
            });
            continue;
        }
        let config = &part.graph.target_stage().config;
        let mut recipe = ImageRecipe::for_result(&solved.worker, rootfs, config, sde)?;
        // `force-compression=true`: the base image's layers too, before anything is stored.
        if let (Some(fs), Some(e)) = (
            rootfs,
            req.exporters.iter().find(|e| e.forces_compression()),
        ) {
            let compression = e
                .layer_compression()
                .unwrap_or(kiln_oci::compression::Compression::Gzip);
            recipe.layers = solved
                .worker
                .recompress_layers(fs, &recipe.layers, compression)
                .map_err(crate::export::ExportError::from)?;
        }
        // `--export-cache type=inline`: the cache goes into the config, before the image is
        // stored or pushed. It describes one image: a build of several platforms has none.
        let fields = if several {
            BTreeMap::new()
        } else {
            inline_cache_fields(req, events, cache_cx, solved, &recipe.layers, runtime)?
        };
        platform_predicates.push(attestation_predicates(
            req, events, solved, part, sde, started,
        )?);
        parts.push(PlatformPart {
            platform: part.platform.clone(),
            rootfs,
            recipe: Some(recipe.with_config_fields(fields)),
        });
    }
    if several && makes_image && wants_inline_cache(req) {
        events.event(BuildEvent::Warning(
            "the inline cache describes one image: a build of several platforms writes none; \
             export a registry cache (--export-cache type=registry,ref=...) instead"
                .to_owned(),
        ));
    }
    let result = BuildResult::for_platforms(parts);
    let result = if makes_image {
        result
            .with_attachments(req.annotations.clone(), Predicates::default())
            .with_platform_predicates(platform_predicates)
    } else {
        result
    };
    let cx = ExportContext {
        store,
        worker: &solved.worker,
        client,
        runtime: runtime.handle(),
        source_date_epoch: sde,
    };
    let mut made = None;
    for e in &req.exporters {
        let report = e.export(&cx, &result)?;
        if report.image.is_some() {
            made = report.image;
        }
        events.event(BuildEvent::OutputExported {
            kind: e.kind().to_owned(),
            destination: e.destination(),
        });
    }
    Ok((made, result.index()))
}

/// Seconds since the Unix epoch, now.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The predicates of the attestations `req` asks for, when an output attaches them (an
/// image, registry or OCI output): the provenance of the build and the SBOM of the target's
/// root filesystem. With `SOURCE_DATE_EPOCH` the times are that epoch and no invocation id
/// is written, so two builds of the same inputs attach the same statements.
fn attestation_predicates(
    req: &BuildRequest,
    events: &dyn EventSink,
    solved: &SolvedBuild,
    part: &kiln_worker::build::SolvedPlatform,
    sde: Option<i64>,
    started: i64,
) -> anyhow::Result<crate::attest::Predicates> {
    use crate::attest::{provenance, sbom, Predicates};
    let attaches = req
        .exporters
        .iter()
        .any(|e| matches!(e.kind(), "image" | "registry" | "oci"));
    if req.attestations.is_empty() {
        return Ok(Predicates::default());
    }
    if !attaches {
        events.event(BuildEvent::Warning(
            "attestations are attached to image, registry and oci outputs only; \
             this build's outputs get none"
                .to_owned(),
        ));
        return Ok(Predicates::default());
    }
    let stamp = |secs: i64| kiln_worker::image::created_timestamp(Some(secs.max(0) as u64));
    let (started_on, finished_on) = match sde {
        Some(epoch) => (stamp(epoch), stamp(epoch)),
        None => (stamp(started), stamp(unix_now())),
    };
    let target = {
        let t = part.graph.target_stage();
        t.name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", t.index))
    };
    let platform = part.platform.clone();
    // The platform's own steps, as if it had been built alone.
    let graph = if solved.platforms.len() > 1 {
        Arc::new(kiln_worker::platform_graph::own_steps(&part.graph))
    } else {
        part.graph.clone()
    };
    let mut out = Predicates::default();
    if let Some(p) = &req.attestations.provenance {
        let locals = ["context", "dockerfile"]
            .into_iter()
            .map(str::to_owned)
            .chain(req.options.locals.keys().cloned())
            .collect();
        let entry_point = req
            .options
            .dockerfile
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "Dockerfile".to_owned());
        let invocation_id = sde
            .is_none()
            .then(|| format!("kiln-{}-{started}", std::process::id()));
        out.provenance = Some(provenance::predicate(&provenance::ProvenanceInputs {
            request: p,
            entry_point,
            target: req.options.target.as_deref(),
            build_args: &req.options.build_args,
            labels: &req.options.labels,
            locals,
            platform: platform.clone(),
            graph: &graph,
            started: started_on.clone(),
            finished: finished_on,
            invocation_id,
            dockerfile_source: &req.dockerfile_source,
        }));
    }
    if req.attestations.sbom.is_some() {
        let packages = crate::export::scan_rootfs(&solved.worker, part.rootfs.as_deref())?;
        out.sbom = Some(sbom::document(&packages, &target, &started_on));
    }
    Ok(out)
}

/// The metadata file: buildx's keys (`buildx.build.ref`, and for an image
/// `containerimage.digest`, `containerimage.config.digest`, `containerimage.descriptor`,
/// `image.name` as the names joined with commas) and kiln's own (`kiln.*`). When an output
/// made an index (attestations), `containerimage.digest`/`descriptor` are the index's.
fn write_metadata(
    path: &Path,
    (image, index): (Option<&StoredImage>, Option<&kiln_oci::Descriptor>),
    names: &[&str],
    build_ref: &str,
    steps: &[StepOutcome],
    bytes_downloaded: u64,
    bytes_uploaded: u64,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut v = json!({
        "buildx.build.ref": build_ref,
        "kiln.steps": steps,
        "kiln.bytes_downloaded": bytes_downloaded,
        "kiln.bytes_uploaded": bytes_uploaded,
    });
    if !names.is_empty() {
        v["image.name"] = json!(names.join(","));
    }
    if let Some(img) = image {
        v["containerimage.digest"] = json!(img.manifest.digest.to_string());
        v["containerimage.config.digest"] = json!(img.config.digest.to_string());
        v["containerimage.descriptor"] = serde_json::to_value(img.manifest.descriptor())?;
    }
    // What the names point at when an index was made (attestations): the index, as buildx.
    if let Some(index) = index {
        v["containerimage.digest"] = json!(index.digest.to_string());
        v["containerimage.descriptor"] = serde_json::to_value(index)?;
    }
    let text = serde_json::to_vec_pretty(&v)?;
    crate::export::write_file_atomic(path, &text)?;
    Ok(())
}

/// Cancels a registry client and waits (briefly) for its blocking calls when dropped.
struct ClientShutdown<'a> {
    client: RegistryClient,
    events: &'a dyn EventSink,
}

impl Drop for ClientShutdown<'_> {
    fn drop(&mut self) {
        if !self.client.shutdown(std::time::Duration::from_secs(10)) {
            self.events.event(BuildEvent::Warning(
                "registry requests were still under way at exit".to_owned(),
            ));
        }
    }
}

/// A registry client; hosts of outputs with `registry.insecure=true` speak plain HTTP.
fn registry_client(req: &BuildRequest) -> Result<RegistryClient, SessionError> {
    // Image names of outputs with `registry.insecure=true`, and cache refs marked
    // `registry.insecure=true` (or `insecure=true`).
    let outputs = req
        .exporters
        .iter()
        .flat_map(|e| e.insecure_names().iter().cloned());
    let caches = req
        .cache_exports
        .iter()
        .map(|c| &c.backend)
        .chain(req.cache_imports.iter().map(|c| &c.backend))
        .flat_map(|b| b.insecure_names());
    let mut config = ClientConfig::default();
    for name in outputs.chain(caches) {
        if let Ok(r) = name.parse::<kiln_oci::Reference>() {
            let insecure = HostConfig {
                insecure: true,
                ..HostConfig::default()
            };
            config.hosts.insert(r.registry().to_owned(), insecure);
        }
    }
    RegistryClient::new(config).map_err(|e| SessionError::RegistryClient(Box::new(e)))
}

/// Records the build in the state dir's history and writes the report and trace. A history
/// that cannot be written is a warning: it must never fail a build that succeeded.
fn save_history(
    req: &BuildRequest,
    events: &dyn EventSink,
    recorder: &Recorder,
    result: Result<(), String>,
    cancelled: bool,
) {
    let warn = |m: String| events.event(BuildEvent::Warning(m));
    let record = recorder.finish(result, cancelled);
    if kiln_history::otlp_configured() {
        if let Err(e) = kiln_history::export_otlp(&record, None) {
            warn(format!("could not export the build trace over OTLP: {e}"));
        }
    }
    if let Err(e) = HistoryStore::new(&req.state_root).save(&record) {
        warn(format!("could not record the build in history: {e}"));
    }
    if let Some(p) = &req.report {
        match kiln_history::write_report(&record, p) {
            Ok(()) => events.event(BuildEvent::ReportWritten { path: p.clone() }),
            Err(e) => warn(format!("could not write the report {}: {e}", p.display())),
        }
    }
    if let Some(p) = &req.trace {
        if let Err(e) = kiln_history::write_trace(&record, p) {
            warn(format!("could not write the trace {}: {e}", p.display()));
        }
    }
}

/// What each step's cache key was computed from, for `kiln history compare` to name the
/// input that changed: files a copy took from a local context (by digest), the environment a
/// `RUN` saw (build args included), the base image's digest.
fn record_step_inputs(solved: &SolvedBuild, recorder: &Recorder) {
    use kiln_graph::graph::{CopySource, Op};
    let g = &solved.graph;
    for (i, v) in g.vertices.iter().enumerate() {
        let mut inputs = std::collections::BTreeMap::new();
        match &v.op {
            Op::Copy(c) => {
                if let CopySource::Input { input } = c.source {
                    let src = v.inputs.get(input as usize).map(|id| &g.vertex(*id).op);
                    if let Some(Op::Local(l)) = src {
                        if let Some(idx) = solved.worker.context_index(&l.name, &l.exclude) {
                            let reads = idx.copy_reads(&c.srcs, &c.exclude);
                            for (path, e) in idx.entries() {
                                let picked = reads(path);
                                if let (
                                    true,
                                    kiln_worker::context::EntryKind::File { digest, .. },
                                ) = (picked, &e.kind)
                                {
                                    inputs.insert(format!("file:{path}"), digest.to_string());
                                }
                            }
                        }
                    }
                }
            }
            Op::Exec(e) => {
                for kv in &e.env {
                    if let Some((k, val)) = kv.split_once('=') {
                        inputs.insert(format!("env:{k}"), val.to_owned());
                    }
                }
                inputs.insert("command".into(), e.args.join(" "));
            }
            Op::Image(src) => {
                inputs.insert(
                    "base".into(),
                    src.digest.clone().unwrap_or_else(|| src.reference.clone()),
                );
            }
            _ => {}
        }
        if !inputs.is_empty() {
            recorder.set_step_inputs(i, inputs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn client() -> RegistryClient {
        RegistryClient::new(ClientConfig::default()).expect("a client without hosts")
    }

    #[test]
    fn a_cancel_before_the_steps_lets_the_caller_stop_at_once() {
        let handle = CancelHandle::new();
        assert_eq!(
            handle.cancel(Interruption::Interrupt),
            CancelOutcome::StopNow
        );
        handle.enter(Phase::PreparingWith(client()));
        assert_eq!(
            handle.cancel(Interruption::Terminate),
            CancelOutcome::StopNow
        );
        assert_eq!(handle.interruption(), None);
    }

    #[test]
    fn a_cancel_while_the_steps_run_stops_them_once_and_later_ones_wait_for_the_clean_up() {
        let handle = CancelHandle::new();
        let stops = Arc::new(AtomicUsize::new(0));
        let counted = stops.clone();
        handle.enter(Phase::Solving {
            stop_steps: Box::new(move || {
                counted.fetch_add(1, Ordering::SeqCst);
            }),
            client: client(),
        });
        let other = handle.clone();
        assert_eq!(
            other.cancel(Interruption::Terminate),
            CancelOutcome::Cancelling
        );
        assert_eq!(
            handle.cancel(Interruption::Interrupt),
            CancelOutcome::StillCancelling
        );
        assert_eq!(stops.load(Ordering::SeqCst), 1);
        // The first interruption names the build's end; the solve ending does not let a
        // later signal cut the clean-up short.
        assert_eq!(handle.interruption(), Some(Interruption::Terminate));
        handle.enter(Phase::Exporting);
        assert_eq!(
            handle.cancel(Interruption::Interrupt),
            CancelOutcome::StillCancelling
        );
    }

    #[test]
    fn a_cancel_after_the_steps_lets_the_caller_stop_while_exporting() {
        let handle = CancelHandle::new();
        handle.enter(Phase::Exporting);
        assert_eq!(
            handle.cancel(Interruption::Interrupt),
            CancelOutcome::StopWhileExporting
        );
        assert_eq!(handle.interruption(), None);
    }
}
