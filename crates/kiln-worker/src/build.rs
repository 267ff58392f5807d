//! One `kiln build`, as a library call: lower the Dockerfile (resolving base images once),
//! then solve the target stage on the [`Worker`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kiln_dockerfile::Dockerfile;
use kiln_graph::options::{NamedContext, SecretSource};
use kiln_graph::{
    BuildGraph, BuildOptions, ImageConfigResolver, Platform, ResolveError, ResolvedConfig,
};
use kiln_solver::{EventSink, Solver, SolverOptions};
use kiln_store::Store;

use crate::engine::{solver_graph, ContextFilterFactory, Rootfs, Value, Worker, WorkerConfig};
use crate::error::WorkerError;
use crate::platform_graph::{join_platform_graphs, JoinedGraph, PlatformView};
use crate::provider::{BaseImage, ImageProvider};

/// Why a build failed before or while solving.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The Dockerfile could not be lowered (rendered with file:line:col by the caller).
    #[error(transparent)]
    Frontend(#[from] kiln_graph::FrontendError),
    /// A step failed, or the build was cancelled.
    #[error(transparent)]
    Solve(#[from] kiln_solver::SolveError),
    /// Setting the build up failed.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// A secret's source could not be read.
    #[error("--secret id={id}: {message}")]
    Secret { id: String, message: String },
    /// An `--ssh` agent could not be reached or started.
    #[error(transparent)]
    Ssh(#[from] crate::ssh::SshError),
    /// RUN steps of a platform this machine can neither run natively nor emulate; checked
    /// before any step runs. `fix` is the exact command that makes it runnable.
    #[error("cannot run RUN steps for {platform} ({step}): {fix}")]
    Emulation {
        /// The platform, e.g. `linux/arm64`.
        platform: String,
        /// The first step that needs it, e.g. `[linux/arm64 stage-1 2/3] RUN uname -m`.
        step: String,
        /// What to run to make the platform runnable (from `kiln debug platforms`' probe).
        fix: String,
    },
}

/// Resolves each base image once per build and serves both the frontend (configs) and the
/// engine (layers), so both see the same digest.
pub struct ResolvedImages {
    provider: Arc<dyn ImageProvider>,
    memo: Mutex<HashMap<(String, String), BaseImage>>,
}

impl ResolvedImages {
    /// Wraps `provider`.
    pub fn new(provider: Arc<dyn ImageProvider>) -> Self {
        ResolvedImages {
            provider,
            memo: Mutex::default(),
        }
    }
}

impl ImageProvider for ResolvedImages {
    fn resolve(&self, reference: &str, platform: &Platform) -> Result<BaseImage, WorkerError> {
        let key = (reference.to_owned(), platform.to_string());
        if let Some(b) = self.memo.lock().expect("image memo").get(&key) {
            return Ok(b.clone());
        }
        // `FROM` a named context given as `oci-layout://`: the frontend asks for its config
        // under this reference (see `sources::layout_reference`).
        let b = match crate::sources::parse_layout_reference(reference) {
            Some((path, r)) => crate::sources::resolve_layout(&path, &r, platform)?,
            None => self.provider.resolve(reference, platform)?,
        };
        self.memo.lock().expect("image memo").insert(key, b.clone());
        Ok(b)
    }
}

impl ImageConfigResolver for ResolvedImages {
    fn resolve_image_config(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<ResolvedConfig, ResolveError> {
        match ImageProvider::resolve(self, reference, platform) {
            Ok(b) => Ok(ResolvedConfig {
                digest: Some(b.manifest_digest.to_string()),
                config: b.config,
            }),
            Err(e) => Err(ResolveError {
                reference: reference.to_owned(),
                platform: Box::new(platform.clone()),
                reason: e.to_string(),
            }),
        }
    }
}

/// What a build needs besides its options.
pub struct BuildInputs<'a> {
    /// The parsed Dockerfile.
    pub dockerfile: &'a Dockerfile,
    /// The main context's `.dockerignore` patterns, in file order.
    pub dockerignore: &'a [String],
    /// Where base images come from.
    pub images: Arc<dyn ImageProvider>,
    /// Builds `.dockerignore` filters.
    pub context_filter: ContextFilterFactory,
    /// `SOURCE_DATE_EPOCH`, for reproducible layers and timestamps.
    pub source_date_epoch: Option<i64>,
    /// The compression new layers are made with (the first output's `compression=`);
    /// `None` is gzip.
    pub compression: Option<kiln_oci::compression::Compression>,
}

/// A lowered build, ready to solve.
pub struct PlannedBuild {
    /// The build graph: every target platform's steps joined (shared steps once), with the
    /// first platform's stages and target.
    pub graph: Arc<BuildGraph>,
    /// Each target platform's view of `graph`, in request order (one for a single-platform
    /// build; the host's when no platform was asked for).
    pub platforms: Vec<PlatformView>,
    /// By vertex index: the platform a step builds for (`None` for shared sources).
    pub step_platforms: Vec<Option<Platform>>,
    worker: Worker,
    images: Arc<ResolvedImages>,
    options: SolverOptions,
}

/// One target platform's result.
pub struct SolvedPlatform {
    /// The target platform.
    pub platform: Platform,
    /// The joined build graph with this platform's stages and target.
    pub graph: Arc<BuildGraph>,
    /// This platform's target stage root filesystem (`None` for an empty `FROM scratch`).
    pub rootfs: Option<Arc<Rootfs>>,
}

/// The result of a solved build.
pub struct SolvedBuild {
    /// The build graph (the first platform's view: every platform's steps, the first
    /// platform's stages and target).
    pub graph: Arc<BuildGraph>,
    /// The first platform's target stage root filesystem (`None` for an empty `FROM scratch`
    /// stage).
    pub rootfs: Option<Arc<Rootfs>>,
    /// Every target platform's result, in request order (`platforms[0]` is `graph`/`rootfs`).
    pub platforms: Vec<SolvedPlatform>,
    /// By vertex index: the platform a step builds for (`None` for shared sources).
    pub step_platforms: Vec<Option<Platform>>,
    /// The worker, for exporters that need snapshots or blobs.
    pub worker: Worker,
    /// The solver, for cache keys of steps a hit made unnecessary (cache export).
    pub solver: Solver<Worker>,
}

/// Lowers the Dockerfile and sets up the worker. Blocking (base images are resolved here).
pub fn plan_build(
    store: Arc<Store>,
    opts: &BuildOptions,
    inputs: BuildInputs<'_>,
) -> Result<PlannedBuild, BuildError> {
    let images = Arc::new(ResolvedImages::new(inputs.images));
    let targets = if opts.platforms.is_empty() {
        vec![Platform::host()]
    } else {
        opts.platforms.clone()
    };
    // Lowered once per target platform (each with its own TARGET* args), then joined.
    let mut lowered = Vec::with_capacity(targets.len());
    for platform in targets {
        let mut one = opts.clone();
        one.platforms = vec![platform.clone()];
        let graph = kiln_graph::lower(
            inputs.dockerfile,
            &one,
            inputs.dockerignore,
            images.as_ref(),
        )?;
        lowered.push((platform, graph));
    }
    let joined = join_platform_graphs(lowered);
    check_emulation(&joined, &kiln_exec::platforms::platform_support())?;
    let step_platforms = joined.step_platforms;
    let platforms = joined.platforms;
    let graph = platforms[0].graph.clone();

    let mut locals: BTreeMap<String, PathBuf> = opts.locals.clone();
    locals.insert("context".into(), opts.context.clone());
    if let Some(dir) = opts.dockerfile.parent() {
        locals.insert("dockerfile".into(), dir.to_owned());
    }
    for (name, c) in &opts.named_contexts {
        if let NamedContext::Local { path } = c {
            locals.insert(name.clone(), path.clone());
        }
    }
    let mut secrets = BTreeMap::new();
    for s in &opts.secrets {
        let value = match &s.source {
            SecretSource::File(p) => std::fs::read(p).map_err(|e| BuildError::Secret {
                id: s.id.clone(),
                message: format!("reading {}: {e}", p.display()),
            })?,
            SecretSource::Env(var) => match (std::env::var_os(var), &s.or_file) {
                (Some(v), _) => v.into_encoded_bytes(),
                // A bare `id=ID`: the file `ID` when no such variable is set (buildx's rule).
                (None, Some(p)) => std::fs::read(p).map_err(|e| BuildError::Secret {
                    id: s.id.clone(),
                    message: format!(
                        "no environment variable {var} is set, and reading the file {}: {e}",
                        p.display()
                    ),
                })?,
                (None, None) => {
                    return Err(BuildError::Secret {
                        id: s.id.clone(),
                        message: format!("environment variable {var} is not set"),
                    })
                }
            },
        };
        secrets.insert(s.id.clone(), value);
    }
    let config = WorkerConfig {
        locals,
        secrets,
        ssh: crate::ssh::start_agents(&opts.ssh)?,
        source_date_epoch: inputs.source_date_epoch,
        compression: inputs.compression,
    };
    check_ulimits(opts)?;
    let executor = kiln_exec::NamespaceExecutor::new()
        .with_run_cgroups(opts.pids_limit, opts.cgroup_parent.as_deref())
        .map_err(|e| {
            let flag = match (opts.pids_limit, &opts.cgroup_parent) {
                (Some(_), Some(_)) => "--pids-limit/--cgroup-parent",
                (None, Some(_)) => "--cgroup-parent",
                _ => "--pids-limit",
            };
            WorkerError::Unsupported(format!("{flag}: {e}"))
        })?;
    let isolated_runs = graph.vertices.iter().any(|v| {
        matches!(&v.op, kiln_graph::Op::Exec(e) if e.network == kiln_graph::graph::NetworkMode::Default)
    });
    if isolated_runs && !chroot_isolation() {
        // The first RUN then finds its network ready instead of waiting for slirp4netns.
        executor.prewarm_network();
    }
    let executor: Arc<dyn kiln_exec::Executor> = if chroot_isolation() {
        if opts.pids_limit.is_some() || opts.cgroup_parent.is_some() {
            return Err(WorkerError::Unsupported(
                "--pids-limit/--cgroup-parent with chroot isolation (its steps get no cgroup)"
                    .into(),
            )
            .into());
        }
        if store.snapshotter_kind() == kiln_store::SnapshotterKind::Copy
            && holds_overlay_snapshots(store.root())
        {
            return Err(WorkerError::Unsupported(format!(
                "chroot isolation: the state dir {} holds overlayfs snapshots, which cannot be \
                 mounted here; use a separate --root (KILN_ROOT) for chroot builds",
                store.root().display()
            ))
            .into());
        }
        Arc::new(kiln_exec::ChrootExecutor::new())
    } else {
        Arc::new(executor)
    };
    let worker = Worker::new(
        store,
        executor,
        images.clone(),
        config,
        inputs.context_filter,
    )?;
    // `--no-cache-filter STAGE` rebuilds the stage and everything built on it: a mark on a
    // step spreads to every step that depends on it (inputs precede their users).
    let mut no_cache: HashSet<usize> = HashSet::new();
    for (i, v) in graph.vertices.iter().enumerate() {
        if v.meta.ignore_cache || v.inputs.iter().any(|inp| no_cache.contains(&inp.index())) {
            no_cache.insert(i);
        }
    }
    let options = SolverOptions {
        max_parallelism: opts.max_parallelism,
        no_cache,
    };
    Ok(PlannedBuild {
        graph,
        platforms,
        step_platforms,
        worker,
        images,
        options,
    })
}

/// Refuses a build with RUN steps for a platform `support` says cannot run here (neither
/// native nor emulated by a registered binfmt_misc handler), before any step runs.
pub fn check_emulation(
    joined: &JoinedGraph,
    support: &kiln_exec::platforms::PlatformSupport,
) -> Result<(), BuildError> {
    let mut checked: HashSet<String> = HashSet::new();
    for (v, platform) in joined.vertices().iter().zip(&joined.step_platforms) {
        let (kiln_graph::Op::Exec(_), Some(platform)) = (&v.op, platform) else {
            continue;
        };
        if !checked.insert(platform.to_string()) {
            continue;
        }
        if let Err(fix) = support.can_run(platform) {
            return Err(BuildError::Emulation {
                platform: platform.to_string(),
                step: v.meta.description.clone(),
                fix,
            });
        }
    }
    Ok(())
}

/// True when a state dir holds snapshots the overlayfs snapshotter made (each keeps its
/// mount point `rootfs/`): the copying snapshotter would take their upper dirs for full trees.
fn holds_overlay_snapshots(root: &std::path::Path) -> bool {
    std::fs::read_dir(root.join("snapshots"))
        .map(|entries| entries.flatten().any(|e| e.path().join("rootfs").is_dir()))
        .unwrap_or(false)
}

/// True when `kiln` chose chroot isolation for this run (`kiln_exec::probe::choose_isolation`
/// records it in `KILN_ISOLATION`): RUN steps then use [`kiln_exec::ChrootExecutor`].
fn chroot_isolation() -> bool {
    kiln_exec::probe::Isolation::from_env() == Ok(kiln_exec::probe::Isolation::Chroot)
}

/// Refuses a `--ulimit` whose hard limit is above kiln's own: a step cannot get more than
/// the process that starts it has.
fn check_ulimits(opts: &BuildOptions) -> Result<(), WorkerError> {
    for u in &opts.ulimits {
        let resource = kiln_exec::RlimitResource::from_docker_name(&u.name).ok_or_else(|| {
            WorkerError::Unsupported(format!("--ulimit {}: unknown limit", u.name))
        })?;
        if let Some(max) = resource.current_hard_limit() {
            if u.hard > max {
                let shown = |v: u64| {
                    if v == u64::MAX {
                        "unlimited".to_string()
                    } else {
                        v.to_string()
                    }
                };
                return Err(WorkerError::Unsupported(format!(
                    "--ulimit {}={}:{}: the hard limit {} is above kiln's own hard limit {} for \
                     {}; ask for at most {} (or raise kiln's limit before the build)",
                    u.name,
                    shown(u.soft),
                    shown(u.hard),
                    shown(u.hard),
                    shown(max),
                    u.name,
                    shown(max),
                )));
            }
        }
    }
    Ok(())
}

impl PlannedBuild {
    /// The worker that will run the build (to add imported caches, or hash contexts early).
    pub fn worker(&self) -> &Worker {
        &self.worker
    }

    /// Solves the target stage, reporting progress to `events`. `on_solver` gets the solver
    /// first (e.g. to cancel it on Ctrl-C).
    pub async fn solve(
        self,
        events: Arc<dyn EventSink>,
        on_solver: impl FnOnce(&Solver<Worker>),
    ) -> Result<SolvedBuild, BuildError> {
        let graph = solver_graph(&self.graph, &self.step_platforms)?;
        let solver = Solver::new(Arc::new(self.worker.clone()), graph, self.options, events);
        on_solver(&solver);
        // Every platform's target at once: steps they share run once, the rest in parallel.
        let targets = self.platforms.iter().map(|view| {
            let solver = solver.clone();
            let root = view.graph.target_stage().root;
            async move {
                let Some(root) = root else {
                    return Ok(None);
                };
                match solver.solve(root.index()).await? {
                    Value::Fs(fs) => Ok(Some(fs)),
                    Value::Context(_) => Err(BuildError::from(WorkerError::Internal(
                        "target stage is a local context".into(),
                    ))),
                }
            }
        });
        let roots: Vec<Option<Arc<Rootfs>>> = futures::future::try_join_all(targets).await?;
        drop(self.images);
        let platforms: Vec<SolvedPlatform> = self
            .platforms
            .into_iter()
            .zip(roots)
            .map(|(view, rootfs)| SolvedPlatform {
                platform: view.platform,
                graph: view.graph,
                rootfs,
            })
            .collect();
        Ok(SolvedBuild {
            graph: self.graph,
            rootfs: platforms.first().and_then(|p| p.rootfs.clone()),
            platforms,
            step_platforms: self.step_platforms,
            worker: self.worker,
            solver,
        })
    }
}
