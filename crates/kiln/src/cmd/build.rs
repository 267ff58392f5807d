//! `kiln build`: both buildctl's and docker-buildx's flags parse into one
//! [`kiln_graph::BuildOptions`] and then a [`BuildRequest`], which [`kiln_build::run`] runs
//! while [`Progress`] renders its events. Subrequests (`--call`, `--check`) and `--dry-run`
//! are answered by the frontend without running anything.

use std::process::ExitCode;

use anyhow::Context;
use kiln_build::{
    BuildEvent, BuildFailure, BuildRequest, CancelHandle, CancelOutcome, EventSink, ExportFlags,
    Exports, Interruption,
};

use kiln_graph::options::OutputFormat;
use kiln_graph::{BuildOptions, OfflineResolver, RawBuildFlags};

use super::print_stdout;
use crate::progress::Progress;
use crate::Globals;

/// Arguments of `kiln build`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    kiln build . --target test -t reg.local:5000/app:test --push\n  \
    kiln build --frontend dockerfile.v0 --local context=. --local dockerfile=. --opt target=test\n  \
    kiln build . --call targets\n  \
    kiln build . --dry-run=json")]
pub struct BuildArgs {
    /// Build context directory (docker-buildx spelling)
    #[arg(value_name = "CONTEXT")]
    context: Option<String>,

    /// Frontend to use; only `dockerfile.v0` (buildctl spelling)
    #[arg(long, value_name = "NAME", help_heading = "buildctl")]
    frontend: Option<String>,
    /// Local directory by name: `context=DIR`, `dockerfile=DIR`, or any name for named contexts
    #[arg(long = "local", value_name = "NAME=DIR", help_heading = "buildctl")]
    locals: Vec<String>,
    /// OCI layout store by name, for --opt context:X=oci-layout://NAME@DIGEST (or :TAG)
    #[arg(
        long = "oci-layout",
        value_name = "NAME=DIR",
        help_heading = "buildctl"
    )]
    oci_layouts: Vec<String>,
    /// Frontend option: target=, filename=, platform=, no-cache=, build-arg:K=V, label:K=V, context:NAME=V
    #[arg(long = "opt", value_name = "KEY=VALUE", help_heading = "buildctl")]
    opts: Vec<String>,
    /// Export the build cache: type=registry|local|inline,ref=..,mode=min|max,...
    #[arg(long = "export-cache", value_name = "SPEC", help_heading = "buildctl")]
    export_cache: Vec<String>,
    /// Import a build cache: type=registry|local,ref=..|src=..
    #[arg(long = "import-cache", value_name = "SPEC", help_heading = "buildctl")]
    import_cache: Vec<String>,

    /// Dockerfile path (default: CONTEXT/Dockerfile)
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    file: Option<String>,
    /// Stage to build (default: the last one)
    #[arg(long, value_name = "STAGE")]
    target: Option<String>,
    /// Build-time variable; a bare NAME takes its value from the environment
    #[arg(long = "build-arg", value_name = "NAME[=VALUE]")]
    build_args: Vec<String>,
    /// Image name for the result (repeatable)
    #[arg(short = 't', long = "tag", value_name = "REF")]
    tags: Vec<String>,
    /// Always take base images from their registry, never a same-named local image
    /// (`--opt image-resolve-mode=pull` in buildctl's spelling)
    #[arg(long)]
    pull: bool,
    /// Push the image to its registry (shorthand for --output type=registry)
    #[arg(long)]
    push: bool,
    /// Output: type=image|registry|oci|docker|local|tar,k=v,... or a directory, or `-`
    #[arg(short = 'o', long = "output", value_name = "SPEC")]
    outputs: Vec<String>,
    // --load (buildx): the image into the local Docker daemon or podman store.
    /// Load the image into the local Docker daemon, else podman's store (shorthand for
    /// --output type=docker)
    #[arg(long)]
    load: bool,
    /// Import a build cache (same as --import-cache)
    #[arg(long = "cache-from", value_name = "SPEC")]
    cache_from: Vec<String>,
    /// Export the build cache (same as --export-cache)
    #[arg(long = "cache-to", value_name = "SPEC")]
    cache_to: Vec<String>,
    /// Do not use the cache for any step
    #[arg(long = "no-cache")]
    no_cache: bool,
    /// Do not use the cache for the steps of these stages
    #[arg(long = "no-cache-filter", value_name = "STAGE")]
    no_cache_filter: Vec<String>,
    /// Extra named context: NAME=DIR, NAME=docker-image://REF, NAME=oci-layout://PATH[:TAG|@DIGEST]
    #[arg(long = "build-context", value_name = "NAME=VALUE")]
    build_contexts: Vec<String>,
    /// Secret for RUN --mount=type=secret: id=ID,src=PATH or id=ID,env=VAR
    #[arg(long = "secret", value_name = "SPEC")]
    secrets: Vec<String>,
    /// Answer a subrequest instead of building: targets, outline, check (add ,format=json)
    #[arg(long, value_name = "REQUEST")]
    call: Option<String>,
    /// Lint the Dockerfile (same as --call check)
    #[arg(long)]
    check: bool,
    /// Target platform(s), e.g. linux/amd64
    #[arg(long = "platform", value_name = "OS/ARCH[/VARIANT]")]
    platforms: Vec<String>,
    /// Print the steps the target needs, without running them (`--dry-run=json` for JSON)
    #[arg(long = "dry-run", value_name = "FORMAT", num_args = 0..=1, require_equals = true, default_missing_value = "text")]
    dry_run: Option<String>,

    /// Progress display: auto, tty, plain, rawjson, quiet
    #[arg(long, value_name = "MODE")]
    progress: Option<String>,
    /// Write build result metadata (image digest, ...) as JSON to FILE
    #[arg(long = "metadata-file", value_name = "FILE")]
    metadata_file: Option<String>,
    /// Run at most N steps at once (default: no bound, as BuildKit; a machine-wide setting
    /// goes in KILN_MAX_PARALLELISM)
    #[arg(
        long = "max-parallelism",
        value_name = "N",
        env = "KILN_MAX_PARALLELISM"
    )]
    max_parallelism: Option<String>,
    /// Network of RUN steps that name none: default (their own namespace, outbound access,
    /// the host's loopback unreachable), none, or host (needs --allow network.host)
    #[arg(long, value_name = "MODE")]
    network: Option<String>,
    /// Grant an entitlement: network.host (RUN --network=host, --network host),
    /// security.insecure
    #[arg(long = "allow", value_name = "ENTITLEMENT")]
    allow: Vec<String>,
    /// At most N processes and threads per RUN step (cgroup pids controller; default: no
    /// limit, as BuildKit)
    #[arg(long = "pids-limit", value_name = "N", env = "KILN_PIDS_LIMIT")]
    pids_limit: Option<String>,
    /// Write a timeline report of the build (one self-contained HTML page) to FILE
    #[arg(long, value_name = "FILE.html")]
    report: Option<std::path::PathBuf>,
    /// Write the build's spans as Chrome trace-event JSON (Perfetto, chrome://tracing) to FILE
    #[arg(long, value_name = "FILE.json")]
    trace: Option<std::path::PathBuf>,
}

impl BuildArgs {
    /// Validates the flags, both spellings: the frontend and run settings, then where the
    /// results and caches go.
    pub fn to_options(&self) -> anyhow::Result<(BuildOptions, Exports)> {
        let build_args = self
            .build_args
            .iter()
            .filter_map(|b| {
                if b.contains('=') {
                    return Some(b.clone());
                }
                // docker-buildx: `--build-arg NAME` passes NAME from the environment, if set.
                std::env::var(b).ok().map(|v| format!("{b}={v}"))
            })
            .collect();
        let raw = RawBuildFlags {
            context: self.context.clone(),
            frontend: self.frontend.clone(),
            locals: self.locals.clone(),
            oci_layouts: self.oci_layouts.clone(),
            opts: self.opts.clone(),
            file: self.file.clone(),
            target: self.target.clone(),
            build_args,
            no_cache: self.no_cache,
            no_cache_filter: self.no_cache_filter.clone(),
            build_contexts: self.build_contexts.clone(),
            secrets: self.secrets.clone(),
            call: self.call.clone(),
            check: self.check,
            platforms: self.platforms.clone(),
            dry_run: self.dry_run.clone(),
            progress: self.progress.clone(),
            metadata_file: self.metadata_file.clone(),
            max_parallelism: self.max_parallelism.clone(),
            pull: self.pull,
            network: self.network.clone(),
            allow: self.allow.clone(),
            pids_limit: self.pids_limit.clone(),
        };
        let options = BuildOptions::from_flags(&raw)?;
        let exports = ExportFlags {
            tags: self.tags.clone(),
            push: self.push,
            outputs: if self.load {
                kiln_build::export::outputs_with_load(&self.outputs, self.push)
            } else {
                self.outputs.clone()
            },
            cache_to: tagged("--export-cache", &self.export_cache)
                .chain(tagged("--cache-to", &self.cache_to))
                .collect(),
            cache_from: tagged("--import-cache", &self.import_cache)
                .chain(tagged("--cache-from", &self.cache_from))
                .collect(),
        }
        .parse()?;
        Ok((options, exports))
    }
}

fn tagged<'a>(flag: &'static str, v: &'a [String]) -> impl Iterator<Item = (String, String)> + 'a {
    v.iter().map(move |s| (flag.to_string(), s.clone()))
}

/// Runs `kiln build`.
pub fn run(args: BuildArgs, globals: &Globals) -> anyhow::Result<ExitCode> {
    let (opts, exports) = args.to_options()?;
    let file_label = opts.dockerfile.display().to_string();
    let source = std::fs::read_to_string(&opts.dockerfile).map_err(|e| {
        anyhow::anyhow!("cannot read the Dockerfile {file_label}: {e} (use -f/--file or --local dockerfile=DIR)")
    })?;
    let df = match kiln_dockerfile::parse(&source) {
        Ok(df) => df,
        Err(e) => {
            eprintln!("{}", e.render(&file_label, &source));
            return Ok(ExitCode::from(1));
        }
    };
    let dockerignore = read_dockerignore(&opts)?;

    if let Some(call) = opts.call {
        return super::build_call::answer(call, &df, &source, &file_label, &opts, &dockerignore);
    }
    let graph = match kiln_graph::lower(&df, &opts, &dockerignore, &OfflineResolver) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("{}", e.render(&file_label, &source));
            return Ok(ExitCode::from(1));
        }
    };
    // BuildKit lints while it converts the Dockerfile: a build reports the warnings of the
    // stages it builds, and `# check=error=true` stops it before any step runs
    // (a dry run shows what the build would do, so it stops there too).
    if let Some(code) = super::build_call::lint_before_build(&df, &opts, &dockerignore, &file_label)
    {
        return Ok(code);
    }
    if let Some(format) = opts.dry_run {
        let plan = kiln_graph::plan(&graph);
        match format {
            OutputFormat::Json => {
                print_stdout(&format!("{}\n", serde_json::to_string_pretty(&plan)?))?
            }
            OutputFormat::Text => print_stdout(&plan.to_text())?,
        }
        return Ok(ExitCode::SUCCESS);
    }
    let progress = Progress::new(opts.progress);
    for warning in exports.warnings {
        progress.event(BuildEvent::Warning(warning));
    }
    let mut request = BuildRequest::new(opts, df, globals.root.clone());
    request.exporters = exports.exporters;
    request.cache_imports = exports.cache_imports;
    request.cache_exports = exports.cache_exports;
    request.dockerfile_source = source.clone();
    request.dockerfile_label = file_label.clone();
    request.dockerignore = dockerignore;
    request.report = args.report.clone();
    request.trace = args.trace.clone();
    request.command_line = std::env::args().collect();
    watch_signals(request.cancel.clone())?;
    match kiln_build::run(request, &progress) {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(BuildFailure::Frontend(e)) => {
            eprintln!("{}", e.render(&file_label, &source));
            Ok(ExitCode::from(1))
        }
        // Reported as it happened: the error, the summary, the history record.
        Err(BuildFailure::Steps { interrupted, .. }) => Ok(ExitCode::from(
            interrupted.map(|i| signal_name_and_code(i).1).unwrap_or(1),
        )),
        Err(BuildFailure::Session(e)) => Err((*e).into()),
    }
}

/// How a shell names an interruption, and the exit code it reports for it (128 + signal).
fn signal_name_and_code(why: Interruption) -> (&'static str, u8) {
    match why {
        Interruption::Interrupt => ("Ctrl-C", 130),
        Interruption::Terminate => ("SIGTERM", 143),
    }
}

/// Turns Ctrl-C and SIGTERM (as CI runners send when a job is cancelled) into cancelling the
/// build. Before the steps run, and once they are over (exporting, pushing), kiln stops at
/// once: blobs and records are written aside and renamed in, so a stop leaves only what a
/// killed process does (its lease, maybe a temp file), which `kiln debug fsck --repair`
/// clears. While they run, their containers are killed, their snapshots removed and the lease
/// released before kiln exits; later signals only say that this is under way.
fn watch_signals(cancel: CancelHandle) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal handler")?;
    // Listening starts here, before the build: no signal falls in between and is lost.
    let (mut int, mut term) = {
        let _entered = runtime.enter();
        (
            signal(SignalKind::interrupt()).context("listening for Ctrl-C")?,
            signal(SignalKind::terminate()).context("listening for SIGTERM")?,
        )
    };
    std::thread::spawn(move || {
        runtime.block_on(async move {
            loop {
                let why = tokio::select! {
                    Some(()) = int.recv() => Interruption::Interrupt,
                    Some(()) = term.recv() => Interruption::Terminate,
                    else => return,
                };
                let (name, code) = signal_name_and_code(why);
                match cancel.cancel(why) {
                    CancelOutcome::StopNow => {
                        eprintln!("kiln: cancelled ({name})");
                        std::process::exit(code.into());
                    }
                    CancelOutcome::StopWhileExporting => {
                        eprintln!("kiln: interrupted while exporting ({name})");
                        std::process::exit(code.into());
                    }
                    CancelOutcome::Cancelling => eprintln!("kiln: cancelling the build ({name})"),
                    CancelOutcome::StillCancelling => eprintln!(
                        "kiln: still cancelling: stopping containers and removing their snapshots"
                    ),
                }
            }
        })
    });
    Ok(())
}

/// `.dockerignore` patterns: `<Dockerfile>.dockerignore` beside the Dockerfile wins over the
/// context's `.dockerignore`, as in BuildKit. Comments and blank lines are dropped.
fn read_dockerignore(opts: &BuildOptions) -> anyhow::Result<Vec<String>> {
    let beside = {
        let mut p = opts.dockerfile.clone().into_os_string();
        p.push(".dockerignore");
        std::path::PathBuf::from(p)
    };
    for p in [beside, opts.context.join(".dockerignore")] {
        match std::fs::read_to_string(&p) {
            Ok(text) => {
                return Ok(text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from)
                    .collect())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => anyhow::bail!("cannot read {}: {e}", p.display()),
        }
    }
    Ok(Vec::new())
}
