//! `kiln build`: both buildctl's and docker-buildx's flags parse into one
//! [`kiln_graph::BuildOptions`] and then a [`BuildRequest`], which [`kiln_build::run`] runs
//! while [`Progress`] renders its events. Subrequests (`--call`, `--check`) and `--dry-run`
//! are answered by the frontend without running anything.

use std::process::ExitCode;

use anyhow::Context;
use kiln_build::attest::{Annotation, AttestFlags, AttestRequest};
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
    /// Export the build cache: type=registry|local|inline|s3,ref=..,mode=min|max,...
    #[arg(long = "export-cache", value_name = "SPEC", help_heading = "buildctl")]
    export_cache: Vec<String>,
    /// Import a build cache: type=registry|local|s3,ref=..|src=..|bucket=..
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
    /// Secret for RUN --mount=type=secret: id=ID,src=PATH, id=ID,env=VAR,
    /// type=file|env,id=ID,..., or id=ID (the variable ID when set, else the file ID)
    #[arg(long = "secret", value_name = "SPEC")]
    secrets: Vec<String>,
    // --ssh (RUN --mount=type=ssh)
    /// SSH agent for RUN --mount=type=ssh: default (the agent of $SSH_AUTH_SOCK),
    /// ID=SOCKET, or ID=KEYFILE[,KEYFILE...] (kiln runs an agent holding them)
    #[arg(long = "ssh", value_name = "default|ID[=SOCKET|KEY[,KEY...]]")]
    ssh: Vec<String>,
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
    /// security.insecure (RUN --security=insecure)
    #[arg(long = "allow", value_name = "ENTITLEMENT")]
    allow: Vec<String>,
    /// At most N processes and threads per RUN step (cgroup pids controller; default: no
    /// limit, as BuildKit)
    #[arg(long = "pids-limit", value_name = "N", env = "KILN_PIDS_LIMIT")]
    pids_limit: Option<String>,
    /// How RUN steps are isolated: auto (namespaces where they can be made, else a chroot,
    /// announced; docker build's `default` means the same), namespaces, or chroot (steps share
    /// kiln's namespaces; docs/rootless.md)
    #[arg(long, value_name = "MODE", env = "KILN_ISOLATION")]
    pub isolation: Option<String>,
    /// Write a timeline report of the build (one self-contained HTML page) to FILE
    #[arg(long, value_name = "FILE.html")]
    report: Option<std::path::PathBuf>,
    /// Write the build's spans as Chrome trace-event JSON (Perfetto, chrome://tracing) to FILE
    #[arg(long, value_name = "FILE.json")]
    trace: Option<std::path::PathBuf>,

    // Attestations and annotations (docs/attestations.md).
    /// Add an annotation to the image (repeatable): [TYPE,...][[PLATFORM]]:KEY=VALUE, TYPE one
    /// of manifest (the default), manifest-descriptor, index, index-descriptor
    #[arg(long = "annotation", value_name = "[TYPE:]KEY=VALUE")]
    annotations: Vec<String>,
    /// Attach an attestation to pushed images and OCI layouts: type=provenance[,mode=min|max]
    /// or type=sbom (kiln's own scanner)
    #[arg(long = "attest", value_name = "SPEC")]
    attest: Vec<String>,
    /// Provenance attestation: true, false, or mode=min|max (default: mode=min when pushing;
    /// BUILDX_NO_DEFAULT_ATTESTATIONS=1 turns the default off)
    #[arg(long, value_name = "VALUE")]
    provenance: Option<String>,
    /// SBOM attestation: true or false (shorthand for --attest type=sbom)
    #[arg(long, value_name = "VALUE")]
    sbom: Option<String>,

    // ---- docker buildx build: image metadata, RUN settings, the image ID (bxflags) ----
    /// Set a label of the image: KEY=VALUE in its config (repeatable)
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Write the image ID (the config digest of the image made) to FILE
    #[arg(long, value_name = "FILE")]
    iidfile: Option<std::path::PathBuf>,
    /// Print no progress; print the image ID (config digest) on success
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Add NAME:IP (or NAME=IP, NAME=host-gateway) to RUN steps' /etc/hosts (repeatable)
    #[arg(long = "add-host", value_name = "NAME:IP")]
    add_hosts: Vec<String>,
    /// Size of /dev/shm in RUN steps: bytes or with a unit (64m, 1g); default 64m
    #[arg(long = "shm-size", value_name = "SIZE")]
    shm_size: Option<String>,
    /// Resource limit of RUN steps: NAME=SOFT[:HARD], e.g. nofile=1024:2048 (repeatable)
    #[arg(long = "ulimit", value_name = "NAME=SOFT[:HARD]")]
    ulimits: Vec<String>,
    /// Put RUN steps' cgroups under this cgroup (relative to the hierarchy's root)
    #[arg(long = "cgroup-parent", value_name = "CGROUP")]
    cgroup_parent: Option<String>,
    /// Builder to use; kiln has one builder and accepts any name
    #[arg(long, value_name = "NAME", env = "BUILDX_BUILDER")]
    builder: Option<String>,
    /// Debug logging (accepted for buildx compatibility)
    #[arg(short = 'D', long)]
    debug: bool,
    /// docker build's flags that buildx accepts and ignores (hidden there too)
    #[command(flatten)]
    ignored: IgnoredDockerBuildFlags,
}

/// `docker build` flags of the legacy builder that buildx takes and ignores, so command lines
/// written for `docker build` keep working; kiln ignores them as well.
#[derive(clap::Args, Debug, Default)]
pub struct IgnoredDockerBuildFlags {
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    compress: Option<String>,
    #[arg(long = "force-rm", hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    force_rm: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    rm: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    squash: Option<String>,
    #[arg(long = "disable-content-trust", hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    disable_content_trust: Option<String>,
    #[arg(long = "security-opt", hide = true)]
    security_opt: Vec<String>,
    #[arg(short = 'm', long, hide = true)]
    memory: Option<String>,
    #[arg(long = "memory-swap", hide = true)]
    memory_swap: Option<String>,
    #[arg(short = 'c', long = "cpu-shares", hide = true)]
    cpu_shares: Option<String>,
    #[arg(long = "cpu-period", hide = true)]
    cpu_period: Option<String>,
    #[arg(long = "cpu-quota", hide = true)]
    cpu_quota: Option<String>,
    #[arg(long = "cpuset-cpus", hide = true)]
    cpuset_cpus: Option<String>,
    #[arg(long = "cpuset-mems", hide = true)]
    cpuset_mems: Option<String>,
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
            // `attest:KIND=` options are attestations, read by `attachments`.
            opts: self
                .opts
                .iter()
                .filter(|o| !o.starts_with("attest:"))
                .cloned()
                .collect(),
            file: self.file.clone(),
            target: self.target.clone(),
            build_args,
            no_cache: self.no_cache,
            no_cache_filter: self.no_cache_filter.clone(),
            build_contexts: self.build_contexts.clone(),
            secrets: self.secrets.clone(),
            ssh: self.ssh.clone(),
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
            labels: self.labels.clone(),
            add_hosts: self.add_hosts.clone(),
            shm_size: self.shm_size.clone(),
            ulimits: self.ulimits.clone(),
            cgroup_parent: self.cgroup_parent.clone(),
        };
        let raw = self.quiet_progress(raw)?;
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

impl BuildArgs {
    /// The annotations (`--annotation`) and attestations (`--attest`, `--provenance`,
    /// `--sbom`, `--opt attest:KIND=`) of the build. buildx's default, a `mode=min`
    /// provenance, applies when the build pushes with buildx's spelling (`--push`, `--output
    /// type=registry`); buildctl's `type=image,push=true` gets none, as with buildctl.
    pub fn attachments(&self) -> anyhow::Result<(Vec<Annotation>, AttestRequest)> {
        let mut annotations = Vec::new();
        for a in &self.annotations {
            annotations.extend(kiln_build::attest::parse_annotation_flag(a)?);
        }
        let registry_output = self.outputs.iter().any(|o| {
            kiln_build::export::output_attrs("--output", o)
                .is_ok_and(|(kind, _)| kind == "registry")
        });
        let attestations = AttestFlags {
            attest: self.attest.clone(),
            provenance: self.provenance.clone(),
            sbom: self.sbom.clone(),
            opts: self
                .opts
                .iter()
                .filter(|o| o.starts_with("attest:"))
                .cloned()
                .collect(),
            default_provenance: self.push || registry_output,
        }
        .parse()?;
        Ok((annotations, attestations))
    }
}

impl BuildArgs {
    /// `-q/--quiet`: no progress (buildx refuses it with a progress mode that shows some).
    /// Without `--progress`, the mode comes from `BUILDKIT_PROGRESS`, as in buildx (`-q`
    /// wins over it).
    fn quiet_progress(&self, mut raw: RawBuildFlags) -> anyhow::Result<RawBuildFlags> {
        if raw.progress.is_none() && !self.quiet {
            if let Some(mode) = std::env::var("BUILDKIT_PROGRESS")
                .ok()
                .filter(|m| !m.is_empty())
            {
                if kiln_graph::options::ProgressMode::parse(&mode).is_none() {
                    anyhow::bail!(
                        "invalid value {mode:?} for BUILDKIT_PROGRESS: expected auto, tty, plain, \
                         rawjson or quiet"
                    );
                }
                raw.progress = Some(mode);
            }
        }
        if self.quiet {
            match raw.progress.as_deref() {
                None | Some("auto") | Some("quiet") => raw.progress = Some("quiet".into()),
                Some(other) => anyhow::bail!(
                    "invalid value for -q/--quiet: --progress={other} and --quiet cannot be used \
                     together (--quiet prints only the image ID)"
                ),
            }
        }
        Ok(raw)
    }

    /// `-` as CONTEXT (a Dockerfile on stdin, no context files) or `-f -` (the Dockerfile on
    /// stdin, the context a directory), as buildx: stdin is written to a private directory
    /// that lives as long as the returned guard, and the flags point there.
    fn take_stdin(&mut self) -> anyhow::Result<Option<tempfile::TempDir>> {
        let context_stdin = self.context.as_deref() == Some("-");
        let file_stdin = self.file.as_deref() == Some("-");
        if !context_stdin && !file_stdin {
            return Ok(None);
        }
        if context_stdin && file_stdin {
            anyhow::bail!(
                "invalid value \"-\" for -f/--file: the context is already read from stdin \
                 (CONTEXT `-`); give the Dockerfile on stdin once"
            );
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut bytes)
            .context("reading the Dockerfile from stdin")?;
        // A tar archive has `ustar` at offset 257; gzip starts with 1f 8b.
        if context_stdin
            && (bytes.get(257..262) == Some(b"ustar".as_slice())
                || bytes.starts_with(&[0x1f, 0x8b]))
        {
            anyhow::bail!(
                "invalid value \"-\" for CONTEXT: stdin holds an archive; kiln reads only a \
                 Dockerfile from stdin: extract the archive and pass its directory as CONTEXT"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("kiln-stdin-")
            .tempdir()
            .context("making a directory for the Dockerfile from stdin")?;
        let dockerfile = dir.path().join("Dockerfile");
        std::fs::write(&dockerfile, &bytes)
            .with_context(|| format!("writing {}", dockerfile.display()))?;
        self.file = Some(dockerfile.display().to_string());
        if context_stdin {
            // No context files: an empty directory of its own.
            let context = dir.path().join("context");
            std::fs::create_dir(&context)
                .with_context(|| format!("creating {}", context.display()))?;
            self.context = Some(context.display().to_string());
        }
        Ok(Some(dir))
    }
}

impl BuildArgs {
    /// A git URL as CONTEXT: the commit it names fetched into a private directory that lives
    /// as long as the returned guard, and the flags pointed there (a relative `-f` is inside
    /// the repository's context directory, as with buildx).
    fn take_git_context(&mut self) -> anyhow::Result<Option<tempfile::TempDir>> {
        let Some(arg) = self.context.clone() else {
            return Ok(None);
        };
        let Some(git) = super::git_context::GitContext::parse(&arg) else {
            return Ok(None);
        };
        let token = super::git_context::auth_token(&self.secrets)?;
        let keep_git_dir = self.build_args.iter().any(|b| {
            matches!(
                b.split_once('='),
                Some(("BUILDKIT_CONTEXT_KEEP_GIT_DIR", "1" | "true"))
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("kiln-git-context-")
            .tempdir()
            .context("making a directory for the git context")?;
        let context = git.fetch(&arg, dir.path(), token.as_deref(), keep_git_dir)?;
        if let Some(f) = &self.file {
            if std::path::Path::new(f).is_relative() {
                self.file = Some(context.join(f).display().to_string());
            }
        }
        self.context = Some(context.display().to_string());
        Ok(Some(dir))
    }
}

fn tagged<'a>(flag: &'static str, v: &'a [String]) -> impl Iterator<Item = (String, String)> + 'a {
    v.iter().map(move |s| (flag.to_string(), s.clone()))
}

/// Runs `kiln build`.
pub fn run(mut args: BuildArgs, globals: &Globals) -> anyhow::Result<ExitCode> {
    let stdin_dir = args.take_stdin()?;
    let git_dir = args.take_git_context()?;
    let (opts, exports) = args.to_options()?;
    let (annotations, attestations) = args.attachments()?;
    let file_label = if stdin_dir.is_some() && args.file.is_some() {
        // The Dockerfile came from stdin: name it as the user gave it.
        "-".to_string()
    } else {
        opts.dockerfile.display().to_string()
    };
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
    request.iidfile = args.iidfile.clone();
    request.report = args.report.clone();
    request.trace = args.trace.clone();
    // The build's record keeps the command line; cache credentials stay out of it.
    request.command_line = std::env::args()
        .map(|a| kiln_build::cache::redact_cache_flag_value(&a))
        .collect();
    request.annotations = annotations;
    request.attestations = attestations;
    watch_signals(request.cancel.clone())?;
    let outcome = kiln_build::run(request, &progress);
    drop((stdin_dir, git_dir));
    match outcome {
        Ok(outcome) => {
            if args.quiet {
                // buildx prints the image ID, or an empty line when no output made an image.
                print_stdout(&format!("{}\n", outcome.image_id().unwrap_or_default()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
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
