//! Build options: the frontend and run settings both command-line spellings (buildctl's and
//! docker-buildx's) parse into, plus the parsers for each flag value. Where results and caches
//! go (`--output`, `-t`/`--push`, the cache flags) is parsed by `kiln_build::request`. Pure
//! data: no filesystem access.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::graph::NetworkMode;
use crate::platform::Platform;
pub use crate::run_settings::{ExtraHost, HostAddr, Ulimit};

/// A flag value that could not be parsed; names the flag and the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value {value:?} for {flag}: {reason}")]
pub struct OptionError {
    /// The flag as the user spelled it, e.g. `--output` or `--opt`.
    pub flag: String,
    /// The offending value (or the offending part of it).
    pub value: String,
    /// What is wrong and what is accepted instead.
    pub reason: String,
}

impl OptionError {
    pub(crate) fn new(flag: &str, value: &str, reason: impl Into<String>) -> Self {
        Self {
            flag: flag.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// Everything `kiln build` was asked to do, whichever spelling was used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildOptions {
    /// The main build context directory.
    pub context: PathBuf,
    /// Path of the Dockerfile to read.
    pub dockerfile: PathBuf,
    /// The stage to build; `None` means the last stage.
    pub target: Option<String>,
    /// `--build-arg` / `--opt build-arg:` values, by name.
    pub build_args: BTreeMap<String, String>,
    /// `--opt label:K=V` labels added to the final image.
    pub labels: BTreeMap<String, String>,
    /// Target platforms; empty means the host platform.
    pub platforms: Vec<Platform>,
    /// Named build contexts (`--build-context`, `--opt context:NAME=`).
    pub named_contexts: BTreeMap<String, NamedContext>,
    /// Extra local directories by name (`--local NAME=DIR` other than context/dockerfile).
    pub locals: BTreeMap<String, PathBuf>,
    /// Which steps must ignore the cache.
    pub no_cache: NoCache,
    /// Secrets the build may mount.
    pub secrets: Vec<SecretSpec>,
    /// A subrequest (`--call`, `--check`) instead of a build.
    pub call: Option<CallRequest>,
    /// `--dry-run`: print the planned steps instead of running them.
    pub dry_run: Option<OutputFormat>,
    /// Progress display.
    pub progress: ProgressMode,
    /// File to write build metadata (image digest etc.) to.
    pub metadata_file: Option<PathBuf>,
    /// Upper bound on steps running at once; `None` = no bound.
    pub max_parallelism: Option<usize>,
    /// buildx `--pull`, buildctl `--opt image-resolve-mode=pull`: base images always come
    /// from their registry, never from images kept in the local store under the same name.
    pub pull: bool,
    /// `--network` (buildctl: `--opt force-network-mode=`): the network of `RUN` steps that
    /// give no `--network` of their own. `Default` is a namespace of the step's own with
    /// outbound access; `Host` needs [`Entitlements::network_host`].
    pub network: NetworkMode,
    /// `--allow`: what the build may do beyond the sandbox.
    pub entitlements: Entitlements,
    /// `--pids-limit` / `KILN_PIDS_LIMIT`: at most this many processes and threads per `RUN`
    /// step (cgroup pids controller); `None`, the default, sets no limit, as BuildKit.
    pub pids_limit: Option<u64>,
    /// buildx `--add-host`: entries added to every `RUN` step's `/etc/hosts`, in order.
    pub extra_hosts: Vec<ExtraHost>,
    /// buildx `--shm-size`: the size of `/dev/shm` in `RUN` steps, in bytes (`None`: 64 MiB,
    /// as Docker).
    pub shm_size: Option<u64>,
    /// buildx `--ulimit`: resource limits of `RUN` steps' processes.
    pub ulimits: Vec<Ulimit>,
    /// buildx `--cgroup-parent`: the cgroup (relative to the hierarchy's root) under which
    /// `RUN` steps' cgroups are made, when kiln makes them (`--pids-limit`).
    pub cgroup_parent: Option<String>,
}

/// Entitlements granted with `--allow` (BuildKit's names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entitlements {
    /// `network.host`: `RUN --network=host` and `--network host` may use the host's network,
    /// where every service on the runner's loopback is reachable.
    pub network_host: bool,
    /// `security.insecure`: accepted for buildx compatibility; kiln does not gate
    /// `RUN --security=insecure` on it yet.
    pub security_insecure: bool,
}

impl BuildOptions {
    /// Options for building `context` with `context/Dockerfile` and nothing else set.
    pub fn for_context(context: impl Into<PathBuf>) -> Self {
        let context = context.into();
        Self {
            dockerfile: context.join("Dockerfile"),
            context,
            target: None,
            build_args: BTreeMap::new(),
            labels: BTreeMap::new(),
            platforms: Vec::new(),
            named_contexts: BTreeMap::new(),
            locals: BTreeMap::new(),
            no_cache: NoCache::None,
            secrets: Vec::new(),
            call: None,
            dry_run: None,
            progress: ProgressMode::Auto,
            metadata_file: None,
            max_parallelism: None,
            pull: false,
            network: NetworkMode::Default,
            entitlements: Entitlements::default(),
            pids_limit: None,
            extra_hosts: Vec::new(),
            shm_size: None,
            ulimits: Vec::new(),
            cgroup_parent: None,
        }
    }
}

/// Raw flag values as the command line gave them; [`BuildOptions::from_flags`] validates them.
/// Repeatable flags are vectors in command-line order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawBuildFlags {
    /// buildx positional `CONTEXT`.
    pub context: Option<String>,
    /// buildctl `--frontend`.
    pub frontend: Option<String>,
    /// buildctl `--local NAME=DIR`.
    pub locals: Vec<String>,
    /// buildctl `--oci-layout NAME=DIR`: OCI layout stores that `--opt
    /// context:X=oci-layout://NAME@DIGEST` (or `:TAG`) refers to by name.
    pub oci_layouts: Vec<String>,
    /// buildctl `--opt K=V`.
    pub opts: Vec<String>,
    /// buildx `-f/--file`.
    pub file: Option<String>,
    /// buildx `--target`.
    pub target: Option<String>,
    /// buildx `--build-arg K=V`.
    pub build_args: Vec<String>,
    /// `--no-cache`.
    pub no_cache: bool,
    /// buildx `--no-cache-filter STAGE` (repeatable, comma lists allowed).
    pub no_cache_filter: Vec<String>,
    /// buildx `--build-context NAME=VALUE`.
    pub build_contexts: Vec<String>,
    /// buildx `--secret`.
    pub secrets: Vec<String>,
    /// buildx `--call`.
    pub call: Option<String>,
    /// buildx `--check`.
    pub check: bool,
    /// `--platform` (repeatable, comma lists allowed).
    pub platforms: Vec<String>,
    /// `--dry-run[=json]`: `Some("")` or `Some("text")` for text.
    pub dry_run: Option<String>,
    /// `--progress`.
    pub progress: Option<String>,
    /// `--metadata-file`.
    pub metadata_file: Option<String>,
    /// `--max-parallelism`.
    pub max_parallelism: Option<String>,
    /// buildx `--pull`.
    pub pull: bool,
    /// buildx `--network`: `default`, `none` or `host`.
    pub network: Option<String>,
    /// `--allow ENTITLEMENT` (repeatable, comma lists allowed).
    pub allow: Vec<String>,
    /// `--pids-limit N` / `KILN_PIDS_LIMIT`.
    pub pids_limit: Option<String>,
    /// buildx `--label K=V` (repeatable), into the image config's labels.
    pub labels: Vec<String>,
    /// buildx `--add-host NAME:IP` (repeatable, comma lists allowed).
    pub add_hosts: Vec<String>,
    /// buildx `--shm-size SIZE`.
    pub shm_size: Option<String>,
    /// buildx `--ulimit NAME=SOFT[:HARD]` (repeatable).
    pub ulimits: Vec<String>,
    /// buildx `--cgroup-parent PATH`.
    pub cgroup_parent: Option<String>,
}

impl BuildOptions {
    /// Validates raw flags into options. Every error names the flag and the bad value.
    pub fn from_flags(raw: &RawBuildFlags) -> Result<Self, OptionError> {
        if let Some(f) = &raw.frontend {
            if f != "dockerfile.v0" {
                return Err(OptionError::new(
                    "--frontend",
                    f,
                    "only the Dockerfile frontend is supported; use `dockerfile.v0`",
                ));
            }
        }
        if let Some(c) = &raw.context {
            refuse_remote_context(c)?;
        }
        let mut context: Option<PathBuf> = raw.context.as_deref().map(PathBuf::from);
        let mut dockerfile_dir: Option<PathBuf> = None;
        let mut locals = BTreeMap::new();
        for l in &raw.locals {
            let (name, dir) = split_kv("--local", l)?;
            if dir.is_empty() {
                return Err(OptionError::new(
                    "--local",
                    l,
                    "expected NAME=DIR with a directory",
                ));
            }
            match name {
                "context" => {
                    if context
                        .as_deref()
                        .is_some_and(|c| c != std::path::Path::new(dir))
                    {
                        return Err(OptionError::new(
                            "--local",
                            l,
                            "the build context is given twice (positional CONTEXT and --local context=)",
                        ));
                    }
                    context = Some(PathBuf::from(dir));
                }
                "dockerfile" => dockerfile_dir = Some(PathBuf::from(dir)),
                _ => {
                    locals.insert(name.to_string(), PathBuf::from(dir));
                }
            }
        }
        let context = context.ok_or_else(|| {
            OptionError::new(
                "CONTEXT",
                "",
                "no build context: pass a CONTEXT directory or --local context=DIR",
            )
        })?;
        let mut opts = Self::for_context(context.clone());
        opts.locals = locals;
        let mut stores = BTreeMap::new();
        for l in &raw.oci_layouts {
            let (name, dir) = split_kv("--oci-layout", l)?;
            check_name("--oci-layout", l, name)?;
            if dir.is_empty() {
                return Err(OptionError::new(
                    "--oci-layout",
                    l,
                    "expected NAME=DIR with the directory of an OCI image layout",
                ));
            }
            stores.insert(name.to_string(), PathBuf::from(dir));
        }

        let mut filename: Option<String> = None;
        let mut target = raw.target.clone();
        let mut platforms_raw: Vec<(&str, String)> = raw
            .platforms
            .iter()
            .map(|p| ("--platform", p.clone()))
            .collect();
        for o in &raw.opts {
            let (key, value) = split_kv("--opt", o)?;
            if let Some(name) = key.strip_prefix("build-arg:") {
                check_name("--opt", o, name)?;
                opts.build_args.insert(name.to_string(), value.to_string());
            } else if let Some(name) = key.strip_prefix("label:") {
                check_name("--opt", o, name)?;
                opts.labels.insert(name.to_string(), value.to_string());
            } else if let Some(name) = key.strip_prefix("context:") {
                check_name("--opt", o, name)?;
                let ctx = parse_named_context_value("--opt", o, value, &opts.locals, &stores)?;
                opts.named_contexts.insert(name.to_string(), ctx);
            } else {
                match key {
                    "target" => target = Some(value.to_string()),
                    "filename" => filename = Some(value.to_string()),
                    "platform" => platforms_raw.push(("--opt", value.to_string())),
                    "force-network-mode" => {
                        opts.network = parse_network_mode("--opt", o, value)?;
                    }
                    // BuildKit's Dockerfile frontend spelling of buildx's RUN settings.
                    "add-hosts" => {
                        for h in split_list(value) {
                            opts.extra_hosts.push(ExtraHost::parse("--opt", &h)?);
                        }
                    }
                    "shm-size" => {
                        opts.shm_size = Some(crate::run_settings::parse_shm_size("--opt", value)?);
                    }
                    "ulimit" => {
                        for u in split_list(value) {
                            opts.add_ulimit(Ulimit::parse("--opt", &u)?);
                        }
                    }
                    "cgroup-parent" => {
                        opts.cgroup_parent = Some(parse_cgroup_parent("--opt", value)?);
                    }
                    "image-resolve-mode" => match value {
                        "pull" => opts.pull = true,
                        "default" | "local" => opts.pull = false,
                        _ => {
                            return Err(OptionError::new(
                                "--opt",
                                o,
                                "image-resolve-mode must be default, pull or local",
                            ))
                        }
                    },
                    "no-cache" => match value {
                        "" | "true" => opts.no_cache = NoCache::All,
                        "false" => {}
                        stages => {
                            opts.no_cache = merge_no_cache(
                                std::mem::replace(&mut opts.no_cache, NoCache::None),
                                split_list(stages),
                            )
                        }
                    },
                    _ => {
                        return Err(OptionError::new(
                            "--opt",
                            o,
                            format!(
                            "unknown frontend option `{key}`; known: target, filename, platform, \
                                 no-cache, image-resolve-mode, force-network-mode, add-hosts, \
                                 shm-size, ulimit, cgroup-parent, build-arg:NAME, label:NAME, \
                                 context:NAME"
                        ),
                        ))
                    }
                }
            }
        }
        if let Some(t) = &target {
            if t.is_empty() {
                return Err(OptionError::new(
                    "--target",
                    t,
                    "the target stage name is empty",
                ));
            }
        }
        opts.target = target;

        opts.dockerfile = match (&raw.file, dockerfile_dir, filename) {
            (Some(_), Some(_), _) => {
                return Err(OptionError::new(
                    "--file",
                    raw.file.as_deref().unwrap_or_default(),
                    "give the Dockerfile either with -f/--file or with --local dockerfile=DIR, not both",
                ))
            }
            (Some(f), None, _) if f.is_empty() => {
                return Err(OptionError::new("--file", f, "the Dockerfile path is empty"))
            }
            (Some(f), None, _) => PathBuf::from(f),
            (None, dir, name) => {
                dir.unwrap_or(context).join(name.unwrap_or_else(|| "Dockerfile".to_string()))
            }
        };

        for b in &raw.build_args {
            let (k, v) = match b.split_once('=') {
                Some((k, v)) => (k, v.to_string()),
                // buildx: `--build-arg NAME` takes the value from the environment; the CLI
                // resolves it before calling us, so a bare name here means "unset".
                None => (b.as_str(), String::new()),
            };
            check_name("--build-arg", b, k)?;
            opts.build_args.insert(k.to_string(), v);
        }

        for (flag, p) in platforms_raw {
            for one in split_list(&p) {
                let plat =
                    Platform::parse(&one).map_err(|reason| OptionError::new(flag, &one, reason))?;
                if !opts.platforms.contains(&plat) {
                    opts.platforms.push(plat);
                }
            }
        }

        for bc in &raw.build_contexts {
            let (name, value) = split_kv("--build-context", bc)?;
            check_name("--build-context", bc, name)?;
            let ctx =
                parse_named_context_value("--build-context", bc, value, &opts.locals, &stores)?;
            opts.named_contexts.insert(name.to_string(), ctx);
        }

        if raw.no_cache {
            opts.no_cache = NoCache::All;
        }
        let mut filter = Vec::new();
        for f in &raw.no_cache_filter {
            let parts = split_list(f);
            if parts.is_empty() {
                return Err(OptionError::new(
                    "--no-cache-filter",
                    f,
                    "expected a stage name",
                ));
            }
            filter.extend(parts);
        }
        if !filter.is_empty() {
            opts.no_cache =
                merge_no_cache(std::mem::replace(&mut opts.no_cache, NoCache::None), filter);
        }

        for s in &raw.secrets {
            opts.secrets.push(SecretSpec::parse("--secret", s)?);
        }

        opts.call = match (&raw.call, raw.check) {
            (Some(c), true) if CallRequest::parse("--call", c)?.kind != CallKind::Check => {
                return Err(OptionError::new(
                    "--check",
                    c,
                    "--check conflicts with --call",
                ));
            }
            (Some(c), _) => Some(CallRequest::parse("--call", c)?),
            (None, true) => Some(CallRequest {
                kind: CallKind::Check,
                format: OutputFormat::Text,
            }),
            (None, false) => None,
        };
        if matches!(
            opts.call,
            Some(CallRequest {
                kind: CallKind::Build,
                ..
            })
        ) {
            opts.call = None;
        }

        if let Some(d) = &raw.dry_run {
            opts.dry_run = Some(match d.as_str() {
                "" | "text" | "true" => OutputFormat::Text,
                "json" => OutputFormat::Json,
                _ => {
                    return Err(OptionError::new(
                        "--dry-run",
                        d,
                        "expected `--dry-run` or `--dry-run=json`",
                    ))
                }
            });
        }

        if let Some(p) = &raw.progress {
            opts.progress = ProgressMode::parse(p).ok_or_else(|| {
                OptionError::new(
                    "--progress",
                    p,
                    "expected auto, tty, plain, rawjson or quiet",
                )
            })?;
        }
        if let Some(m) = &raw.metadata_file {
            if m.is_empty() {
                return Err(OptionError::new(
                    "--metadata-file",
                    m,
                    "the file path is empty",
                ));
            }
            opts.metadata_file = Some(PathBuf::from(m));
        }
        if let Some(n) = &raw.max_parallelism {
            let v: usize = n.parse().ok().filter(|v| *v > 0).ok_or_else(|| {
                OptionError::new("--max-parallelism", n, "expected a positive whole number")
            })?;
            opts.max_parallelism = Some(v);
        }
        opts.pull |= raw.pull;
        if let Some(n) = &raw.network {
            opts.network = parse_network_mode("--network", n, n)?;
        }
        for a in raw.allow.iter().flat_map(|a| a.split(',')) {
            match a.trim() {
                "network.host" => opts.entitlements.network_host = true,
                "security.insecure" => opts.entitlements.security_insecure = true,
                other => {
                    return Err(OptionError::new(
                        "--allow",
                        other,
                        "expected network.host or security.insecure",
                    ))
                }
            }
        }
        if opts.network == NetworkMode::Host && !opts.entitlements.network_host {
            let flag = if raw.network.is_some() {
                "--network"
            } else {
                "--opt force-network-mode"
            };
            return Err(OptionError::new(
                flag,
                "host",
                "the host's network exposes every service on the runner's loopback to RUN \
                 steps; grant it with --allow network.host",
            ));
        }
        if let Some(n) = &raw.pids_limit {
            let v: u64 = n.parse().ok().filter(|v| *v > 0).ok_or_else(|| {
                OptionError::new("--pids-limit", n, "expected a positive whole number")
            })?;
            opts.pids_limit = Some(v);
        }
        opts.apply_run_settings(raw)?;
        Ok(opts)
    }
}

impl BuildOptions {
    /// buildx's `--label`, `--add-host`, `--shm-size`, `--ulimit` and `--cgroup-parent`.
    fn apply_run_settings(&mut self, raw: &RawBuildFlags) -> Result<(), OptionError> {
        for l in &raw.labels {
            // buildx: `--label K` without a value sets an empty one.
            let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
            check_name("--label", l, k)?;
            self.labels.insert(k.to_string(), v.to_string());
        }
        for h in raw.add_hosts.iter().flat_map(|h| split_list(h)) {
            self.extra_hosts.push(ExtraHost::parse("--add-host", &h)?);
        }
        if let Some(s) = &raw.shm_size {
            self.shm_size = Some(crate::run_settings::parse_shm_size("--shm-size", s)?);
        }
        for u in &raw.ulimits {
            self.add_ulimit(Ulimit::parse("--ulimit", u)?);
        }
        if let Some(c) = &raw.cgroup_parent {
            self.cgroup_parent = Some(parse_cgroup_parent("--cgroup-parent", c)?);
        }
        Ok(())
    }

    /// Adds a limit; the last one of a name wins, as in Docker.
    fn add_ulimit(&mut self, u: Ulimit) {
        self.ulimits.retain(|o| o.name != u.name);
        self.ulimits.push(u);
    }
}

/// A cgroup path relative to the hierarchy's root, without `.`, `..` or empty parts (leading
/// and trailing `/` dropped).
fn parse_cgroup_parent(flag: &str, value: &str) -> Result<String, OptionError> {
    let trimmed = value.trim_matches('/');
    if trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err(OptionError::new(
            flag,
            value,
            "expected a cgroup path such as `ci/builds`, without `.`, `..` or empty parts",
        ));
    }
    Ok(trimmed.to_string())
}

/// A URL as `CONTEXT` (`https://host/repo.git#ref:dir`, `git@host:repo`, `git://`,
/// `ssh://`, an HTTP tarball): the options take directories only. `kiln build` fetches git
/// repositories into one before it gets here; anything else is refused with what to do.
fn refuse_remote_context(context: &str) -> Result<(), OptionError> {
    let remote = ["http://", "https://", "git://", "ssh://", "git@"]
        .iter()
        .any(|p| context.starts_with(p));
    if remote {
        return Err(OptionError::new(
            "CONTEXT",
            context,
            "a URL context must be a git repository (URL.git#REF:DIR, git@HOST:REPO.git, \
             git://, ssh://), which kiln build fetches; download anything else (a tarball, a \
             Dockerfile) and pass its directory",
        ));
    }
    Ok(())
}

/// `default` (`sandbox` in buildctl's spelling), `none` or `host`.
fn parse_network_mode(flag: &str, whole: &str, value: &str) -> Result<NetworkMode, OptionError> {
    match value {
        "default" | "sandbox" => Ok(NetworkMode::Default),
        "none" => Ok(NetworkMode::None),
        "host" => Ok(NetworkMode::Host),
        _ => Err(OptionError::new(
            flag,
            whole,
            "expected a network mode: default, none or host",
        )),
    }
}

/// Which steps must run even when cached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "stages")]
pub enum NoCache {
    /// Use the cache everywhere.
    None,
    /// Ignore the cache for every step.
    All,
    /// Ignore the cache for the steps of these stages (names or indexes).
    Stages(Vec<String>),
}

fn merge_no_cache(current: NoCache, stages: Vec<String>) -> NoCache {
    match current {
        NoCache::All => NoCache::All,
        NoCache::None => NoCache::Stages(stages),
        NoCache::Stages(mut s) => {
            for x in stages {
                if !s.contains(&x) {
                    s.push(x);
                }
            }
            NoCache::Stages(s)
        }
    }
}

/// A named build context's source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum NamedContext {
    /// A local directory.
    Local {
        /// The directory.
        path: PathBuf,
    },
    /// An image from a registry (`docker-image://REF`).
    Image {
        /// The image reference.
        reference: String,
    },
    /// An image in an OCI layout directory (`oci-layout://PATH[:TAG|@DIGEST]`).
    OciLayout {
        /// The layout directory.
        path: PathBuf,
        /// Tag or digest inside the layout (`latest` when absent).
        reference: String,
    },
    /// A remote URL (git repository or tarball).
    Url {
        /// The URL.
        url: String,
    },
}

fn parse_named_context_value(
    flag: &str,
    whole: &str,
    value: &str,
    locals: &BTreeMap<String, PathBuf>,
    oci_stores: &BTreeMap<String, PathBuf>,
) -> Result<NamedContext, OptionError> {
    if value.is_empty() {
        return Err(OptionError::new(
            flag,
            whole,
            "expected NAME=VALUE with a non-empty value",
        ));
    }
    if let Some(r) = value.strip_prefix("docker-image://") {
        if r.is_empty() || r.contains(char::is_whitespace) {
            return Err(OptionError::new(
                flag,
                whole,
                "docker-image:// needs an image reference",
            ));
        }
        return Ok(NamedContext::Image {
            reference: r.to_string(),
        });
    }
    if let Some(rest) = value.strip_prefix("oci-layout://") {
        let (path, reference) = if let Some((p, d)) = rest.rsplit_once('@') {
            if !d.starts_with("sha256:") || d.len() != 71 {
                return Err(OptionError::new(
                    flag,
                    whole,
                    "oci-layout:// digest must be sha256:<64 hex>",
                ));
            }
            (p, d.to_string())
        } else {
            // A `:tag` suffix only counts after the last path separator.
            let last = rest.rsplit('/').next().unwrap_or(rest);
            match last.rsplit_once(':') {
                Some((_, tag)) if !tag.is_empty() => {
                    (&rest[..rest.len() - tag.len() - 1], tag.to_string())
                }
                _ => (rest, "latest".to_string()),
            }
        };
        if path.is_empty() {
            return Err(OptionError::new(
                flag,
                whole,
                "oci-layout:// needs a directory path",
            ));
        }
        // buildctl: `oci-layout://NAME@DIGEST` names a store given with `--oci-layout NAME=DIR`.
        let path = oci_stores
            .get(path)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(path));
        return Ok(NamedContext::OciLayout { path, reference });
    }
    if let Some(name) = value.strip_prefix("local:") {
        return match locals.get(name) {
            Some(p) => Ok(NamedContext::Local { path: p.clone() }),
            None => Err(OptionError::new(
                flag,
                whole,
                format!("no --local {name}=DIR was given"),
            )),
        };
    }
    if value.starts_with("https://") || value.starts_with("http://") || value.starts_with("git@") {
        return Ok(NamedContext::Url {
            url: value.to_string(),
        });
    }
    if let Some((scheme, _)) = value.split_once("://") {
        return Err(OptionError::new(
            flag,
            whole,
            format!("unsupported source `{scheme}://`; use a directory, docker-image://, oci-layout:// or a URL"),
        ));
    }
    Ok(NamedContext::Local {
        path: PathBuf::from(value),
    })
}

/// Layer compression (`compression=` of an image output): kiln-oci's, the one the store uses.
pub use kiln_oci::compression::Compression;

/// Where a secret's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "value")]
pub enum SecretSource {
    /// A file on the build host.
    File(PathBuf),
    /// An environment variable of the `kiln` process.
    Env(String),
}

/// One `--secret`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretSpec {
    /// The id `RUN --mount=type=secret,id=` refers to.
    pub id: String,
    /// Where its value comes from.
    pub source: SecretSource,
}

impl SecretSpec {
    /// Parses `id=ID[,type=file|env][,src=PATH|,env=VAR]`.
    pub fn parse(flag: &str, value: &str) -> Result<Self, OptionError> {
        let mut id = None;
        let mut typ = None;
        let mut src = None;
        let mut env = None;
        for f in split_csv(flag, value)? {
            let (k, v) = f
                .split_once('=')
                .ok_or_else(|| OptionError::new(flag, value, format!("`{f}` is not key=value")))?;
            match k {
                "id" => id = Some(v.to_string()),
                "type" => typ = Some(v.to_string()),
                "src" | "source" => src = Some(v.to_string()),
                "env" => env = Some(v.to_string()),
                _ => {
                    return Err(OptionError::new(
                        flag,
                        value,
                        format!("unknown key `{k}`; expected id, type, src, env"),
                    ))
                }
            }
        }
        let id = id
            .filter(|i| !i.is_empty())
            .ok_or_else(|| OptionError::new(flag, value, "missing id="))?;
        let source = match (typ.as_deref(), src, env) {
            (_, Some(_), Some(_)) => {
                return Err(OptionError::new(
                    flag,
                    value,
                    "give either src= or env=, not both",
                ))
            }
            (None | Some("file"), Some(s), None) => SecretSource::File(PathBuf::from(s)),
            (None | Some("env"), None, Some(e)) => SecretSource::Env(e),
            (Some("env"), Some(s), None) => SecretSource::Env(s),
            (Some("file"), None, None) => SecretSource::File(PathBuf::from(&id)),
            (None | Some("env"), None, None) => SecretSource::Env(id.clone()),
            (Some(t), _, _) => {
                return Err(OptionError::new(
                    flag,
                    value,
                    format!("type=`{t}`: expected file or env"),
                ))
            }
        };
        Ok(SecretSpec { id, source })
    }
}

/// Text or JSON output of a subrequest or dry run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputFormat {
    /// Human-readable text.
    Text,
    /// JSON.
    Json,
}

/// Which subrequest `--call` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CallKind {
    /// A normal build.
    Build,
    /// List the stages.
    Targets,
    /// Build args and secrets the target uses.
    Outline,
    /// Lint the Dockerfile.
    Check,
}

/// A parsed `--call` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRequest {
    /// What to compute.
    pub kind: CallKind,
    /// How to print it.
    pub format: OutputFormat,
}

impl CallRequest {
    /// Parses `targets|outline|check|build[,format=json|text]`.
    pub fn parse(flag: &str, value: &str) -> Result<Self, OptionError> {
        let mut parts = value.split(',');
        let name = parts.next().unwrap_or_default();
        let kind = match name {
            "build" => CallKind::Build,
            "targets" => CallKind::Targets,
            "outline" => CallKind::Outline,
            "check" | "lint" => CallKind::Check,
            _ => {
                return Err(OptionError::new(
                    flag,
                    value,
                    format!(
                        "unknown subrequest `{name}`; expected build, targets, outline or check"
                    ),
                ))
            }
        };
        let mut format = OutputFormat::Text;
        for p in parts {
            match p.split_once('=') {
                Some(("format", "json")) => format = OutputFormat::Json,
                Some(("format", "text")) => format = OutputFormat::Text,
                _ => {
                    return Err(OptionError::new(
                        flag,
                        value,
                        format!("`{p}`: expected format=json or format=text"),
                    ))
                }
            }
        }
        Ok(CallRequest { kind, format })
    }
}

/// `--progress` display modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ProgressMode {
    /// tty when stderr is a terminal, plain otherwise.
    #[default]
    Auto,
    /// Live-updating terminal display.
    Tty,
    /// One line per event.
    Plain,
    /// JSON events, one per line.
    Rawjson,
    /// Nothing but errors.
    Quiet,
}

impl ProgressMode {
    /// The mode `s` names (`auto`, `tty`, `plain`, `rawjson`, `quiet`), if any.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "auto" => Self::Auto,
            "tty" => Self::Tty,
            "plain" => Self::Plain,
            "rawjson" => Self::Rawjson,
            "quiet" => Self::Quiet,
            _ => return None,
        })
    }
}

impl fmt::Display for ProgressMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Tty => "tty",
            Self::Plain => "plain",
            Self::Rawjson => "rawjson",
            Self::Quiet => "quiet",
        })
    }
}

fn split_kv<'a>(flag: &str, s: &'a str) -> Result<(&'a str, &'a str), OptionError> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k, v)),
        _ => Err(OptionError::new(flag, s, "expected KEY=VALUE")),
    }
}

fn check_name(flag: &str, whole: &str, name: &str) -> Result<(), OptionError> {
    if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '=') {
        return Err(OptionError::new(
            flag,
            whole,
            format!("`{name}` is not a valid name"),
        ));
    }
    Ok(())
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect()
}

/// Splits a CSV field list as buildx does: commas separate fields, double quotes protect
/// them (and are dropped), empty fields are skipped. The one such split for every
/// `k=v,...` flag value (kiln-build's `--output`/cache flags use it too).
pub fn split_csv(flag: &str, s: &str) -> Result<Vec<String>, OptionError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    if quoted {
        return Err(OptionError::new(flag, s, "unterminated double quote"));
    }
    out.push(cur);
    Ok(out.into_iter().filter(|f| !f.is_empty()).collect())
}

#[cfg(test)]
mod oci_layout_store_tests {
    use super::*;

    fn flags(oci_layouts: &[&str], opts: &[&str]) -> RawBuildFlags {
        RawBuildFlags {
            context: Some("ctx".into()),
            oci_layouts: oci_layouts.iter().map(|s| s.to_string()).collect(),
            opts: opts.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn buildctl_oci_layout_store_is_referenced_by_name_from_context_opt() {
        let digest = format!("sha256:{}", "b".repeat(64));
        let o = BuildOptions::from_flags(&flags(
            &["foo2=/home/dir/oci"],
            &[
                &format!("context:alpine=oci-layout://foo2@{digest}"),
                "context:tagged=oci-layout://foo2:v1",
            ],
        ))
        .unwrap();
        assert_eq!(
            o.named_contexts["alpine"],
            NamedContext::OciLayout {
                path: "/home/dir/oci".into(),
                reference: digest
            }
        );
        assert_eq!(
            o.named_contexts["tagged"],
            NamedContext::OciLayout {
                path: "/home/dir/oci".into(),
                reference: "v1".into()
            }
        );
    }

    #[test]
    fn oci_layout_store_without_a_directory_names_the_flag() {
        let e = BuildOptions::from_flags(&flags(&["foo2="], &[])).unwrap_err();
        assert_eq!(e.flag, "--oci-layout");
    }
}
