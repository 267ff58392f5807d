//! Running a build: the part of `kiln build` after the Dockerfile is parsed and the options
//! validated — plan, solve with live progress, export, write metadata, summarise.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use kiln_build::export::{BuildResult, ExportContext, Exporter, ImageRecipe};
use kiln_dockerfile::dockerignore::IgnoreMatcher;
use kiln_dockerfile::Dockerfile;
use kiln_graph::BuildOptions;
use kiln_oci::{ClientConfig, HostConfig, RegistryClient};
use kiln_store::Store;
use kiln_worker::build::{plan_build, BuildError, BuildInputs, SolvedBuild};
use kiln_worker::engine::{ContextFilter, ImageProvider, RemoteCache};
use kiln_worker::images::StoredImage;
use kiln_worker::registry::RegistryImages;
use serde_json::json;

use super::build_cache::{export_caches, import_caches, mount_seeds};
use crate::progress::Progress;
use crate::Globals;
use kiln_history::{HistoryStore, Recorder, SpanKind, StepInfo};

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
fn source_date_epoch(opts: &BuildOptions) -> anyhow::Result<Option<i64>> {
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
            .map_err(|_| anyhow::anyhow!("SOURCE_DATE_EPOCH={s:?} is not a number of seconds")),
    }
}

/// Where to write the build's timeline report and trace (besides its history record).
pub struct Reports {
    /// `--report FILE.html`.
    pub report: Option<std::path::PathBuf>,
    /// `--trace FILE.json`.
    pub trace: Option<std::path::PathBuf>,
}

/// Runs a real build for `opts`. `render` prints a frontend error with file:line:col.
pub fn execute(
    opts: &BuildOptions,
    exporters: &[Box<dyn Exporter>],
    dockerfile: &Dockerfile,
    dockerignore: &[String],
    globals: &Globals,
    reports: &Reports,
    render: &dyn Fn(&kiln_graph::FrontendError) -> String,
) -> anyhow::Result<ExitCode> {
    IgnoreMatcher::from_patterns(dockerignore)
        .map_err(|e| anyhow::anyhow!(".dockerignore: {e}"))?;
    let sde = source_date_epoch(opts)?;
    super::build_cache::check_cache_exports(opts)?;
    let store = Arc::new(
        Store::open(&globals.root)
            .with_context(|| format!("opening kiln's state dir {}", globals.root.display()))?,
    );
    // What killed builds left behind (leases, active snapshots, partial ingests) goes first.
    if let Err(e) = store.reclaim_leftovers() {
        eprintln!("kiln: warning: could not reclaim leftovers of killed builds: {e}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let client = registry_client(opts, exporters)?;
    // Dropped before the runtime: registry work still under way on other threads (a layer
    // download of a step the failed build left running) is cancelled and waited for, so that
    // nothing polls the runtime's timers while it shuts down.
    let _client_shutdown = ClientShutdown(client.clone());
    // Until the steps run (which have their own handler below), Ctrl-C or SIGTERM stops
    // kiln at once: resolving base images and reading cache imports leave nothing behind
    // that a killed process would not.
    let early_signals = runtime.spawn(exit_on_signal(client.clone()));
    let images: Arc<dyn ImageProvider> = Arc::new(
        RegistryImages::new(client.clone(), runtime.handle().clone(), store.clone())
            .always_pull(opts.pull),
    );
    let stats_before = client.stats();
    let inputs = BuildInputs {
        dockerfile,
        dockerignore,
        images,
        context_filter: Arc::new(context_filter),
        source_date_epoch: sde,
        compression: exporters.iter().find_map(|e| e.layer_compression()),
    };
    // Cache imports are read while the Dockerfile is lowered, base images resolved and the
    // contexts hashed; the first step is looked up only once both are done.
    let (planned, imported) = std::thread::scope(|scope| {
        let import =
            scope.spawn(|| runtime.block_on(import_caches(opts, &client, runtime.handle())));
        let planned = plan_build(store.clone(), opts, inputs);
        // With nothing to wait for, the solve hashes each context when a step needs it.
        if let Some(p) = planned
            .as_ref()
            .ok()
            .filter(|_| !opts.cache_imports.is_empty())
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
        Err(BuildError::Frontend(e)) => {
            eprintln!("{}", render(&e));
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(e.into()),
    };
    let imported = imported?;
    planned.worker().add_imports(
        imported
            .iter()
            .map(|(_, c)| c.clone() as Arc<dyn RemoteCache>)
            .collect(),
        mount_seeds(&imported),
    );
    let target_name = {
        let t = planned.graph.target_stage();
        t.name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", t.index))
    };
    let recorder = Arc::new(Recorder::new(&target_name, std::env::args().collect()));
    for (i, v) in planned.graph.vertices.iter().enumerate() {
        recorder.declare_step(
            i,
            StepInfo {
                description: v.meta.description.clone(),
                stage: v.meta.stage.clone().unwrap_or_default(),
                depends_on: v.inputs.iter().map(|x| x.index()).collect(),
                inputs: Default::default(),
            },
        );
    }
    let progress = Arc::new(Progress::new(
        opts.progress,
        &planned.graph,
        recorder.clone(),
    ));
    let sink = progress.clone();
    let steps = progress.clone();
    // The exit code of a build stopped by a signal, as shells report one: 128 + its number.
    let signalled = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let signal_code = signalled.clone();
    let signal_client = client.clone();
    let solved = runtime.block_on(async move {
        planned
            .solve(sink, |solver| {
                let s = solver.clone();
                // Listening starts here, before the early handler stops: no signal falls in
                // between and is lost.
                let mut int =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
                early_signals.abort();
                tokio::spawn(async move {
                    // Ctrl-C, or SIGTERM as CI runners send when a job is cancelled: running
                    // steps' containers are killed, their snapshots removed and the lease
                    // released before kiln exits. Later signals only say that this is under
                    // way: leaving now would leave the state dir for fsck to clean up. Once
                    // the steps are over (exporting, pushing) a signal stops kiln at once:
                    // blobs and records are written aside and renamed in, so a stop leaves
                    // only what a killed process does (its lease, maybe a temp file), which
                    // `kiln debug fsck --repair` clears.
                    let mut term = tokio::signal::unix::signal(
                        tokio::signal::unix::SignalKind::terminate(),
                    )
                    .ok();
                    let mut asked = false;
                    loop {
                        let name = tokio::select! {
                            Some(()) = async {
                                match int.as_mut() {
                                    Some(i) => i.recv().await,
                                    None => std::future::pending().await,
                                }
                            } => "Ctrl-C",
                            Some(()) = async {
                                match term.as_mut() {
                                    Some(t) => t.recv().await,
                                    None => std::future::pending().await,
                                }
                            } => "SIGTERM",
                        };
                        let code: u8 = if name == "SIGTERM" { 143 } else { 130 };
                        if steps.is_finished() {
                            eprintln!("kiln: interrupted while exporting ({name})");
                            std::process::exit(code.into());
                        }
                        let _ = signal_code.compare_exchange(
                            0,
                            code,
                            std::sync::atomic::Ordering::SeqCst,
                            std::sync::atomic::Ordering::SeqCst,
                        );
                        if asked {
                            eprintln!(
                                "kiln: still cancelling: stopping containers and removing their snapshots"
                            );
                        } else {
                            eprintln!("kiln: cancelling the build ({name})");
                            s.cancel();
                            // Steps waiting on a registry (a stalled layer download) end now.
                            signal_client.cancel();
                            asked = true;
                        }
                    }
                });
            })
            .await
    });
    progress.finish();
    let solved = match solved {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kiln: error: {e}");
            eprint!("{}", progress.summary("build failed"));
            // After a signal, a step may end with the error of its cancelled download before
            // the solver reports the cancellation: the build was cancelled all the same.
            let code = signalled.load(std::sync::atomic::Ordering::SeqCst);
            let cancelled =
                code != 0 || matches!(e, BuildError::Solve(kiln_solver::SolveError::Cancelled));
            save_history(globals, &recorder, Err(e.to_string()), cancelled, reports);
            return Ok(ExitCode::from(if code != 0 { code } else { 1 }));
        }
    };
    record_step_inputs(&solved, &recorder);
    let image = {
        let _span = recorder.span(SpanKind::Export, "image export and push");
        export(opts, exporters, &solved, &store, sde, &runtime, &client)
    }?;
    {
        let _span = recorder.span(SpanKind::CacheExport, "cache export");
        let image_output = exporters.iter().any(|e| e.makes_image());
        runtime.block_on(export_caches(
            opts,
            image_output,
            &solved,
            &store,
            &client,
            &imported,
        ))?;
    }
    let stats = client.stats();
    let moved = Moved {
        downloaded: stats.bytes_received - stats_before.bytes_received,
        uploaded: stats.bytes_sent - stats_before.bytes_sent,
    };
    if let Some(path) = &opts.metadata_file {
        write_metadata(path, image.as_ref(), &progress, &moved)?;
    }
    recorder.add_bytes_downloaded(moved.downloaded);
    recorder.add_bytes_uploaded(moved.uploaded);
    if let Some(img) = &image {
        recorder.set_image_digest(&img.manifest.digest.to_string());
    }
    save_history(globals, &recorder, Ok(()), false, reports);
    let target = solved
        .graph
        .target_stage()
        .name
        .clone()
        .unwrap_or_else(|| format!("stage-{}", solved.graph.target_stage().index));
    if !matches!(opts.progress, kiln_graph::options::ProgressMode::Quiet) {
        eprint!("{}", progress.summary(&format!("built target {target}")));
        eprintln!(
            "registry traffic: {} downloaded, {} uploaded",
            human_bytes(moved.downloaded),
            human_bytes(moved.uploaded)
        );
        if let Some(img) = &image {
            eprintln!("image {}", img.manifest.digest);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs every exporter, in flag order, on the result; returns the image made, if any. The
/// image (with the inline cache's config fields) is made once when an exporter needs it.
fn export(
    opts: &BuildOptions,
    exporters: &[Box<dyn Exporter>],
    solved: &SolvedBuild,
    store: &Store,
    sde: Option<i64>,
    runtime: &tokio::runtime::Runtime,
    client: &RegistryClient,
) -> anyhow::Result<Option<StoredImage>> {
    let rootfs = solved.rootfs.as_deref();
    let result = if exporters.iter().any(|e| e.makes_image()) {
        let config = &solved.graph.target_stage().config;
        let recipe = ImageRecipe::for_result(&solved.worker, rootfs, config, sde)?;
        // `--export-cache type=inline`: the cache goes into the config, before the image is
        // stored or pushed.
        let fields =
            super::build_cache::inline_cache_fields(opts, solved, &recipe.layers, runtime)?;
        BuildResult::with_image(rootfs, recipe.with_config_fields(fields))
    } else {
        BuildResult::new(rootfs)
    };
    let cx = ExportContext {
        store,
        worker: &solved.worker,
        client,
        runtime: runtime.handle(),
        source_date_epoch: sde,
    };
    let mut made = None;
    for e in exporters {
        let report = e.export(&cx, &result)?;
        if report.image.is_some() {
            made = report.image;
        }
    }
    Ok(made)
}

/// Registry bytes moved by this build.
struct Moved {
    downloaded: u64,
    uploaded: u64,
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn write_metadata(
    path: &Path,
    image: Option<&StoredImage>,
    progress: &Progress,
    moved: &Moved,
) -> anyhow::Result<()> {
    let mut v = json!({
        "kiln.steps": progress.outcomes(),
        "kiln.bytes_downloaded": moved.downloaded,
        "kiln.bytes_uploaded": moved.uploaded,
    });
    if let Some(img) = image {
        v["containerimage.digest"] = json!(img.manifest.digest.to_string());
        v["containerimage.config.digest"] = json!(img.config.digest.to_string());
        v["containerimage.descriptor"] = serde_json::to_value(img.manifest.descriptor())?;
    }
    let text = serde_json::to_vec_pretty(&v)?;
    kiln_build::export::write_file_atomic(path, &text)
        .with_context(|| format!("writing --metadata-file {}", path.display()))
}

/// Cancels a registry client and waits (briefly) for its blocking calls when dropped.
struct ClientShutdown(RegistryClient);

impl Drop for ClientShutdown {
    fn drop(&mut self) {
        if !self.0.shutdown(std::time::Duration::from_secs(10)) {
            eprintln!("kiln: warning: registry requests were still under way at exit");
        }
    }
}

/// Waits for Ctrl-C or SIGTERM, then cancels `client`'s requests and exits with 130 or 143.
async fn exit_on_signal(client: RegistryClient) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let (name, code) = tokio::select! {
        r = tokio::signal::ctrl_c() => match r {
            Ok(()) => ("Ctrl-C", 130),
            Err(_) => return,
        },
        Some(()) = async {
            match term.as_mut() {
                Some(t) => t.recv().await,
                None => std::future::pending().await,
            }
        } => ("SIGTERM", 143),
    };
    client.cancel();
    eprintln!("kiln: cancelled ({name})");
    std::process::exit(code);
}

/// A registry client; hosts of outputs with `registry.insecure=true` speak plain HTTP.
fn registry_client(
    opts: &BuildOptions,
    exporters: &[Box<dyn Exporter>],
) -> anyhow::Result<RegistryClient> {
    // Image names of outputs with `registry.insecure=true`, and cache refs marked
    // `registry.insecure=true` (or `insecure=true`).
    let outputs = exporters.iter().flat_map(|e| e.insecure_names().iter());
    let caches = opts
        .cache_exports
        .iter()
        .map(|c| (&c.reference, &c.attrs))
        .chain(opts.cache_imports.iter().map(|c| (&c.reference, &c.attrs)))
        .filter(|(_, attrs)| {
            ["registry.insecure", "insecure"]
                .iter()
                .any(|k| attrs.get(*k).is_some_and(|v| v == "true"))
        })
        .filter_map(|(reference, _)| reference.as_ref());
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
    RegistryClient::new(config).context("setting up the registry client")
}

/// Records the build in the state dir's history and writes `--report` / `--trace`. A history
/// that cannot be written is a warning: it must never fail a build that succeeded.
fn save_history(
    globals: &Globals,
    recorder: &Recorder,
    result: Result<(), String>,
    cancelled: bool,
    reports: &Reports,
) {
    let record = recorder.finish(result, cancelled);
    if kiln_history::otlp_configured() {
        if let Err(e) = kiln_history::export_otlp(&record, None) {
            eprintln!("kiln: warning: could not export the build trace over OTLP: {e}");
        }
    }
    if let Err(e) = HistoryStore::new(&globals.root).save(&record) {
        eprintln!("kiln: warning: could not record the build in history: {e}");
    }
    if let Some(p) = &reports.report {
        match kiln_history::write_report(&record, p) {
            Ok(()) => eprintln!("timeline report: {}", p.display()),
            Err(e) => eprintln!(
                "kiln: warning: could not write the report {}: {e}",
                p.display()
            ),
        }
    }
    if let Some(p) = &reports.trace {
        if let Err(e) = kiln_history::write_trace(&record, p) {
            eprintln!(
                "kiln: warning: could not write the trace {}: {e}",
                p.display()
            );
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
